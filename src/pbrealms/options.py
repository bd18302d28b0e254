"""
What every pbrealms command line shares: a C{--version} that names
pbrealms, whole option names only, and type errors that name their option.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distributionVersion

from twisted.python import usage

import twisted


def versionText() -> str:
    """
    The versions of pbrealms and of the Twisted it runs on, in one line.
    """
    try:
        mine = distributionVersion("pbrealms")
    except PackageNotFoundError:  # run from a source tree that is not installed
        mine = "(not installed)"
    return f"pbrealms {mine} (Twisted {twisted.__version__})"


class _NamedCoercion(usage.CoerceParameter):
    """
    Twisted's coercion, whose error names the option and the value given
    instead of only the converter's complaint.
    """

    def dispatch(self, parameterName: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            what = getattr(self.coerce, "coerceDoc", "") or _KIND_TEXT.get(self.coerce, "")
            reason = what or str(e)
            raise usage.UsageError(f"--{parameterName} {value!r}: {reason}") from None


_KIND_TEXT: dict[Callable[[str], object], str] = {
    int: "must be a whole number",
    float: "must be a number",
}


class Options(usage.Options):
    """
    L{usage.Options} as every pbrealms command wants it.

      - C{--version} prints pbrealms's version and Twisted's.
      - A long option must be given whole: C{getopt} would take
        C{--password} for C{--password-file}, and a later option of the same
        prefix would change what an old command line means.
      - A value that the coerce column refuses is reported with its option:
        C{--timeout 'abc': must be a number}.  A coerce function may raise
        C{ValueError} and set C{coerceDoc} for the text.
    """

    def __init__(self) -> None:
        super().__init__()
        for name, handler in self._dispatch.items():
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = _NamedCoercion(self, handler.coerce)

    def opt_version(self) -> None:
        """
        Print the versions of pbrealms and Twisted, and exit.
        """
        print(versionText())
        sys.exit(0)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        arguments = list(sys.argv[1:] if options is None else options)
        refuseAbbreviations(arguments, self.shortOpt, self.longOpt)
        super().parseOptions(arguments)


def refuseAbbreviations(arguments: Sequence[str], shortOpt: str, longOpt: Sequence[str]) -> None:
    """
    Raise L{usage.UsageError} for the first long option in C{arguments} that
    is a prefix of a longer option rather than an option itself.  Scanning
    stops where C{getopt} stops: at C{--} or the first argument that is not
    an option (a sub-command parses its own).
    """
    names = {o.rstrip("=") for o in longOpt}
    takesValue = {o[:-1] for o in longOpt if o.endswith("=")}
    shortTakesValue = {
        c for c, n in zip(shortOpt, (shortOpt + " ")[1:], strict=True) if n == ":" and c != ":"
    }
    i = 0
    while i < len(arguments):
        argument = arguments[i]
        if argument == "--" or argument == "-" or not argument.startswith("-"):
            return
        if argument.startswith("--"):
            name, equals, _ = argument[2:].partition("=")
            if name not in names:
                longer = sorted(n for n in names if n.startswith(name))
                if longer:
                    raise usage.UsageError(
                        f"--{name}: give the whole option name ("
                        + " or ".join("--" + n for n in longer)
                        + ")"
                    )
                return  # getopt names an unknown option
            if name in takesValue and not equals:
                i += 1
        else:
            letters = argument[1:]
            for j, letter in enumerate(letters):
                if letter in shortTakesValue:
                    if j == len(letters) - 1:
                        i += 1  # the value is the next argument
                    break
        i += 1
