"""`mel run`, `mel eval`, `mel gate`, `mel compare`: the commands that train or evaluate a policy."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mel_app.common import find_db, prefect_env
from mel_core.store import lineage, run_reads
from mel_core.study.ab_test import ARMS, DEFAULT_ARMS, command_line


def cmd_run(args) -> int:
    from mel_core import config as config_mod

    # Everything that can be refused is refused here, before Prefect starts or any file is created.
    cfg = config_mod.load(args.config, args.overrides)
    point = None
    if args.fork:  # the parent's checkpoint of that step, then the config with run.fork set
        from mel_core.run import fork as fork_mod
        point = fork_mod.find_fork_point(args.fork, cfg.run.root_dir)
        cfg = fork_mod.fork_config(args.config, args.overrides, point)
    preflight(cfg)
    prefect_env(args.verbose)
    from flows.campaign import campaign

    t0 = time.time()
    if point is not None:
        _announce_fork(point, cfg)
    first = point.step + 1 if point else 1
    print(f"mel: campaign '{cfg.run.name}' — steps {first}..{cfg.run.steps}, model {cfg.model.name_or_path}, "
          f"B={cfg.sampling.prompts_per_step} G={cfg.sampling.group_size}", flush=True)
    from mel_app.interrupts import stop_on_signals, temporary_server
    try:
        # the temporary Prefect server (none when PREFECT_API_URL is set) outside the terminal's process group, so
        # Ctrl-C stops the campaign, not the server it reports to; stopped when the campaign ends, however it ends
        with temporary_server(), stop_on_signals():
            result = campaign(config_mod.to_dict(cfg))
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (mel_app.interrupts): recorded, lock released, server gone
        return _interrupted(e, args)
    db = result["db"]
    from mel_core.store.reader import StoreReader
    with StoreReader(db) as store:
        hid = run_reads.latest_accepted_heuristic(store, result["run_id"])
        shown = run_reads.analysis_to_show(store, result["run_id"])
    if shown:
        _print_analysis(shown)
    print(f"\nmel: done in {time.time() - t0:.0f}s")
    _print_before_after(result["evals"])
    print(f"  DuckDB:      {db}")
    print(f"  checkpoints: {Path(result['final_checkpoint'].path).parent}")
    print(f"  final:       {result['final_checkpoint'].path}")
    print("Try:")
    print(f"  .venv/bin/mel query --db {db} \"SELECT * FROM step_summary ORDER BY step\"")
    print(f"  .venv/bin/mel report {result['run_dir']}")
    if hid:
        print(f"  .venv/bin/mel lineage --db {db} {hid}")
    else:
        print(f"  .venv/bin/mel query --db {db} \"SELECT status, reject_reason, count(*) FROM analyses GROUP BY ALL\"")
    if point is not None:  # what the final checkpoint learned, its parent's steps included
        print(f"  .venv/bin/mel lineage --db {db} --checkpoint {result['final_checkpoint'].checkpoint_id} --history")
    return 0



def preflight(cfg) -> None:
    """Everything a campaign of `cfg` can be refused for, checked before Prefect starts or any file is created (`mel
    run` and the Python API, mel.run): its dataset, its reward, its model, its run directory and store."""
    from mel_core.algorithm.rewards.verifier import Verifier, reward_kind_for_source
    from mel_core.problems.sources import load_problems
    from mel_core.run import lock
    from mel_core.step.runtime import run_dir_of

    load_problems(cfg.data)  # a missing, malformed or empty dataset is reported before Prefect starts
    Verifier.from_config(cfg.verify, reward_kind_for_source(cfg.data.source))  # and a reward plug-in that is not one
    if cfg.model.name_or_path != "tiny":  # a named model is fetched (once), a folder checked, before Prefect starts
        from mel_core.model import sources
        sources.resolve(cfg.model.name_or_path, cfg.run.cache_dir)
    run_dir = run_dir_of(cfg)
    held = lock.holder(run_dir)
    if held:
        raise lock.RunLocked(f"run directory {run_dir} is in use by another campaign: pid {held.get('pid')} on "
                                f"{held.get('host')}, started {held.get('started_at')}; wait for it to end, "
                                f"or stop it, then run again (it resumes)")
    lock.ensure_writable(run_dir)
    if (run_dir / "mel.duckdb").exists():  # a foreign or damaged store is named before Prefect starts
        from mel_core.store.database import verify_store
        verify_store(run_dir / "mel.duckdb")


def _interrupted(e: KeyboardInterrupt, args) -> int:
    """One line: where the signal stopped the campaign and how to resume it; 128 + the signal (130 for Ctrl-C,
    143 for SIGTERM)."""
    import shlex
    import signal

    from mel_core.run.executions import last_interrupted

    signum = getattr(e, "signum", signal.SIGINT)
    at = last_interrupted()
    where = f"in step {at[0]} ({at[1]})" if at else "between stages"
    print(f"mel: interrupted by {signal.Signals(signum).name} {where}; the run is recorded interrupted; resume it "
          f"(finished stages are reused): mel {shlex.join(args.argv)}", file=sys.stderr, flush=True)
    return 128 + signum


def _print_analysis(a: dict) -> None:
    """One analysis the policy wrote, in full, with what became of it: its parse, its replay, its verdict."""
    verdict = {"accepted": "accepted (its replay solved the problem)", "candidate": "parsed, not replayed yet"}.get(
        a["status"], f"rejected: {a['reject_reason']}")
    print(f"\nmel: one analysis the policy wrote (step {a['step']}, {a['analysis_id']}) -- {verdict}")
    print(f"  problem: {a['question']}  [gold {a['answer']}]")
    print("  --- the analysis, as generated " + ("(cut at the length limit)" if a["finish_reason"] == "length" else "")
          + " ---")
    print("\n".join("  | " + line for line in (a["raw_text"] or "").splitlines()))
    if a["parsed"]:
        print(f"  --- parsed: bifurcation step {a['bifurcation_step']}; heuristics:")
        for h in a["heuristics"] or []:
            print(f"      - {h}")
    for r in a["replays"] or []:
        print(f"  --- replay with M in context: reward {r['reward']:g} ({r['verify_reason']}, answer "
              f"{r['extracted_answer']!r}) ---")
        print("\n".join("  | " + line for line in (r["text"] or "").splitlines()))


def _print_before_after(evals: list[dict]) -> None:
    """Held-out greedy Pass@1 of the campaign's first and last evaluation, per dataset: did it learn?"""
    by_dataset: dict[str, list[dict]] = {}
    for e in evals:
        if "pass@1" in e["metrics"]:
            by_dataset.setdefault(e["dataset"], []).append(e)
    if not by_dataset:
        return
    print("  held-out greedy Pass@1, first -> last evaluation:")
    for dataset, rows in by_dataset.items():
        first, last = min(rows, key=lambda e: e["step"]), max(rows, key=lambda e: e["step"])
        change = last["metrics"]["pass@1"] - first["metrics"]["pass@1"]
        print(f"    {dataset:<20} {first['metrics']['pass@1']:.3f} (step {first['step']}) -> "
              f"{last['metrics']['pass@1']:.3f} (step {last['step']})   {100 * change:+.1f} points")



