"""
How C{twistd pbrealms} checks passwords: --passwd (a password file, or the
demo users) or --auth (a Twisted checker that can answer PB's challenge),
from the command line or the environment.
"""

from __future__ import annotations

import os
from importlib.resources import files
from typing import NoReturn

from twisted.cred import strcred
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword
from twisted.logger import Logger
from twisted.python import usage

from pbrealms.checkers import (
    PasswordFile,
    PasswordFileError,
    checkPermissions,
    parsePasswords,
)
from pbrealms.environment import EnvironmentOptions, environmentName

#: Authentication types that offer IUsernameHashedPassword but cannot serve
#: PB: C{memory:} keeps str user names and PB sends bytes.
UNUSABLE_AUTH_TYPES = frozenset({"memory"})

_log = Logger()


class AuthOptions(EnvironmentOptions, strcred.AuthOptionMixin):
    """
    The options that choose the credentials checker: --auth, and the
    C{passwd} setting that a subclass declares.  The subclass's
    C{postOptions} calls L{_credentialsFromEnvironment}, then L{_checker}.
    """

    supportedInterfaces = (IUsernameHashedPassword,)

    def supportsCheckerFactory(self, factory: object) -> bool:
        if getattr(factory, "authType", None) in UNUSABLE_AUTH_TYPES:
            return False
        return super().supportsCheckerFactory(factory)

    def opt_help_auth(self) -> NoReturn:
        """
        Show all authentication methods available.
        """
        # strcred's table, of the types this server takes only
        # (supportsCheckerFactory), where strcred lists every type that
        # offers a supported interface.
        usable = [f for f in strcred.findCheckerFactories() if self.supportsCheckerFactory(f)]
        self.authOutput.write("Usage: --auth AuthType[:ArgString]\n")
        self.authOutput.write("For detailed help: --help-auth-type AuthType\n")
        self.authOutput.write("\n")
        width = max((len(f.authType) for f in usable), default=0)
        row = f"  %-{width}s\t%s\n"
        self.authOutput.write(row % ("AuthType", "ArgString format"))
        self.authOutput.write(row % ("========", "================"))
        for factory in usable:
            self.authOutput.write(row % (factory.authType, factory.argStringFormat))
        self.authOutput.write("\n")
        raise SystemExit(0)

    def opt_auth(self, description: str) -> None:
        """
        Check passwords with a Twisted checker instead of --passwd (see --help-auth).
        """
        setting = self._name("auth")
        kind = description.split(":", 1)[0]
        try:
            usable = self.supportsCheckerFactory(strcred.findCheckerFactory(kind))
        except strcred.InvalidAuthType:
            raise usage.UsageError(f"{setting} {kind}: unknown type; see --help-auth") from None
        if not usable:
            raise usage.UsageError(
                f"{setting} {kind}: cannot answer PB's challenge; see --help-auth"
            )
        if kind == "file":
            self._checkAuthFile(setting, description.partition(":")[2])
        super().opt_auth(description)

    @staticmethod
    def _checkAuthFile(setting: str, path: str) -> None:
        # strcred only warns about a missing file, and every login would fail.
        try:
            warning = checkPermissions(path)
            users = parsePasswords(path)
        except PasswordFileError as e:
            raise usage.UsageError(f"{setting} {e}") from None
        if warning:
            _log.warn("{warning}", warning=warning)
        # Twisted's file checker ends a password at the next colon, where
        # --passwd keeps it whole: refuse what the two would read apart.
        for name, password in users.items():
            if b":" in password:
                raise usage.UsageError(
                    f"{setting} file:{path}: the password of {name.decode()!r} has a ':', "
                    "which Twisted's file checker cuts off; use --passwd for this file"
                )

    opt_a = opt_auth

    def _credentialsFromEnvironment(self) -> None:
        """
        Apply PBREALMS_AUTH, through the checks of --auth, unless the command
        line chose the password source: its --passwd or --auth overrides both
        PBREALMS_PASSWD and PBREALMS_AUTH (a container image may set one).
        """
        fromCommandLine = [n for n in ("passwd", "auth") if self.given.get(n, "").startswith("--")]
        if fromCommandLine:
            if self.given.get("passwd") == environmentName("passwd"):
                self["passwd"] = None
                del self.given["passwd"]
            return
        description = os.environ.get(environmentName("auth"))
        if description:
            self.given["auth"] = environmentName("auth")
            self.opt_auth(description)

    def _checker(self) -> tuple[ICredentialsChecker, bool]:
        checkers = self.get("credCheckers", [])
        if self["passwd"] == "":
            raise usage.UsageError(f"{self._name('passwd')} needs the name of a password file")
        if self["passwd"] and checkers:
            raise usage.UsageError(f"give {self._name('passwd')} or {self._name('auth')}, not both")
        if len(checkers) > 1:
            raise usage.UsageError("give --auth once")
        if checkers:
            return checkers[0], False
        try:
            if self["passwd"]:
                return PasswordFile(self["passwd"]), False
            demo = str(files("pbrealms") / "demo.passwd")
            return PasswordFile(demo, strictModes=False), True
        except PasswordFileError as e:
            # The error names the file; say too which variable named it.
            setting = self._name("passwd")
            text = str(e) if setting.startswith("--") else f"{setting}: {e}"
            raise usage.UsageError(text) from None
