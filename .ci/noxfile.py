"""
CI's sessions: lint, the suite on every Python we support, and the suite
with the lowest versions pyproject.toml allows.  Run by .ci/run; by hand:
nox -f .ci/noxfile.py [-s tests-3.12].
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOWEST = ROOT / ".ci" / "lowest.txt"
PYTHONS = ("3.11", "3.12", "3.13")
# The README's install, then Twisted's plugin cache as a read-only deployment
# has it built (-I: only the virtualenv's plugin folder, not ./twisted/plugins).
PLUGIN_CACHE = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

nox.options.envdir = str(ROOT / ".nox")
nox.options.sessions = ["lint", *(f"tests-{v}" for v in PYTHONS), "lowest"]
# A Python that is missing fails CI; nox must neither skip it nor fetch one.
nox.options.error_on_missing_interpreters = True
nox.options.download_python = "never"
nox.options.default_venv_backend = "venv"


def interpreter(version: str) -> str:
    """
    The newest pyenv build of Python C{version}, else a C{pythonX.Y} on PATH
    that is not a pyenv shim (a shim fails for any version but pyenv's
    selected one).  If neither exists, the bare name: nox reports it missing.
    """
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    builds = [
        (tuple(map(int, d.name.split("."))), d / "bin" / f"python{version}")
        for d in root.glob(f"versions/{version}.*")
        if re.fullmatch(rf"{re.escape(version)}\.\d+", d.name)
    ]
    builds = [b for b in builds if b[1].exists()]
    if builds:
        return str(max(builds)[1])
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if "/.pyenv/shims" not in p
    )
    return shutil.which(f"python{version}", path=path) or f"python{version}"


def lowestPins() -> dict[str, Version]:
    """
    Each dependency's pin in .ci/lowest.txt, by its canonical name.
    """
    pins = {}
    for line in LOWEST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = Version(version.strip())
    return pins


def suite(session: nox.Session, extras: str, *pipArgs: str) -> None:
    session.chdir(ROOT)
    session.install(*pipArgs, f".[{extras}]")
    session.run("python", "-I", "-c", PLUGIN_CACHE)
    session.run("pip", "list", "--format=freeze")
    session.run("pytest", *session.posargs)


@nox.session(python=interpreter("3.11"))
def lint(session: nox.Session) -> None:
    """
    ruff, then mypy (configured in pyproject.toml) on the package as
    installed with its runtime dependencies, whose types it reads.
    """
    session.chdir(ROOT)
    # The tools at the versions pyproject.toml asks for at least, so that a
    # new release of one cannot fail the lint with no change of ours; the
    # package as the README installs it, as the tests-* sessions do (a
    # constraint file would pin its dependencies too).
    tools = lowestPins()
    session.install(*(f"{name}=={tools[name]}" for name in ("ruff", "mypy", "mypy-zope")), ".")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


for _version in PYTHONS:
    # The README's install; on the newest Python with the bench extra too, so
    # that pbrealms-bench --plot is tested.
    _extras = "test,bench" if _version == PYTHONS[-1] else "test"

    @nox.session(name=f"tests-{_version}", python=interpreter(_version))
    def tests(session: nox.Session, extras: str = _extras) -> None:
        suite(session, extras)


@nox.session(python=interpreter(PYTHONS[0]))
def lowest(session: nox.Session) -> None:
    """
    The suite with every dependency at its lowest allowed version, pinned by
    .ci/lowest.txt, which must pin each one, and only those, to its >= bound.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [Requirement(r) for r in project["dependencies"] + extras["test"] + extras["bench"]]
    pins = lowestPins()
    for req in declared:
        bounds = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if len(bounds) != 1:
            session.error(f"pyproject.toml must give {req.name} one >= bound, to test it at")
        if pins.pop(canonicalize_name(req.name), None) != bounds[0]:
            session.error(f"{LOWEST.name} must pin {req.name}=={bounds[0]}, its >= bound")
    if pins:
        session.error(f"{LOWEST.name} pins what pyproject.toml does not ask for: {sorted(pins)}")
    suite(session, "test,bench", "--constraint", str(LOWEST))
