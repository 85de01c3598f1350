"""Write one benchmark's section of bench/RESULTS.md, leaving the other sections alone.

Each benchmark owns the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``;
a section that does not exist yet is appended.
"""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Written by the scripts in `bench/` (`make bench` runs them all). Numbers are medians of\n"
    "repeats measured side by side in one run on the machine named in each section; compare\n"
    "ratios, not absolute times, across machines.\n"
)


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def write_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    """Replace (or append) section ``name`` of ``path`` with ``markdown``."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    body = f"<!-- {name}:start -->\n{markdown.rstrip()}\n\n_Measured {stamp} on {machine()}._\n<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)
