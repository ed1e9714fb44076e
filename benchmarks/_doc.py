"""What every benchmark shares: a one-line description of the machine, and its section of docs/BENCHMARKS.md.

Each script owns one ``## <script name>`` section and rewrites only that one, so the file keeps every
benchmark's latest numbers with the command that produced them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
DOC_HEADER = "# Benchmarks\n\nBenchmarks — each section: the command, the machine, the numbers.\n"


def machine(*versions: str) -> str:
    """Cores, CPU model, memory, OS and Python, plus any `versions` ("duckdb 2.0.0") the caller adds."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    parts = [f"{cores} cores ({cpu})", f"{mem} RAM", f"{platform.system()} {platform.release()}",
             f"Python {platform.python_version()}", *versions]
    return ", ".join(parts)


def load_average() -> str:
    """1/5/15-minute load: other work sharing the cores makes absolute timings pessimistic."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def update_doc(name: str, section: str, doc: Path = DOC) -> None:
    """Replace the ``## <name>`` section of `doc` (or append it), leaving every other section alone."""
    text = doc.read_text() if doc.exists() else DOC_HEADER
    pattern = re.compile(rf"^## {re.escape(name)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip() + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip() + "\n")


def write_section(name: str, command: str, lines: list[str], *versions: str, doc: Path = DOC) -> None:
    """The standard section: heading, the command in a code block, machine and date, then `lines`."""
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"## {name}", "", "```bash", command, "```", "",
            f"- Machine: {machine(*versions)}", f"- Date: {when}; load average at the end {load_average()}", "",
            *lines]
    update_doc(name, "\n".join(body), doc)
