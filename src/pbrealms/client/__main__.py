"""
C{python -m pbrealms.client}: the C{pbrealms-client} command.
"""

from pbrealms.client.cli import main

main()
