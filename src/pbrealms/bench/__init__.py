"""
pbrealms-bench: compare pbrealms with a bare Twisted PB server on the same workloads.

The command is L{pbrealms.bench.cli}, the bare server L{pbrealms.bench.baseline}
and the load generator L{pbrealms.bench.load}, each run as its own process.
"""

from __future__ import annotations

import resource


def raiseFileLimit() -> None:
    """
    Raise this process's soft limit of open files to the hard one, for it and
    the children it starts: every session of a workload is a connection.

    @raise ValueError: if the system refuses the hard limit as a soft one.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
