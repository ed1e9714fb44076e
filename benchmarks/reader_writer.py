"""Readers never stall the writer: a campaign's step time with and without a concurrent 2-minute query.

Two campaigns of the same config (the embedded tiny model, `mel run` in a subprocess each): arm `alone`,
and arm `with_reader`, during which another process opens the run's store as `mel query` does
(mel_core.store.reader.StoreReader: the published snapshot, read-only) and keeps an analytic query running over
it for `--query-s` seconds: one analytic scan-and-join of the rollouts, sized on the store to last that long.
The campaign is pinned to core 0 and the reader to core 1 (each one thread), so the ratio measures what
the reader does to the writer through the store, not the two sharing a core.

Reported: mean seconds per step of each arm (from stage_runs), the ratio with/alone (goal <= 1.05), how
many stage executions failed or were retried in each arm (goal 0), and how long the reader held its
connection and how many of its queries finished. Before the snapshot design, such a query held the file
lock: a `sample` stage failed after 73.7 s ("Could not set lock on file") and was retried.

    python benchmarks/reader_writer.py [--steps 80] [--query-s 120]

With --hostile, the reader arm is `mel query` itself (a process per query, core 1, its default limits: 1GB, one
thread, 60 s), looping over three hostile queries until the campaign ends: a cross join, repeat('x', 2000000000)
and an unbounded recursive CTE. Reported as well: how each query ended (exit code, the line it printed, seconds).
Its section is "reader_writer.py --hostile".

    python benchmarks/reader_writer.py --hostile [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._doc import write_section  # noqa: E402
from mel_core.store.database import snapshot_path
from mel_core.store.reader import StoreReader

REPO = Path(__file__).resolve().parent.parent
READER = r"""
import sys, time
from mel_core.store import StoreReader
db, seconds = sys.argv[1], float(sys.argv[2])
SQL = ("SELECT count(*) AS n, sum(length(a.text) * length(b.text)) AS s FROM rollouts a "
       "JOIN rollouts b ON a.prompt_id = b.prompt_id CROSS JOIN range({k}) k WHERE (k.range + a.num_tokens) % 3 = 0")
t0 = time.monotonic(); done = 0
with StoreReader(db) as r:
    t = time.monotonic(); r.query(SQL.format(k=2000)); unit = time.monotonic() - t
    k = int(2000 * seconds / max(unit, 1e-3))  # one query sized to last the whole window, on this store
    while time.monotonic() - t0 < seconds:
        r.query(SQL.format(k=k))
        done += 1
