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


class BadValue(ValueError):
    """
    A coerce function's refusal of a value, worded whole around the setting
    that gave it, for commands whose errors read C{--max must be 1 or more,
    not 0} or C{PBREALMS_MAX must be ...}.

    @ivar wording: a template of ours, formatted with C{setting} (C{--max},
        or the environment variable that gave the value), C{what} (the same
        without a leading C{--}) and C{fields}; a value given by a person
        goes in as a field, never into the template.
    """

    def __init__(self, wording: str, **fields: object) -> None:
        super().__init__(wording)
        self.wording = wording
        self.fields = fields

    def describe(self, setting: str) -> str:
        """
        The refusal as one line, naming C{setting}.
        """
        return self.wording.format(setting=setting, what=setting.removeprefix("--"), **self.fields)


_KIND_TEXT: dict[Callable[[str], object], str] = {
    int: "must be a whole number",
    float: "must be a number",
}


def coerced(coerce: Callable[[str], object], value: str, setting: str) -> object:
    """
    C{coerce(value)}, or a L{usage.UsageError} that names C{setting} and the
    value: a L{BadValue} as it is worded, any other C{ValueError} as
    C{--timeout 'abc': must be a number} (the function's C{coerceDoc}, or
    else the error's text).
    """
    try:
        return coerce(value)
    except BadValue as e:
        raise usage.UsageError(e.describe(setting)) from None
    except ValueError as e:
        what = getattr(coerce, "coerceDoc", "") or _KIND_TEXT.get(coerce, "")
        reason = what or str(e)
        raise usage.UsageError(f"{setting} {value!r}: {reason}") from None


class NamedCoercion(usage.CoerceParameter):
    """
    Twisted's coercion, whose error names the option and the value given
    instead of only the converter's complaint (see L{coerced}).
    """

    def dispatch(self, parameterName: str, value: str | None) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        self.options.opts[parameterName] = coerced(self.coerce, value, "--" + parameterName)


class Options(usage.Options):
    """
    L{usage.Options} as every pbrealms command wants it.

      - C{--version} prints pbrealms's version and Twisted's.
      - A long option must be given whole: C{getopt} would take
        C{--password} for C{--password-file}, and a later option of the same
        prefix would change what an old command line means.
      - A value that the coerce column refuses is reported with its option:
        C{--timeout 'abc': must be a number}.  A coerce function may raise
        C{ValueError} and set C{coerceDoc} for the text, or raise
        L{BadValue} to word the whole line.
    """

    def __init__(self) -> None:
        super().__init__()
        for name, handler in self._dispatch.items():
            if type(handler) is usage.CoerceParameter:
                self._dispatch[name] = self.coercion(handler.coerce)

    def coercion(self, coerce: Callable[[str], object]) -> usage.CoerceParameter:
        """
        The dispatcher that gives an option's value to C{coerce} (its coerce
        column) and reports a refusal in one line naming the option.
        """
        return NamedCoercion(self, coerce)

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