def _announce_fork(point, cfg) -> None:
    from mel_core import config as config_mod
    from mel_core.model.checkpoints import has_optimizer_state
    from mel_core.run.fork import config_changes

    changes = config_changes(point.config, config_mod.to_dict(cfg))
    optimizer = ("optimizer state" if has_optimizer_state(point.checkpoint_path) else
                 "fresh optimizer moments (the parent kept optimizer state only for its newest checkpoint: "
                 "run.keep_checkpoints)")
    print(f"mel: fork of run {point.run_name} ({point.run_id}) at step {point.step}: starts from its checkpoint "
          f"{point.checkpoint_id} and {optimizer}; the parent's steps 1..{point.step} are not copied", flush=True)
    print("mel:   changes: " + ("; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)
                                if changes else "none (the parent's config from that step on)"), flush=True)



def _checkpoint_db(args, as_path: Path) -> Path | None:
    """The DuckDB file that knows the checkpoint: --db, else the run directory holding a checkpoint path,
    else (for an id) the run under ./runs that recorded it."""
    if args.db:
        return find_db(args.db)
    if as_path.exists():
        return next((d / "mel.duckdb" for d in as_path.resolve().parents if (d / "mel.duckdb").exists()), None)
    return find_db(None, holds=lambda r: lineage.checkpoint(r, args.checkpoint) is not None)



