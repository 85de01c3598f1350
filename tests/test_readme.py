"""README.md (the operator's handbook) and docs/deploy.md agree with the code.

- The configuration reference has a row for every field of every section of
  :class:`streamer.config.AppConfig`, with its default and environment variable, and no row
  for an option that does not exist.
- The dead-letter table lists exactly :data:`streamer.events.REASONS`.
- Every ``foldstream`` command line in a shell code block parses with the real CLI parser
  (directly, or through ``docker compose run|exec`` of the ``foldstream`` service), and every
  ``FOLDSTREAM_SECTION__KEY`` variable mentioned names a real option.
- Its TOML examples load, and it opens with the two commands, ``make demo`` and ``make test``.

``python -m tests.test_readme`` prints the configuration tables' skeleton (option, default,
environment variable) generated from the dataclasses; the meanings are written by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePath

import pytest

from streamer.cli import build_parser
from streamer.config import ENV_PREFIX, AppConfig, load_config
from streamer.events import REASONS
from tests.paths import REPO

README = REPO / "README.md"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
TABLE_HEADER = "| option | default | environment variable | meaning |"


# --- What the code says ----------------------------------------------------------------------

def config_sections() -> list[tuple[str, type]]:
    """``(section name, dataclass)`` of every section of AppConfig, in declaration order."""
    hints = typing.get_type_hints(AppConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(AppConfig)]


def toml_value(value: object) -> str:
    """A default as it is written in a TOML config file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, PurePath)):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def env_value(value: object) -> str:
    """A default as it is written in a FOLDSTREAM_ environment variable."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return json.dumps(dict(value))
    return str(value)


def env_name(section: str, option: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{option.upper()}"


def expected_rows() -> dict[str, dict[str, tuple[str, str]]]:
    """section -> option -> (TOML default, environment variable)."""
    rows = {}
    for section, cls in config_sections():
        defaults = cls()
        rows[section] = {f.name: (toml_value(getattr(defaults, f.name)), env_name(section, f.name))
                         for f in dataclasses.fields(cls)}
    return rows


def skeleton(only: Mapping[str, set[str]] | None = None) -> str:
    """Markdown rows to paste into the README (the meaning left as ``TODO``)."""
    out = []
    for section, options in expected_rows().items():
        names = [o for o in options if only is None or o in only.get(section, set())]
        if not names:
            continue
        out += [f"### `[{section}]`", "", TABLE_HEADER, "|---|---|---|---|"]
        out += [f"| `{o}` | `{options[o][0]}` | `{options[o][1]}` | TODO |" for o in names]
        out.append("")
    return "\n".join(out)


# --- What the docs say ---------------------------------------------------------------------

def section_text(text: str, heading: str) -> str:
    """The body of the ``## heading`` section (up to the next ``## ``)."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def table_rows(lines: list[str]) -> list[list[str]]:
    """Cells of each body row of a markdown table (header and rule skipped), backticks removed."""
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip().strip("|").split("|")])
    return rows


