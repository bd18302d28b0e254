"""
Options that the environment can give too, for containers: each option
C{name} that takes a value also reads C{PBREALMS_<NAME>}, through the same
coerce function, and errors name the setting as it was given.
"""

from __future__ import annotations

import getopt
import os
from collections.abc import Sequence

from pbrealms.options import Options as CommandOptions
from pbrealms.options import coerced, rowCoercion


def environmentName(option: str) -> str:
    """
    The environment variable that sets C{option}: C{PBREALMS_SHUTDOWN_GRACE}
    for C{shutdown-grace}.
    """
    return "PBREALMS_" + option.upper().replace("-", "_")


class EnvironmentOptions(CommandOptions):
    """
    Command options whose values the environment can give as well as the
    command line, which wins: a subclass's C{parseOptions} calls
    L{_noteGiven} before it parses, and its C{postOptions} calls L{_settle}
    first.

    @ivar given: where each setting given came from, as its errors name it:
        C{--max} or C{PBREALMS_MAX}.
    """

    def __init__(self) -> None:
        self.given: dict[str, str] = {}
        super().__init__()

    def _noteGiven(self, arguments: Sequence[str]) -> None:
        """
        Note in L{given} each option that C{arguments} give, by its long
        name, as C{usage.Options} reads them (getopt, then its synonyms).
        Arguments that getopt refuses are left for the parse to report.
        """
        try:
            opts, _ = getopt.getopt(list(arguments), self.shortOpt, self.longOpt)
        except getopt.GetoptError:
            return
        for opt, _ in opts:
            spelled = opt[2:] if opt.startswith("--") else opt[1:]
            if spelled not in self.synonyms:
                spelled = spelled.replace("-", "_")
            name = self.synonyms.get(spelled)
            if name is not None:
                self.given[name] = "--" + name

    def _settle(self) -> None:
        """
        Give each value that the command line did not give to its option's
        coerce function too: the environment's, for containers (no shell
        wrapper, which would swallow SIGTERM, is needed to turn them into
        options), else the default, which is text as --help shows it.  An
        empty variable counts as unset.  (PBREALMS_AUTH: see
        L{pbrealms.authoptions.AuthOptions._credentialsFromEnvironment}.)
        """
        for parameter in self.optParameters:
            # A row is [long, short, default, doc] and perhaps its coerce.
            name: str = parameter[0]
            default: str | None = parameter[2]
            coerce = rowCoercion(parameter)
            if name in self.given:
                continue
            value = os.environ.get(environmentName(name))
            if value:
                self.given[name] = environmentName(name)
                self[name] = coerced(coerce, value, environmentName(name))
            elif isinstance(default, str):
                self[name] = coerce(default)

    def _name(self, option: str) -> str:
        """
        How an error names the setting C{option}: as the environment
        variable that set it, or else as the option.
        """
        return self.given.get(option, "--" + option)