print(f"held {time.monotonic() - t0:.1f} s, {done} query(ies) of ~{seconds:.0f} s", flush=True)
"""


HOSTILE = {  # what a careless or hostile `mel query` asks of a live campaign's store
    "repeat": "SELECT repeat('x', 2000000000) AS s",
    "cross join": ("SELECT count(*) AS n, sum(hash(a.text, b.text, k.range)) AS h FROM rollouts a CROSS JOIN "
                   "rollouts b CROSS JOIN range(1000000) k"),
    "recursive CTE": "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r",
}


def hostile_reader(db: Path, campaign_proc: subprocess.Popen, outcomes: list) -> None:
    """`mel query` (core 1, default limits) over HOSTILE, round after round, while the campaign runs; each outcome:
    (query, exit code, last stderr line, seconds)."""
    while campaign_proc.poll() is None:
        for name, sql in HOSTILE.items():
            if campaign_proc.poll() is not None:
                return
            t = time.monotonic()
            done = subprocess.run(["taskset", "-c", "1", sys.executable, "-m", "mel_app.cli", "query", "--db", str(db),
                                   sql], cwd=REPO, capture_output=True, text=True, check=False,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
            line = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or [""])[-1]
            outcomes.append((name, done.returncode, line, time.monotonic() - t))


def campaign(root: Path, name: str, steps: int) -> subprocess.Popen:
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "mel_app.cli", "run", "--config", "configs/tiny.yaml",
           f"run.name={name}", f"run.steps={steps}", f"run.root_dir={root}", "run.torch_threads=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MEL_VERIFY_WORKERS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def step_seconds(db: Path) -> tuple[float, int, int]:
    """(mean seconds per step over steps >= 2, failed or interrupted executions, stages executed more than once)."""
    with StoreReader(db) as r:
        per_step = r.query("SELECT step, sum(seconds) AS s FROM stage_runs WHERE status = 'completed' AND step >= 2 "
                           "GROUP BY step ORDER BY step")
        bad = r.query("SELECT count(*) AS n FROM stage_runs WHERE status != 'completed'")[0]["n"]
        again = r.query("SELECT count(*) AS n FROM (SELECT step, stage FROM stage_runs GROUP BY ALL "
                        "HAVING count(*) > 1)")[0]["n"]
    return sum(s["s"] for s in per_step) / len(per_step), bad, again


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--query-s", type=float, default=120.0)
    ap.add_argument("--hostile", action="store_true", help="the reader arm runs HOSTILE through `mel query`")
    args = ap.parse_args()
    if args.hostile:
        return main_hostile(args.steps)
    results = {}
    with tempfile.TemporaryDirectory(prefix="mel-rw-") as tmp:
        root = Path(tmp)
        for arm in ("alone", "with_reader"):
            proc = campaign(root, f"rw-{arm}", args.steps)
            db = root / f"rw-{arm}" / "mel.duckdb"
            reader_out = ""
            if arm == "with_reader":
                while not (snapshot_path(db).exists() and _has_rollouts(db)):
                    assert proc.poll() is None, proc.stdout.read()
                    time.sleep(0.5)
                reader = subprocess.run(["taskset", "-c", "1", sys.executable, "-c", READER, str(db),
                                         str(args.query_s)], cwd=REPO, capture_output=True, text=True,
                                        env=dict(os.environ, OMP_NUM_THREADS="1"))
                reader_out = reader.stdout.strip() or reader.stderr.strip()[-300:]
                alive_after_query = proc.poll() is None
            out = proc.communicate()[0]
            assert proc.returncode == 0, out[-3000:]
            mean, bad, again = step_seconds(db)
            results[arm] = {"mean": mean, "bad": bad, "again": again, "reader": reader_out}
            if arm == "with_reader":
                results[arm]["overlapped"] = not alive_after_query  # the query covered the rest of the campaign
            print(f"{arm}: {mean:.2f} s/step, failed/interrupted executions {bad}, stages run twice {again} "
                  f"{reader_out}", flush=True)
    ratio = results["with_reader"]["mean"] / results["alone"]["mean"]
    print(f"reader_writer_step_ratio: {ratio:.3f}")
    cmd = f"python benchmarks/reader_writer.py --steps {args.steps} --query-s {args.query_s:g}"
    write_section("reader_writer.py", cmd, [
        f"A {args.steps}-step tiny campaign (`mel run`, pinned to core 0, one thread), alone and with another "
        f"process (pinned to core 1) holding a reader connection to its store for {args.query_s:g} s, re-running an "
        f"analytic join over the rollouts. Step time = completed stage seconds per step, steps 2..{args.steps}.",
        "",
        "| arm | s/step | failed or interrupted stage executions | stages executed twice | reader |",
        "|---|---|---|---|---|",
        *[f"| {arm} | {r['mean']:.2f} | {r['bad']} | {r['again']} | {r['reader'] or '-'} |"
          for arm, r in results.items()],
        "",
        f"- **with reader / alone: {ratio:.3f}** (goal <= 1.05; the reader held its connection from step 1 to the "
        f"campaign's end: {results['with_reader'].get('overlapped')})",
        "- Readers open the snapshot the writer publishes after each committed stage (docs/DESIGN.md, \"The store\"), "
        "so no reader holds a lock the writer needs. Before this design a 73.7 s query made `sample` fail on "
        "\"Could not set lock on file\" and be retried.",
    ], "duckdb 2.0.0")


def main_hostile(steps: int) -> None:
    results, outcomes = {}, []
    with tempfile.TemporaryDirectory(prefix="mel-rw-") as tmp:
        root = Path(tmp)
        for arm in ("alone", "with_hostile_queries"):
            proc = campaign(root, f"rw-{arm}", steps)
            db = root / f"rw-{arm}" / "mel.duckdb"
            reader = None
            if arm == "with_hostile_queries":
                while not (snapshot_path(db).exists() and _has_rollouts(db)):
                    assert proc.poll() is None, proc.stdout.read()
                    time.sleep(0.5)
                reader = threading.Thread(target=hostile_reader, args=(db.parent, proc, outcomes))
                reader.start()
            out = proc.communicate()[0]
            if reader is not None:
                reader.join()
            assert proc.returncode == 0, out[-3000:]
            mean, bad, again = step_seconds(db)
            results[arm] = {"mean": mean, "bad": bad, "again": again}
            print(f"{arm}: {mean:.2f} s/step, failed/interrupted executions {bad}, stages run twice {again}", flush=True)
    for name, rc, line, seconds in outcomes:
        print(f"  {name}: exit {rc} after {seconds:.1f} s: {line}", flush=True)
    ratio = results["with_hostile_queries"]["mean"] / results["alone"]["mean"]
    print(f"reader_writer_hostile_step_ratio: {ratio:.3f}")
    write_section("reader_writer.py --hostile", f"nice -n 19 python benchmarks/reader_writer.py --hostile --steps {steps}", [
        (f"A {steps}-step tiny campaign (`mel run`, pinned to core 0, one thread), alone and while `mel query` (pinned "
         f"to core 1, its default limits: 1GB memory, one thread, 60 s) runs the hostile queries below one after "
         f"another until the campaign ends. Step time = completed stage seconds per step, steps 2..{steps}. Other "
         f"work shared the machine's 2 cores (niced; load average below): the ratio carries that noise."),
        "",
        "| arm | s/step | failed or interrupted stage executions | stages executed twice |",
        "|---|---|---|---|",
        *[f"| {arm} | {r['mean']:.2f} | {r['bad']} | {r['again']} |" for arm, r in results.items()],
        "",
        f"- **with hostile queries / alone: {ratio:.3f}** (goal <= 1.05)",
        "- How each query ended (exit code, seconds, the one line it printed):",
        "",
        "| query | exit | seconds | line |",
        "|---|---|---|---|",
        *[f"| {name} | {rc} | {seconds:.1f} | {line.replace('|', '/')} |" for name, rc, line, seconds in outcomes],
        "",
        "- The queries: " + "; ".join(f"{name}: `{sql}`" for name, sql in HOSTILE.items()),
    ], "duckdb 2.0.0")


def _has_rollouts(db: Path) -> bool:
    try:
        with StoreReader(db, lock_wait_s=1) as r:
            return r.query("SELECT count(*) AS n FROM rollouts")[0]["n"] > 0
    except Exception:
        return False


if __name__ == "__main__":
    main()
