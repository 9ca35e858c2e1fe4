"""Write one benchmark's results into its own section of docs/benchmarks.md.

Each benchmark owns a section between markers, so benchmarks run separately
(or by different people) never overwrite each other's results.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import platform
import re
import sys
from collections.abc import Iterator
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
PREAMBLE = """# Benchmarks

Measured by `make bench` (or `python -m bench.<name>`). Every figure is a ratio or
a side-by-side comparison measured in one run on the same machine. Benchmarks
never fail CI on a timing; the goals come from the issues.
"""


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def write_section(name: str, title: str, body_markdown: str, path: Path = DOC) -> None:
    """Replace (or append) the section `name` with `title` and `body_markdown`."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = f"{begin}\n## {title}\n\n_Run {stamp} on {machine()}._\n\n{body_markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else PREAMBLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table; floats printed with 3 significant digits."""

    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def recorded(name: str, title: str, intro: str = "") -> Iterator[None]:
    """Print as usual inside the block, and write what was printed (`intro` first) as the section
    `name` of docs/benchmarks.md once the block ends, unless BENCH_QUICK=1 (a smoke run)."""
    buffer = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            buffer.write(text)
            return sys.__stdout__.write(text) if sys.__stdout__ else len(text)

    with contextlib.redirect_stdout(Tee()):
        yield
    if os.environ.get("BENCH_QUICK") != "1":
        write_section(name, title, f"{intro.strip()}\n\n{buffer.getvalue()}" if intro else buffer.getvalue())
