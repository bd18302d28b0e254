"""
The C{pbrealms-passwd} command: add or update a user of a password file with
a bcrypt hash.

    pbrealms-passwd /etc/pbrealms/users.passwd alice

The password is asked for twice without echo, or read from standard input's
first line when that is not a terminal.  The file is written whole to a
temporary file beside it, mode 0600, and renamed over the old one, so that a
reader (the server polls the file) sees either the old file or the new one.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
from pathlib import Path

import bcrypt
from twisted.python import usage

from pbrealms.checkers import stripBOM
from pbrealms.options import Options

DEFAULT_ROUNDS = 12


class PasswdOptions(Options):
    synopsis = "Usage: pbrealms-passwd [--rounds N] FILE USER"
    longdesc = (
        "Add USER to the password file FILE, or change its password, storing a bcrypt "
        "hash. Such users log in by sending the password itself, which pbrealms accepts "
        "only over TLS, loopback or a UNIX socket (pbrealms-client does so on its own)."
    )
    optParameters = [
        ["rounds", None, DEFAULT_ROUNDS, "bcrypt's cost: each one more doubles the work.", int]
    ]

    def parseArgs(self, *arguments: str) -> None:
        if len(arguments) < 2:
            raise usage.UsageError("give the password file and the user name: FILE USER")
        if len(arguments) > 2:
            extra = " ".join(repr(a) for a in arguments[2:])
            raise usage.UsageError(f"too many arguments: {extra} after FILE USER")
        path, user = arguments
        if not user or user.startswith("#") or any(c.isspace() or c == ":" for c in user):
            raise usage.UsageError(
                f"user name {user!r} is empty, starts with '#' or has a space or ':'"
            )
        self["path"], self["user"] = Path(path), user

    def postOptions(self) -> None:
        if not 4 <= self["rounds"] <= 16:
            raise usage.UsageError("--rounds must be from 4 to 16")


def readPassword() -> str:
    """
    The new password: from a terminal, twice without echo; otherwise the
    first line of standard input.
    """
    if not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("pbrealms-passwd: the passwords differ; nothing changed")
    if not password:
        raise SystemExit("pbrealms-passwd: the password is empty; nothing changed")
    if len(password.encode("utf-8")) > 72:
        raise SystemExit(
            "pbrealms-passwd: bcrypt reads at most 72 bytes of a password; nothing changed"
        )
    return password


def setPassword(path: Path, user: str, hashed: str) -> bool:
    """
    Put C{user:hashed} in the file at C{path}, in place of the user's line
    if there is one; keep every other line as it is.  Write it atomically: a
    new file gets mode 0600, an existing one keeps its owner, group and mode
    (less any write access for group and others).

    @return: whether the user was there already.
    """
    # Lines as the server reads them: split on newlines only, after a
    # byte-order mark, which is not written back.
    data = stripBOM(path.read_bytes()) if path.exists() else b""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    entry = f"{user}:{hashed}".encode()
    found = False
    for i, line in enumerate(lines):
        if not line.lstrip().startswith(b"#") and line.rstrip(b"\r").partition(b":")[0] == (
            user.encode()
        ):
            lines[i], found = entry, True
    if not found:
        lines.append(entry)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if data or path.exists():
            st = path.stat()
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o022)
            if (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
                os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return found


def main(argv: list[str] | None = None) -> None:
    options = PasswdOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"pbrealms-passwd: error: {e}\n")
        raise SystemExit(2) from None
    password = readPassword()
    hashed = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(options["rounds"]))
    try:
        updated = setPassword(options["path"], options["user"], hashed.decode("ascii"))
    except OSError as e:
        raise SystemExit(f"pbrealms-passwd: cannot write {options['path']}: {e}") from None
    done = "changed the password of" if updated else "added"
    print(f"pbrealms-passwd: {done} {options['user']} in {options['path']}")


if __name__ == "__main__":
    main()