def _find_checkpoint(db: Path, id_or_path: str, as_path: Path) -> dict | None:
    """The checkpoint's row in `db`, read in a frame of its own: a failed evaluation's traceback, which Prefect keeps
    for the life of the process, then holds no reader (DuckDB reports connections alive at exit, many lines)."""
    from mel_core.store.reader import StoreReader

    with StoreReader(db) as reader:
        return lineage.find_checkpoint(reader, id_or_path, str(as_path.resolve()))


def _in_a_run(as_path: Path, db: Path | None) -> bool:
    """Whether the checkpoint directory `as_path` is inside a run directory (a store beside its checkpoints, or the
    <run>/checkpoints/<hash>/step-NNNNN layout): its model and settings are that run's, never a default config's."""
    if not as_path.is_dir():
        return False
    if db is not None and as_path.resolve().is_relative_to(db.parent.resolve()):
        return True
    return len(as_path.resolve().parts) > 3 and as_path.resolve().parts[-3] == "checkpoints"


def cmd_eval(args) -> int:
    import json

    from mel_core import config as config_mod
    from mel_core.ids import make_id
    from mel_core.model.checkpoints import Checkpoint, checkpoint_problem
    from mel_core.step.runtime import get_runtime
    from mel_core.store.database import DB_FILE
    from mel_core.store.query_output import format_table
    from mel_core.study.evaluation import (
        SUITES,
        dataset_name,
        format_suite_table,
        load_dataset,
        metrics_by_dataset,
        suite_datasets,
    )

    # `--datasets a b key=value`: argparse hands the trailing overrides to --datasets; take them back.
    args.overrides = [d for d in args.datasets or [] if "=" in d] + args.overrides
    args.datasets = [d for d in args.datasets or [] if "=" not in d]
    as_path = Path(args.checkpoint)
    db = _checkpoint_db(args, as_path)
    row = _find_checkpoint(db, args.checkpoint, as_path) if db is not None else None
    if row is None and not as_path.is_dir():
        print(f"mel: {args.checkpoint} is neither a checkpoint directory nor a checkpoint id in {db}", file=sys.stderr)
        return 1
    if row and row.get("pruned_at") is not None:
        print(f"mel: checkpoint {row['checkpoint_id']} (step {row['step']}) was pruned at "
              f"{row['pruned_at']:%Y-%m-%d %H:%M:%S} by run.keep_checkpoints: its weights are deleted, its records "
              f"and evaluations remain; evaluate a kept step (mel verify {db.parent} lists them)", file=sys.stderr)
        return 2
    problem = checkpoint_problem(Path(row["path"]) if row else as_path)
    if problem:
        print(f"mel: {row['path'] if row else as_path} is not a checkpoint: {problem}", file=sys.stderr)
        return 2
    # One load: the run's own config (same model, prompts and data settings) unless --config names another, with the
    # run's directory as where the evaluations are written (the runtime's store is <root_dir>/<name>/mel.duckdb).
    run_config = json.loads(row["config_json"]) if row and row["config_json"] else None
    if run_config is None and not args.config and _in_a_run(as_path, db):
        print(f"mel: {args.checkpoint} is in a run directory whose store does not know it, so the config it was "
              f"trained with is unknown: pass --config FILE", file=sys.stderr)
        return 2
    where = []
    if db is not None:
        if db.name != DB_FILE:
            raise config_mod.ConfigError(f"--db: expected a run directory or its {DB_FILE}, got {db}")
        where = [f"run.root_dir={db.parent.parent.resolve()}", f"run.name={db.parent.name}"]
    base = run_config if not args.config else None
    cfg = config_mod.load(args.config or (None if base else "configs/tiny.yaml"), [*args.overrides, *where], base=base)
    if run_config is not None and args.config:
        from mel_core.run.fork import MODEL_KEYS, config_changes
        changed = [c for c in config_changes(run_config, config_mod.to_dict(cfg)) if c[0].startswith(MODEL_KEYS)]
        if changed:
            k, old, new = changed[0]
            print(f"mel: --config {args.config}: {k} is {new!r} here and {old!r} in the run the checkpoint belongs to "
                  f"({db.parent}): its weights are of that model; leave out --config to use the run's", file=sys.stderr)
            return 2
    chosen = f"the run's own, from {db}" if base else args.config or "configs/tiny.yaml"
    print(f"mel: config: {chosen}" + (" (the checkpoint belongs to no run; --config FILE chooses another)"
                                      if not base and not args.config else ""), flush=True)
    # --suite adds its benchmarks before any --datasets (both are evaluated; the table shows the suite's)
    datasets = (suite_datasets(args.suite, args.datasets or []) if args.suite else
                args.datasets or list(cfg.eval.datasets))
    if not datasets:
        raise config_mod.ConfigError("no datasets: pass --datasets or set eval.datasets")
    for d in datasets:  # a missing or malformed file fails here, before Prefect starts
        load_dataset(cfg, d)
    prefect_env(args.verbose)
    checkpoint = (Checkpoint(row["checkpoint_id"], row["path"]) if row else
                  Checkpoint(make_id("ckpt", "path", str(as_path.resolve())), str(as_path.resolve())))
    from flows.evaluate_checkpoint import evaluate_checkpoint

    print(f"mel: evaluating {checkpoint.checkpoint_id} ({checkpoint.path}) on {', '.join(datasets)}", flush=True)
    rt = get_runtime(cfg)
    evaluate_checkpoint(rt.handle, checkpoint, datasets, row["run_id"] if row else None, row["step"] if row else None)
    run_id = row["run_id"] if row else rt.run_id
    names = [dataset_name(d) for d in datasets]
    rows = run_reads.evaluation_results(rt.store, run_id, checkpoint.checkpoint_id, names)
    print(format_table(list(rows[0]) if rows else ["dataset"], [tuple(r.values()) for r in rows]))
    print(f"Failures: .venv/bin/mel query --db {rt.store.path} \"SELECT problem_id, answer, verify_reason, text "
          f"FROM eval_samples WHERE checkpoint_id = '{checkpoint.checkpoint_id}' AND greedy AND reward = 0 LIMIT 10\"")
    if args.suite:  # one line, named after the checkpoint's directory
        table = {Path(checkpoint.path).name: metrics_by_dataset(rows)}
        print("\n" + format_suite_table(table, cfg.eval.k, cfg.eval.temperature, SUITES[args.suite]))
    return 0



