"""Wall time and peak memory of the demo: what `make demo` runs, fresh (warm start included) and cached.

`make demo` is `make setup` followed by `mel run --config configs/tiny-rules.yaml`. This script times the
`mel run` part twice in a scratch directory — once with an empty model cache (the first run on a new
machine: tokenizer, warm start, campaign) and once with the cache it just built — and, with
--with-setup, `make setup` into a fresh virtual environment as well. Peak memory is the largest
resident set of any process of the run (the campaign, its temporary Prefect server, verify workers).

    .venv/bin/python benchmarks/demo.py [--with-setup]

Goals (issue 5): ≤ 10 minutes and ≤ 3 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._doc import REPO, write_section  # noqa: E402

TIME = "/usr/bin/time"
DEMO_CONFIG = "configs/tiny-rules.yaml"  # what `make demo` runs (Makefile)


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GB of the largest process, output) of a command run under GNU time."""
    t0 = time.perf_counter()
    proc = subprocess.run([TIME, "-v", *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, peak_kb / 2**20, proc.stdout


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--with-setup", action="store_true", help="also time `make setup` into a new venv")
    ap.add_argument("--no-doc", action="store_true")
    a = ap.parse_args(argv)
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} (GNU time) is needed to read the peak memory")
    env = dict(os.environ, PREFECT_HOME=str(REPO / ".prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1")
    mel = str(REPO / ".venv" / "bin" / "mel")
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="mel-demo-bench-") as d:
        d = Path(d)
        if a.with_setup:
            subprocess.run(["git", "clone", "-q", str(REPO), str(d / "clone")], check=True)
            res["setup_s"], _, _ = timed(["make", "setup"], d / "clone", env)
            print(f"make setup (fresh venv): {res['setup_s']:.0f}s", flush=True)
        for label in ("fresh", "cached"):
            cmd = [mel, "run", "--config", str(REPO / DEMO_CONFIG), f"run.root_dir={d / label / 'runs'}",
                   f"run.cache_dir={d / 'cache'}"]
            wall, peak, out = timed(cmd, REPO, env)
            res[f"{label}_s"], res[f"{label}_peak_gb"] = wall, peak
            steps = [ln for ln in out.splitlines() if ln.startswith("step ")]
            res[f"{label}_steps"] = steps
            lines_out = out.splitlines()
            start = next((i for i, ln in enumerate(lines_out) if "first -> last evaluation" in ln), len(lines_out))
            res[f"{label}_end"] = [ln for ln in lines_out[start:] if ln.startswith("    ")][:8]
            print(f"mel run ({label} model cache): {wall:.0f}s, peak RSS {peak:.2f} GB, {len(steps)} steps", flush=True)
    total = res["fresh_s"] + res.get("setup_s", 0.0)
    if not a.no_doc:
        cmd = ".venv/bin/python benchmarks/demo.py" + "".join(" " + x for x in (argv or sys.argv[1:]))
        lines = [
            f"`make demo` = `make setup` + `mel run --config {DEMO_CONFIG}` (the rules world: 60 steps, B=16, G=8, "
            "held-out evaluation every 10 steps).", "",
            "| phase | wall | peak RSS |", "|---|---|---|",
        ]
        if "setup_s" in res:
            lines.append(f"| make setup, new venv (pip installs torch + pinned stack) | {res['setup_s']:.0f} s | — |")
        lines += [f"| mel run, empty model cache (tokenizer + warm start + campaign) | {res['fresh_s']:.0f} s | "
                  f"{res['fresh_peak_gb']:.2f} GB |",
                  f"| mel run, cached warm start (the second `make demo`) | {res['cached_s']:.0f} s | "
                  f"{res['cached_peak_gb']:.2f} GB |", "",
                  f"- **first `make demo` on a new machine: {total / 60:.1f} min** "
                  f"{'(setup included)' if 'setup_s' in res else '(setup not measured: run with --with-setup)'}; "
                  f"goal ≤ 10 min; peak {max(res['fresh_peak_gb'], res['cached_peak_gb']):.2f} GB (goal ≤ 3 GB)",
                  "", "Per-step lines and the end of the cached run:", "", "```", *res["cached_steps"],
                  *res["cached_end"], "```"]
        write_section("demo.py", cmd, lines)
    print(f"demo_first_run_minutes: {total / 60:.2f}")
    return res


if __name__ == "__main__":
    main()
