"""
C{python -m pbrealms.bench.load}: see L{pbrealms.bench.load}.
"""

from pbrealms.bench.load import main

main()