def cmd_gate(args) -> int:
    import json

    from mel_core import config as config_mod
    from mel_core.ids import make_id
    from mel_core.model.checkpoints import Checkpoint, checkpoint_problem
    from mel_core.step.runtime import get_runtime
    from mel_core.study import gate

    if args.probe_batches < 1 or args.probe_steps < 1:
        print("mel: --probe-batches and --probe-steps must be at least 1", file=sys.stderr)
        return 2
    cfg = config_mod.load(args.config, args.overrides)
    settings = gate.GateSettings(max_problems=args.problems, kappa_steps=args.kappa_steps,
                                 kappa_volume=args.kappa_volume, resamples=args.resamples, seed=args.seed)
    rt = get_runtime(cfg)
    gate.world_of(rt)  # a world the gate cannot measure is refused before the warm start
    if args.checkpoint:
        path = Path(args.checkpoint).resolve()
        problem = checkpoint_problem(path)
        if problem:
            print(f"mel: {args.checkpoint} is not a checkpoint: {problem}", file=sys.stderr)
            return 2
        ckpt = Checkpoint(make_id("ckpt", "path", str(path)), str(path))
    else:
        ckpt = rt.base_checkpoint  # the config's starting policy (the tiny warm start, built if needed)
    if args.probe:  # the per-part gradient probe instead of the gate's measurements (mel_core/study/probe.py)
        from mel_core.study import probe
        report = probe.run_probe(rt, ckpt, probe.ProbeSettings(
            batches=args.probe_batches, steps=args.probe_steps, max_problems=args.problems,
            resamples=args.resamples, seed=args.seed))
        report["command"] = command_line(args.argv)
        text = probe.format_probe(report)
    else:
        report = gate.run_gate(rt, ckpt, settings)
        report["command"] = command_line(args.argv)
        text = gate.format_gate(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2, sort_keys=True))
        print(f"mel: wrote {out} and {out.with_suffix('.json')}")
    return 0