def documented_config(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """section -> option -> (default, variable) from the Configuration section's tables."""
    found: dict[str, dict[str, tuple[str, str]]] = {}
    section = None
    lines = section_text(text, "Configuration").splitlines()
    for n, line in enumerate(lines):
        heading = re.match(r"^### `\[(\w+)\]`", line)
        if heading:
            section = heading.group(1)
        elif line.strip() == TABLE_HEADER:
            assert section is not None, "a configuration table before any ### `[section]` heading"
            for cells in table_rows(lines[n:]):
                assert len(cells) == 4, f"[{section}] row {cells}: expected 4 cells"
                option, default, variable, _ = cells
                assert option not in found.setdefault(section, {}), f"[{section}] {option} twice"
                found[section][option] = (default, variable)
    return found


def code_blocks(text: str, languages: set[str]) -> Iterator[str]:
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if match.group(1) in languages:
            yield match.group(2)


def shell_lines(block: str) -> Iterator[str]:
    """Lines of a shell block with backslash continuations joined."""
    pending = ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


SEPARATORS = {"|", "||", "&&", ";", "&"}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def foldstream_args(words: list[str]) -> list[str] | None:
    """The CLI arguments of one simple command, or None when it does not run foldstream."""
    while words and ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    if Path(words[0]).name == "foldstream":
        return words[1:]
    if words[:2] == ["docker", "compose"] or words[:1] == ["docker-compose"]:
        rest = words[2:] if words[0] == "docker" else words[1:]
        while rest and rest[0].startswith("-"):  # global options: --profile NAME, -f FILE
            rest = rest[2:]
        if not rest or rest[0] not in ("run", "exec"):
            return None
        action, rest = rest[0], rest[1:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in ("--index", "-e", "--env", "-u", "--user", "-w") else rest[1:]
        if not rest or rest[0] != "foldstream":
            return None
        rest = rest[1:]  # after the service name
        if action == "run":  # the image's entrypoint is `foldstream`
            return rest
        return rest[1:] if rest and rest[0] == "foldstream" else None
    return None


def cli_invocations(text: str) -> Iterator[tuple[str, list[str]]]:
    for block in code_blocks(text, {"sh", "bash", "console"}):
        for line in shell_lines(block):
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in words + [";"]:
                if word in SEPARATORS:
                    args = foldstream_args(command)
                    if args is not None:
                        yield line.strip(), args
                    command = []
                else:
                    command.append(word)


# --- Tests ---------------------------------------------------------------------------------

def test_every_config_option_is_in_the_readme_tables():
    expected = expected_rows()
    documented = documented_config(README.read_text("utf-8"))
    missing = {s: {o for o in options if o not in documented.get(s, {})}
               for s, options in expected.items()}
    if any(missing.values()):
        pytest.fail("README.md's configuration reference lacks these options; paste and "
                    f"describe them:\n\n{skeleton(missing)}", pytrace=False)
    stale = [f"[{s}] {o}" for s, options in documented.items() for o in options
             if o not in expected.get(s, {})]
    assert not stale, f"README.md documents options that streamer/config.py does not have: {stale}"
    for section, options in expected.items():
        for option, (default, variable) in options.items():
            assert documented[section][option] == (default, variable), (
                f"[{section}] {option}: README says {documented[section][option]}, "
                f"the code says {(default, variable)}")


def test_documented_environment_variables_set_the_documented_option():
    for section, cls in config_sections():
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = getattr(defaults, f.name)
            config = load_config(None, env={env_name(section, f.name): env_value(value)})
            assert getattr(getattr(config, section), f.name) == value, (section, f.name)


@pytest.mark.parametrize("doc", [README, DEPLOY_DOC], ids=lambda p: p.name)
def test_every_variable_mentioned_names_an_option(doc):
    variables = set(re.findall(rf"\b{ENV_PREFIX}[A-Z0-9_]+\b", doc.read_text("utf-8")))
    known = {variable for options in expected_rows().values() for _, variable in options.values()}
    unknown = sorted(v for v in variables if v not in known and v != ENV_PREFIX)
    # FOLDSTREAM_<SECTION>__<KEY> patterns are written with angle brackets, so not matched here.
    assert not unknown, f"{doc.name} mentions variables that set no option: {unknown}"


def test_toml_examples_load(tmp_path):
    blocks = list(code_blocks(README.read_text("utf-8"), {"toml"}))
    assert blocks
    for n, block in enumerate(blocks):
        path = tmp_path / f"example{n}.toml"
        path.write_text(block, "utf-8")
        load_config(path, env={})


def test_dead_letter_reasons_are_exactly_the_decoders():
    text = README.read_text("utf-8")
    lines = text.splitlines()
    (start,) = [n for n, line in enumerate(lines) if re.match(r"^\| reason \|", line)]
    documented = [cells[0] for cells in table_rows(lines[start:])]
    assert sorted(documented) == sorted(REASONS), (
        f"missing: {sorted(set(REASONS) - set(documented))}, "
        f"not a reason: {sorted(set(documented) - set(REASONS))}")


@pytest.mark.parametrize("doc, at_least", [(README, 15), (DEPLOY_DOC, 3)],
                         ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_foldstream_command_shown_parses(doc, at_least):
    invocations = list(cli_invocations(doc.read_text("utf-8")))
    assert len(invocations) >= at_least, f"found only {invocations} in {doc.name}"
    parser = build_parser()
    for line, args in invocations:
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            assert exc.code == 0, f"{doc.name}: `{line}` is not a valid foldstream command line"


def subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """Follow sub-command names from ``parser``; return the last parser and the words left."""
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


@pytest.mark.parametrize("doc", [README, DEPLOY_DOC], ids=lambda p: p.name)
def test_inline_foldstream_commands_name_real_commands_and_flags(doc):
    """`foldstream model add MODEL_DIR [--promote]` in prose: the command and its flags exist."""
    spans = re.findall(r"`(foldstream [^`]+)`", doc.read_text("utf-8"))
    assert spans
    root = build_parser()
    for span in spans:
        words = span.replace("[", " ").replace("]", " ").split()[1:]
        parser, rest = subparser(root, words)
        has_subcommands = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
        assert not (has_subcommands and rest and not rest[0].startswith("-")), \
            f"{doc.name}: `{span}`: {parser.prog} has no sub-command {rest[0]!r}"
        flags = {s for a in parser._actions for s in a.option_strings}
        unknown = [w.split("=")[0] for w in rest if w.startswith("-") and w.split("=")[0] not in flags]
        assert not unknown, f"{doc.name}: `{span}`: {parser.prog} has no {unknown}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", [README, DEPLOY_DOC], ids=lambda p: p.name)
def test_links_point_at_existing_files_and_headings(doc):
    def prose(path: Path) -> str:
        return re.sub(r"^```.*?^```", "", path.read_text("utf-8"), flags=re.M | re.S)

    def anchors(path: Path) -> set[str]:
        return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose(path), re.M)}

    links = re.findall(r"\]\(([^)\s]+)\)", prose(doc))
    assert links or doc != README
    for target in links:
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = doc.parent / path if path else doc
        assert linked.exists(), f"{doc.name}: link to missing {path}"
        if anchor:
            assert anchor in anchors(linked), f"{doc.name}: {target}: no such heading"


def test_readme_opens_with_the_two_commands():
    text = README.read_text("utf-8")
    first = next(code_blocks(text, {"sh", "bash", "console", ""}))
    commands = [line.split("#")[0].strip() for line in first.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert all("#" in line for line in first.splitlines() if line.strip()), \
        "each of the two commands says what it does"


def test_cli_invocation_extraction():
    text = ("```sh\n"
            "foldstream broker &               # a comment\n"
            "FOO=1 .venv/bin/foldstream run --config a.toml | tee log\n"
            "docker compose exec --index 2 foldstream foldstream model list\n"
            "docker compose run --rm --no-deps foldstream retrain --now\n"
            "docker compose run --rm kcat -L\n"
            "foldstream model add m \\\n  --promote\n"
            "```\n")
    assert [args for _, args in cli_invocations(text)] == [
        ["broker"], ["run", "--config", "a.toml"], ["model", "list"], ["retrain", "--now"],
        ["model", "add", "m", "--promote"]]


if __name__ == "__main__":
    print(skeleton())
