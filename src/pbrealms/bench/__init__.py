"""
pbrealms-bench: compare pbrealms with a bare Twisted PB server on the same workloads.
"""