def cmd_compare(args) -> int:
    from mel_core import config as config_mod
    from mel_core.study import ab_test

    command = ab_test.command_line(args.argv)
    print(f"mel: {command}", flush=True)
    cfg = config_mod.load(args.config, args.overrides)
    arms = ab_test.parse_arms(args.arms)
    ab_test.plan(cfg, args.name, args.seeds, arms)  # every arm's config validates before any work
    prefect_env(args.verbose)
    from flows.compare import compare
    from mel_app.interrupts import stop_on_signals, temporary_server
    with temporary_server(), stop_on_signals():  # as `mel run`: Ctrl-C or SIGTERM stop the arm's campaign cleanly
        report = compare(config_mod.to_dict(cfg), args.name, args.seeds, command, args.out, arms)
    print("\n" + ab_test.format_markdown(report))
    print(f"mel: wrote {report['markdown_path']} and {report['json_path']}")
    return 0


def cmd_pin(args) -> int:
    """Pin RUN@STEP's checkpoint against run.keep_checkpoints (or unpin it with --remove); without @STEP, list the
    run's pins."""
    from mel_core.run import fork, refs, retention

    if "@" not in args.spec:
        run_dir = refs.resolve_run(args.spec, args.root).db.parent
        pinned = retention.pins(run_dir)
        for cid, record in pinned.items():
            print(f"  step {record.get('step', '?'):>3}  {cid}  pinned by {record.get('by', '?')} at {record.get('at', '?')}")
        print(f"mel: {len(pinned)} pinned checkpoint{'s' if len(pinned) != 1 else ''} in {run_dir}")
        return 0
    ref, _, ckpt = fork.step_checkpoint(args.spec, args.root, what="mel pin")
    run_dir = ref.db.parent
    if args.remove:
        had = retention.unpin(run_dir, ckpt["checkpoint_id"])
        print(f"mel: {'unpinned' if had else 'was not pinned:'} the checkpoint of step {ckpt['step']} "
              f"({ckpt['checkpoint_id']}) of {run_dir}")
        return 0
    retention.pin(run_dir, ckpt["checkpoint_id"], ckpt["step"], by="mel pin")
    if not Path(ckpt["path"]).is_dir():  # pinned first, then checked: a pruning running now either kept it or is done
        retention.unpin(run_dir, ckpt["checkpoint_id"])
        print(f"mel: the checkpoint of step {ckpt['step']} ({ckpt['checkpoint_id']}) is gone from {ckpt['path']}: "
              f"pruned (or deleted) before it could be pinned", file=sys.stderr)
        return 2
    print(f"mel: pinned the checkpoint of step {ckpt['step']} ({ckpt['checkpoint_id']}) of {run_dir}: "
          f"run.keep_checkpoints keeps it as it is (mel pin --remove {args.spec} releases it)")
    return 0


