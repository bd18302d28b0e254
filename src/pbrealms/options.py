"""
What every pbrealms command line shares: a C{--version} that names
pbrealms, whole option names only, and type errors that name their option.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distributionVersion
from typing import Any

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


class NamedCoercion:
    """
    The coerce column of one option's row, as L{Options} puts it there: its
    own function, whose refusal names the option and the value given
    instead of only the function's complaint (see L{coerced}).  Twisted's
    L{usage.CoerceParameter} calls it with the command line's value, and
    lets the L{usage.UsageError} through.

    @ivar coerce: the row's own function.
    @ivar option: the option's long name.
    @ivar coerceDoc: the function's, which C{--help} shows.
    """

    def __init__(self, coerce: Callable[[str], object], option: str) -> None:
        self.coerce = coerce
        self.option = option
        self.coerceDoc = getattr(coerce, "coerceDoc", "")

    def __call__(self, value: str) -> object:
        return coerced(self.coerce, value, "--" + self.option)


def rowCoercion(row: Sequence[Any]) -> Callable[[str], object]:
    """
    The own coerce function of a row of C{optParameters}, for a value that
    comes from elsewhere than the command line: C{str} if it has none.
    """
    coerce = row[4] if len(row) > 4 and row[4] is not None else str
    return coerce.coerce if isinstance(coerce, NamedCoercion) else coerce


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

    #: Each class's own rows of options that take a value, as usage.Options
    #: reads them: [long, short, default, doc] and perhaps a coerce function.
    optParameters: list[list[Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each class's own rows, as usage.Options gathers them: their coerce
        # column, wrapped once, names the option in a refusal.
        super().__init_subclass__(**kwargs)
        rows = cls.__dict__.get("optParameters")
        if rows:
            cls.optParameters = [_named(row) for row in rows]

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


def _named(row: Sequence[Any]) -> list[Any]:
    """
    A row of C{optParameters} whose coerce function, if it has one, is a
    L{NamedCoercion}.
    """
    row = list(row)
    if len(row) > 4 and row[4] is not None and not isinstance(row[4], NamedCoercion):
        row[4] = NamedCoercion(row[4], row[0])
    return row


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
