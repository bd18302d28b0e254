"""
pbrealms-bench: compare pbrealms with a bare Twisted PB server on the same workloads.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

from pbrealms.options import versionText


class ArgumentParser(argparse.ArgumentParser):
    """
    L{argparse.ArgumentParser} as every pbrealms command behaves (see
    L{pbrealms.options.Options}): whole option names only, a C{--version}
    that names pbrealms, and an error in one line that names its option.
    """

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        super().__init__(**kw)
        self.add_argument(
            "--version",
            action="version",
            version=versionText(),
            help="print the versions of pbrealms and Twisted, and exit",
        )

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --count: 'x': must be ..." (see wholeNumber).
        message = re.sub(r"^argument (\S+): (?=')", r"\1 ", message)
        self.exit(2, f"{self.prog}: error: {message}\n")


def wholeNumber(value: str) -> int:
    """
    An C{int} argument, whose error says what it must be.
    """
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: must be a whole number") from None


def number(value: str) -> float:
    """
    A C{float} argument, whose error says what it must be.
    """
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: must be a number") from None