def register(sub) -> None:
    """The subcommands of this module on `mel`'s parser."""
    r = sub.add_parser("run", help="run a MEL campaign")
    r.add_argument("--config", required=True, help="YAML config (see configs/)")
    r.add_argument("--fork", metavar="RUN@STEP",
                   help="start from the checkpoint and optimizer state RUN (a run directory, a name under "
                        "run.root_dir or a run id) had after STEP; steps STEP+1..run.steps run with this config, in a "
                        "run of its own")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=10")
    r.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs")
    r.set_defaults(fn=cmd_run)
    pn = sub.add_parser("pin", help="keep a checkpoint that run.keep_checkpoints would prune (RUN@STEP), release "
                                    "it (--remove), or list a run's pins (RUN)")
    pn.add_argument("spec", metavar="RUN@STEP", help="a run directory, run name or run id, then @ and a step; "
                                                    "without @STEP: list the run's pins")
    pn.add_argument("--remove", action="store_true", help="unpin it: retention may prune it after the next step")
    pn.add_argument("--root", default="runs", help="where run names are looked up (default: runs)")
    pn.set_defaults(fn=cmd_pin)
    ev = sub.add_parser("eval", help="evaluate a checkpoint: greedy Pass@1, Avg@k / Pass@k (no experience in context)")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint id (checkpoints table) or directory; rows go to the run that "
                                                       "holds it, else to the config's run")
    ev.add_argument("--datasets", nargs="+", help="'synthetic', 'synthetic:<subset>' and/or JSONL paths (default: eval.datasets)")
    ev.add_argument("--suite", help="a fixed benchmark list, then its table: 'paper' = AIME24, AIME25, AMC23, "
                                    "MATH-500, OlympiadBench in the paper's Table 1 layout; --datasets adds more "
                                    "(evaluated, not in the table)")
    ev.add_argument("--db", help="the run's DuckDB file or directory (default: the run holding the checkpoint)")
    ev.add_argument("--config", help="config to evaluate with (default: the checkpoint's run config, else tiny.yaml)")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.k=4 eval.max_problems=50")
    ev.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs")
    ev.set_defaults(fn=cmd_eval)
    gp = sub.add_parser("gate", help="before an A/B: can the policy discover its lessons (D) and do they reach "
                                     "the solver (kappa)? measured on an embedded world's held-out split")
    gp.add_argument("--config", required=True, help="the campaign config (e.g. configs/tiny-rules.yaml)")
    gp.add_argument("--checkpoint", help="checkpoint directory to measure (default: the config's starting policy)")
    gp.add_argument("--out", help="markdown report path; the numbers go to the same path with .json")
    gp.add_argument("--problems", type=int, default=0, help="held-out problems per subset (default: all)")
    gp.add_argument("--kappa-steps", type=int, default=3, help="MEL updates per kappa arm (default 3)")
    gp.add_argument("--kappa-volume", type=int, default=0,
                    help="lessons per kappa step (default: one per pair, MEL's volume at full acceptance)")
    gp.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per CI")
    gp.add_argument("--seed", type=int, default=0, help="seed of the gate's sampling and injected errors")
    gp.add_argument("--probe", action="store_true",
                    help="instead of the gate: the per-part gradient probe (cosines of s*, C, H and the RL batch "
                         "with the held-out weak-rule decisions' gradient, confirmed by optimizer steps per part)")
    gp.add_argument("--probe-batches", type=int, default=3, help="--probe: batch seeds (default 3)")
    gp.add_argument("--probe-steps", type=int, default=5, help="--probe: optimizer steps per part and batch (default 5)")
    gp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 loss.nll_coef=2")
    gp.set_defaults(fn=cmd_gate)
    cp = sub.add_parser("compare", help="A/B: GRPO vs MEL (and control arms) on identical data and seeds, "
                                        "with bootstrap CIs")
    cp.add_argument("--config", required=True, help="the shared config (every arm; see configs/)")
    cp.add_argument("--name", default="ab", help="runs are named <name>-<arm>-s<seed>")
    cp.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                    help=f"comma-separated arms, grpo always included: {', '.join(ARMS)} "
                         "(see mel_core/study/compare.py for what each changes)")
    cp.add_argument("--seeds", type=int, default=3, help="seeds per arm (run.seed, run.seed+1, ...)")
    cp.add_argument("--out", help="markdown report path; the numbers go to the same path with .json "
                                  "(default: <run.root_dir>/<name>-compare.md)")
    cp.add_argument("overrides", nargs="*", help="key=value overrides for both arms, e.g. run.steps=20")
    cp.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs")
    cp.set_defaults(fn=cmd_compare)
