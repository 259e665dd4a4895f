"""Pin the container image's runtime dependencies to the versions the tests ran with.

The image installs ``requirements.txt`` beside this file with ``--no-deps
--only-binary=:all:``, then spendgate's own three packages with ``--no-deps``; so the
file must list the whole runtime closure of spendgate, spendgate-client and
spendgate-protos (no dev or provider extras), each at one exact version. This script
writes it from the environment it runs in::

    .venv/bin/python deploy/docker/lock.py           # rewrite requirements.txt
    .venv/bin/python deploy/docker/lock.py --check   # exit 1 if it no longer fits

``--check`` (run by tests/deploy/test_deploy.py) fails when a dependency was added or dropped
in a pyproject.toml, or a pin no longer satisfies what its dependents ask for. It does
not demand the venv's exact versions: a fresh ``make venv`` may resolve newer ones,
and the image keeps the tested pins until this script is run again.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOTS = ("spendgate", "spendgate-client", "spendgate-protos")
LOCK = Path(__file__).with_name("requirements.txt")
HEADER = """\
# Runtime dependencies of the spendgate image: the whole closure, exact versions.
# Generated from the tested venv by `.venv/bin/python deploy/docker/lock.py`; do not
# edit by hand. The Dockerfile installs it with --no-deps --only-binary=:all:.
"""


@dataclass
class Closure:
    """Runtime dependencies (not ROOTS): installed version and every specifier asked of each."""

    versions: dict[NormalizedName, str] = field(default_factory=dict)
    wanted: dict[NormalizedName, list[SpecifierSet]] = field(default_factory=dict)


def runtime_closure() -> Closure:
    """Walk installed metadata from ROOTS, following extras (redis[hiredis]) and markers for this platform."""
    closure = Closure()
    roots = {canonicalize_name(name) for name in ROOTS}
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(name, frozenset()) for name in ROOTS]
    while todo:
        raw_name, extras = todo.pop()
        name = canonicalize_name(raw_name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"lock.py: {name} is not installed here; run it with the project's .venv/bin/python")
        if name not in roots:
            closure.versions[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": extra} for extra in ("", *extras)]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            closure.wanted.setdefault(canonicalize_name(req.name), []).append(req.specifier)
            todo.append((req.name, frozenset(req.extras)))
    return closure


def render(closure: Closure) -> str:
    """The lock file text for ``closure``."""
    pins = (f"{name}=={closure.versions[name]}" for name in sorted(closure.versions))
    return HEADER + "\n".join(pins) + "\n"


def parse(text: str) -> dict[NormalizedName, str]:
    """``name==version`` lines of a lock file (comments and blank lines skipped)."""
    pins: dict[NormalizedName, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or req.marker or req.extras:
            raise ValueError(f"line {number}: {line!r} is not a plain name==version pin")
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def problems(text: str, closure: Closure) -> list[str]:
    """Why the lock text does not fit the closure (empty when it does)."""
    try:
        pins = parse(text)
    except ValueError as exc:
        return [str(exc)]
    missing = sorted(closure.versions.keys() - pins)
    found = [f"missing: {name} (installed {closure.versions[name]})" for name in missing]
    found += [f"not a runtime dependency any more: {name}" for name in sorted(pins.keys() - closure.versions)]
    for name, version in sorted(pins.items()):
        for spec in closure.wanted.get(name, []):
            if not spec.contains(Version(version), prereleases=True):
                found.append(f"{name}=={version} does not satisfy {name}{spec}")
    return found


def main() -> None:
    """Write the lock file, or with ``--check`` verify it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="verify instead of writing")
    args = parser.parse_args()
    closure = runtime_closure()
    if not args.check:
        LOCK.write_text(render(closure))
        print(f"wrote {LOCK} ({len(closure.versions)} packages)")
        return
    found = problems(LOCK.read_text(), closure)
    for problem in found:
        print(f"{LOCK}: {problem}", file=sys.stderr)
    if found:
        sys.exit(f"{LOCK} is stale: run .venv/bin/python deploy/docker/lock.py")


if __name__ == "__main__":
    main()
