"""`mel` — run a campaign, query and export the corpus, list runs, trace a heuristic's lineage, serve and
deploy campaigns.

    mel run --config configs/tiny.yaml [key=value ...]
    mel run --config configs/tiny.yaml --fork RUN@STEP [key=value ...]   # a new run from RUN's checkpoint of STEP
    mel query "SELECT ..." [--db runs/NAME/mel.duckdb] [--format table|csv|json|markdown] [--out FILE]
                                              # FILE: .csv, .json or .parquet
    mel export --db RUN --out DIR [--what rollouts,analyses,heuristics,lineage] [--accepted-only]
               [--format parquet|jsonl]       # files with lineage columns, for datasets / pyarrow
    mel runs [--root runs]                    # every run: status, steps, last checkpoint, held-out accuracy, parent
    mel lineage HEURISTIC_ID [--db ...]
    mel lineage --checkpoint ID [--history] [--db ...]   # what a checkpoint learned (with --history: and before it)
    mel rescore RUN [verify.key=value ...]     # re-score a run's rewards with another verifier, beside the old
    mel eval --checkpoint ID_OR_PATH [--datasets synthetic data/math500/test.jsonl ...] [key=value ...]
    mel eval --checkpoint ID_OR_PATH --suite paper [key=value ...]   # the paper's Table 1 benchmarks and layout
    mel gate --config configs/tiny-rules.yaml [--out F]   # D and kappa: can an A/B show anything here?
    mel compare --config configs/tiny.yaml [--name ab] [--seeds 3] [--arms grpo,mel,...] [key=value ...]   # A/B
    mel report RUN [--out DIR]                # markdown + PNG report of a run (name, id, dir or .duckdb)
    mel serve [--port 4200]                   # standalone Prefect server + process worker
    mel deploy [--run] [key=value ...]        # prefect.yaml's campaign deployment, optionally run it
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mel_app import serve
from mel_app.environment import prefect_environment
from mel_core import records
from mel_core.compare import ARMS, DEFAULT_ARMS, command_line


def _prefect_env(verbose: bool) -> None:
    """Prefect silent unless -v: mel prints its own one-line progress and failure lines (a failed stage logs one
    line through logger 'mel')."""
    prefect_environment(logging_level="INFO" if verbose else "CRITICAL")


def _find_db(arg: str | None) -> Path:
    """The store a reader command names (a file or a run directory), else the newest under ./runs."""
    from mel_core.store import MissingStore

    if arg:
        p = Path(arg)
        p = p / "mel.duckdb" if p.is_dir() else p
        if not p.is_file():
            raise MissingStore(f"no store at {p}")
        return p
    found = sorted(Path("runs").glob("*/mel.duckdb"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise MissingStore("no run found under ./runs; pass --db PATH")
    return found[-1]


def cmd_run(args) -> int:
    from mel_core import config as config_mod
    from mel_core import runlock
    from mel_core.data import load_problems
    from mel_core.runtime import run_dir_of

    # Everything that can be refused is refused here, before Prefect starts or any file is created.
    cfg = config_mod.load(args.config, args.overrides)
    point = None
    if args.fork:  # the parent's checkpoint of that step, then the config with run.fork set
        from mel_core import fork as fork_mod
        point = fork_mod.find_fork_point(args.fork, cfg.run.root_dir)
        cfg = fork_mod.fork_config(args.config, args.overrides, point)
    load_problems(cfg.data)  # a missing, malformed or empty dataset is reported before Prefect starts
    run_dir = run_dir_of(cfg)
    held = runlock.holder(run_dir)
    if held:
        raise runlock.RunLocked(f"run directory {run_dir} is in use by another campaign: pid {held.get('pid')} on "
                                f"{held.get('host')}, started {held.get('started_at')}; wait for it to end, "
                                f"or stop it, then run again (it resumes)")
    runlock.ensure_writable(run_dir)
    if (run_dir / "mel.duckdb").exists():  # a foreign or damaged store is named before Prefect starts
        from mel_core.store import verify_store
        verify_store(run_dir / "mel.duckdb")
    _prefect_env(args.verbose)
    from flows.campaign import campaign

    t0 = time.time()
    if point is not None:
        _announce_fork(point, cfg)
    first = point.step + 1 if point else 1
    print(f"mel: campaign '{cfg.run.name}' — steps {first}..{cfg.run.steps}, model {cfg.model.name_or_path}, "
          f"B={cfg.sampling.prompts_per_step} G={cfg.sampling.group_size}", flush=True)
    result = campaign(config_mod.to_dict(cfg))
    db = result["db"]
    from mel_core.store import StoreReader
    with StoreReader(db) as store:
        hid = records.latest_accepted_heuristic(store, result["run_id"])
    print(f"\nmel: done in {time.time() - t0:.0f}s")
    _print_before_after(result["evals"])
    print(f"  DuckDB:      {db}")
    print(f"  checkpoints: {Path(result['final_checkpoint']['path']).parent}")
    print(f"  final:       {result['final_checkpoint']['path']}")
    print("Try:")
    print(f"  .venv/bin/mel query --db {db} \"SELECT * FROM step_summary ORDER BY step\"")
    print(f"  .venv/bin/mel report {result['run_dir']}")
    if hid:
        print(f"  .venv/bin/mel lineage --db {db} {hid}")
    else:
        print(f"  .venv/bin/mel query --db {db} \"SELECT status, reject_reason, count(*) FROM analyses GROUP BY ALL\"")
    if point is not None:  # what the final checkpoint learned, its parent's steps included
        print(f"  .venv/bin/mel lineage --db {db} --checkpoint {result['final_checkpoint']['checkpoint_id']} --history")
    return 0


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
    from mel_core.fork import config_changes

    changes = config_changes(point.config, config_mod.to_dict(cfg))
    print(f"mel: fork of run {point.run_name} ({point.run_id}) at step {point.step}: starts from its checkpoint "
          f"{point.checkpoint_id} and optimizer state; the parent's steps 1..{point.step} are not copied", flush=True)
    print("mel:   changes: " + ("; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)
                                if changes else "none (the parent's config from that step on)"), flush=True)


def cmd_query(args) -> int:
    from mel_core import tabular
    from mel_core.store import StoreReader, check_read_only

    # Everything the user can get wrong is refused before any file is opened.
    check_read_only(args.sql)
    tabular.check_print_options(args.format, args.width)
    out_format = tabular.file_format(args.out) if args.out else None
    with StoreReader(_find_db(args.db)) as store:
        try:
            if out_format == "parquet":  # DuckDB's column types kept; the file is written here, not by DuckDB
                table = store.query_user_arrow(args.sql)
            else:
                cols, rows = store.query_user(args.sql)
        except duckdb_error() as e:  # SQL errors and refused operations are the user's to fix: say what DuckDB said
            raise UserSQLError(f"query failed: {str(e).splitlines()[0]}") from e
    if out_format is None:
        sys.stdout.write(tabular.format_rows(args.format, cols, rows, args.width))
        return 0
    if out_format == "parquet":
        tabular.write_parquet_file(args.out, table)
        n = table.num_rows
    else:
        text = (tabular.format_csv(cols, rows, bare_scalar=False) if out_format == "csv"
                else tabular.format_json(cols, rows))
        tabular.write_text_file(args.out, text)
        n = len(rows)
    print(f"mel: wrote {tabular.row_count(n)} to {args.out}")
    return 0


class UserSQLError(RuntimeError):
    """The user's SQL failed or asked for something a reader may not do."""


def duckdb_error():
    import duckdb
    return duckdb.Error


def cmd_lineage(args) -> int:
    from mel_core.store import StoreReader

    with StoreReader(_find_db(args.db)) as store:
        return _lineage(args, store)


def _lineage(args, store) -> int:
    if args.checkpoint:
        rows = records.checkpoint_heuristics(store, args.checkpoint)
        ck = records.checkpoint(store, args.checkpoint)
        if ck is None:
            print(f"mel: no checkpoint with id {args.checkpoint}", file=sys.stderr)
            return 1
        if args.history:
            return _checkpoint_history(store, args.checkpoint)
        print(f"checkpoint {args.checkpoint} (step {ck['step']}, parent {ck['parent_checkpoint_id']})\n"
              f"  {ck['path']}\n  internalized {len(rows)} heuristic(s):")
        for r in rows:
            print(f"    {r['heuristic_id']}  [step {r['heuristic_step']}]  {r['heuristic']}")
        return 0
    if not args.heuristic_id:
        print("mel: give a HEURISTIC_ID or --checkpoint ID", file=sys.stderr)
        return 2
    r = records.heuristic_lineage(store, args.heuristic_id)
    if r is None:
        print(f"mel: no heuristic with id {args.heuristic_id}", file=sys.stderr)
        return 1
    ind = lambda t: "\n".join("      " + ln for ln in (t or "").splitlines())
    status = {True: "accepted", False: "rejected", None: "not replayed"}[r["accepted"]]
    print(f"heuristic {r['heuristic_id']} ({status})\n    {r['heuristic']}")
    print(f"  from analysis {r['analysis_id']}: bifurcation step {r['bifurcation_step']}\n"
          f"    critique: {r['critique']}")
    if r["trained_text"]:  # exactly what an update learns (M*, then eos), given the analysis prompt
        trained = r["trained_text"] + (f"\n\n{r['abstract_trained_text']}" if r["abstract_trained_text"] else "")
        print(f"    trained text (M*, {r['trained_tokens']} tokens with eos):\n{ind(trained)}")
    print(f"  of pair {r['pair_id']}")
    print(f"    incorrect rollout {r['incorrect_rollout_id']}:\n{ind(r['incorrect_text'])}")
    print(f"    correct rollout {r['correct_rollout_id']}:\n{ind(r['correct_text'])}")
    print(f"  on prompt {r['prompt_id']} (problem {r['problem_id']}): {r['question']}  [gold {r['answer']}]")
    print(f"  written by policy version {r['policy_version_id']} at step {r['step']} of run {r['run_name']} ({r['run_id']})")
    if r["internalized_by_update"]:
        print(f"  internalized by update {r['internalized_by_update']} -> checkpoint {r['internalized_in_checkpoint']}")
    else:
        print("  not internalized (not accepted, or its update has not run)")
    return 0


def cmd_export(args) -> int:
    from mel_core import export

    what = export.parse_what(args.what)  # bad input is refused before any file is opened
    export.check_format(args.format)
    db = _find_db(args.db)
    done = export.export_run(db, args.out, what, args.accepted_only, args.format)
    kept = " (accepted analyses and heuristics, and their pairs' rollouts)" if args.accepted_only else ""
    print(f"mel: exported {db}{kept} to {args.out}")
    width = max(len(e.table) for e in done)
    for e in done:
        print(f"  {e.table.ljust(width)}  {e.rows:>8} rows  {e.path}")
    if args.format == "parquet":
        print(f"Load: datasets.load_dataset(\"parquet\", data_files=\"{done[-1].path}\")  or  "
              f"pyarrow.parquet.read_table(\"{done[-1].path}\")")
    return 0


def cmd_runs(args) -> int:
    from mel_core import runs
    from mel_core.tabular import format_table

    summaries, notes = runs.list_runs(args.root)
    if not summaries:
        print(f"mel: no runs under {args.root}/")
        return 0
    print(format_table(list(runs.COLUMNS), runs.as_rows(summaries), max_width=0))
    for note in notes:
        print(f"mel: unreadable: {note}", file=sys.stderr)
    return 0


def _checkpoint_history(store, checkpoint_id: str) -> int:
    """The checkpoint's history back to the base, across forks, and every heuristic internalized on it."""
    chain = records.checkpoint_chain(store, checkpoint_id)
    learned = records.checkpoint_history_heuristics(store, checkpoint_id)
    names = {r["run_id"]: r["name"] for r in store.query("SELECT run_id, name FROM runs")}
    print(f"checkpoint {checkpoint_id}: {len(chain)} checkpoints on its history, base first")
    for c in chain:
        print(f"  step {c['step']:>3}  {c['checkpoint_id']}  run {names.get(c['run_id'], '?')} ({c['run_id']})")
    print(f"  internalized {len(learned)} heuristic(s) on its history:")
    for r in learned:
        print(f"    {r['heuristic_id']}  [step {r['heuristic_step']}, run {names.get(r['heuristic_run_id'], '?')}, "
              f"in {r['internalized_in_checkpoint']}]  {r['heuristic']}")
    return 0


def cmd_rescore(args) -> int:
    from mel_core import rescore as rescore_mod
    from mel_core import runlock, runs
    from mel_core.store import Store, StoreReader

    rescore_mod.check_overrides(args.overrides)  # refused before any file is opened
    ref = runs.resolve_run(args.run, args.root)
    with StoreReader(ref.db) as reader:
        run_row = runs.pick_run(reader, ref)
    cfg = rescore_mod.rescore_config(run_row, args.overrides)
    run_dir = ref.db.parent
    held = runlock.holder(run_dir)
    if held:
        raise runlock.RunLocked(f"run directory {run_dir} is in use by a campaign: pid {held.get('pid')} on "
                                f"{held.get('host')}, started {held.get('started_at')}; rescore it once the campaign "
                                f"has ended (nothing was written)")
    with runlock.run_lock(run_dir, log=print):  # no campaign starts while the rewards are written
        store = Store(ref.db)
        done = rescore_mod.rescore(store, run_row, cfg)
        store.publish()
        _print_rescore(store, run_row, done, args.examples)
    return 0


def _print_rescore(store, run_row: dict, done, examples: int) -> None:
    from mel_core.rescore import describe_verifier
    from mel_core.tabular import format_table

    run_id, hashes = run_row["run_id"], done.hashes
    totals = records.rescore_totals(store, run_id, hashes)
    total, flipped = sum(t["rescored"] for t in totals), sum(t["flipped"] for t in totals)
    print(f"mel: rescored run {run_row['name']} ({run_id}): {total} rewards ({done.verified} verified now, "
          f"{done.already} already scored by this verifier)")
    for old in records.original_verifiers(store, run_id):
        what = (f"{old['verifier_hash']} ({old['kind']}, extraction {old['extraction']})" if old["verifier_hash"]
                else "not recorded (scored before verifier provenance)")
        print(f"  original: {what}: {old['n']} rewards")
    for v in done.verifiers.values():
        print(f"  new:      {describe_verifier(v)}")
    print("  the original rewards are untouched; the new version is in table rewards")
    print(f"\nflipped: {flipped} of {total} (down: 1 -> 0, up: 0 -> 1)")
    if totals:
        print(format_table(list(totals[0]), [tuple(t.values()) for t in totals]))
    flips = records.reward_flips(store, run_id, hashes, limit=examples)
    if flips:
        print(f"\nexamples (first {len(flips)}):")
        for f in flips:
            text = " ".join((f["text"] or "").split())
            print(f"  {f['record_kind']} {f['record_id']} ({f['problem_id']}, gold {f['answer']}): "
                  f"{f['old_reward']:g} -> {f['new_reward']:g}  {f['old_reason']} ({f['old_extracted']}) -> "
                  f"{f['new_reason']} ({f['new_extracted']})  {text[:80]!r}")
    changed = records.heuristic_acceptance_flips(store, run_id, hashes)
    lost = [h for h in changed if h["lost"]]
    print(f"\naccepted heuristics that would not have been accepted under the new verifier: {len(lost)}")
    for h in lost:
        print(f"  {h['heuristic_id']}  [step {h['step']}, replays correct {h['correct_before']} -> "
              f"{h['correct_after']} of {h['replays']}]  {h['heuristic']}")
    if len(changed) > len(lost):
        print(f"rejected heuristics that would have been accepted: {len(changed) - len(lost)}")
    new = ", ".join(repr(h) for h in hashes)
    print(f"\nCompare: .venv/bin/mel query --db {store.path} \"SELECT record_kind, problem_id, old_reward, new_reward, "
          f"old_reason, new_reason FROM reward_flips WHERE new_verifier_hash IN ({new})\"")


def cmd_serve(args) -> int:
    _prefect_env(verbose=False)
    try:
        return serve.serve(args.host, args.port, args.limit, dict(os.environ))
    except serve.ServeError as e:
        print(f"mel: {e}", file=sys.stderr)
        return 1


def cmd_deploy(args) -> int:
    from mel_core import config as config_mod

    if args.run:  # the deployed flow validates too; this fails before anything reaches the server
        config_mod.load(args.config, args.overrides)
    _prefect_env(verbose=False)
    url = args.api_url or os.environ.get("PREFECT_API_URL") or serve.api_url("127.0.0.1", serve.DEFAULT_PORT)
    if not serve.healthy(url):
        print(f"mel: no Prefect server at {url}; start one with `mel serve` or pass --api-url", file=sys.stderr)
        return 1
    try:
        serve.deploy(url, dict(os.environ))
    except serve.ServeError as e:
        print(f"mel: {e}", file=sys.stderr)
        return 1
    print(f"mel: deployed prefect.yaml's '{serve.DEPLOYMENT}' to {url} (work pool {serve.POOL})", flush=True)
    if not args.run:
        return 0
    os.environ["PREFECT_API_URL"] = url  # read when prefect is imported below
    from flows.deploy import trigger

    run = trigger(serve.DEPLOYMENT, args.config, args.overrides, args.timeout)
    print(f"mel: flow run {run.name} ({run.id}): {run.state.type.value}", flush=True)
    return 0 if run.state.is_completed() else 1


def cmd_report(args) -> int:
    from mel_core import report

    path = report.write_report(report.resolve_run(args.run, args.root), args.out, args.top)
    print(f"mel: report written to {path}")
    for png in sorted(path.parent.glob("*.png")):
        print(f"  {png}")
    return 0


def _checkpoint_db(args, as_path: Path) -> Path | None:
    """The DuckDB file that knows the checkpoint: --db, else the run directory holding a checkpoint path,
    else (for an id) the latest run under ./runs."""
    if args.db:
        return _find_db(args.db)
    if as_path.exists():
        return next((d / "mel.duckdb" for d in as_path.resolve().parents if (d / "mel.duckdb").exists()), None)
    return _find_db(None)


def cmd_eval(args) -> int:
    import json

    from mel_core import config as config_mod
    from mel_core.checkpoint_files import checkpoint_problem
    from mel_core.evaluate import (
        SUITES,
        dataset_name,
        format_suite_table,
        load_dataset,
        metrics_by_dataset,
        suite_datasets,
    )
    from mel_core.runtime import DB_FILE, get_runtime
    from mel_core.store import StoreReader, make_id
    from mel_core.tabular import format_table

    # `--datasets a b key=value`: argparse hands the trailing overrides to --datasets; take them back.
    args.overrides = [d for d in args.datasets or [] if "=" in d] + args.overrides
    args.datasets = [d for d in args.datasets or [] if "=" not in d]
    as_path = Path(args.checkpoint)
    db = _checkpoint_db(args, as_path)
    row = None
    if db is not None:
        with StoreReader(db) as reader:
            row = records.find_checkpoint(reader, args.checkpoint, str(as_path.resolve()))
    if row is None and not as_path.is_dir():
        print(f"mel: {args.checkpoint} is neither a checkpoint directory nor a checkpoint id in {db}", file=sys.stderr)
        return 1
    problem = checkpoint_problem(Path(row["path"]) if row else as_path)
    if problem:
        print(f"mel: {row['path'] if row else as_path} is not a checkpoint: {problem}", file=sys.stderr)
        return 2
    if args.config:
        cfg = config_mod.load(args.config, args.overrides)
    elif row and row["config_json"]:  # the run's own config: same model, prompts and data settings
        cfg = config_mod.load(overrides=args.overrides, base=json.loads(row["config_json"]))
    else:
        cfg = config_mod.load("configs/tiny.yaml", args.overrides)
    if db is not None:  # write next to the checkpoint's run: the runtime's store is <root_dir>/<name>/mel.duckdb
        if db.name != DB_FILE:
            raise config_mod.ConfigError(f"--db: expected a run directory or its {DB_FILE}, got {db}")
        cfg = config_mod.load(overrides=[f"run.root_dir={db.parent.parent.resolve()}", f"run.name={db.parent.name}"],
                              base=config_mod.to_dict(cfg))
    # --suite adds its benchmarks before any --datasets (both are evaluated; the table shows the suite's)
    datasets = (suite_datasets(args.suite, args.datasets or []) if args.suite else
                args.datasets or list(cfg.eval.datasets))
    if not datasets:
        raise config_mod.ConfigError("no datasets: pass --datasets or set eval.datasets")
    for d in datasets:  # a missing or malformed file fails here, before Prefect starts
        load_dataset(cfg, d)
    _prefect_env(args.verbose)
    checkpoint = ({"checkpoint_id": row["checkpoint_id"], "path": row["path"]} if row else
                  {"checkpoint_id": make_id("ckpt", "path", str(as_path.resolve())), "path": str(as_path.resolve())})
    from flows.evaluate import evaluate_checkpoint

    print(f"mel: evaluating {checkpoint['checkpoint_id']} ({checkpoint['path']}) on {', '.join(datasets)}", flush=True)
    evaluate_checkpoint(config_mod.to_dict(cfg), checkpoint, datasets, row["run_id"] if row else None,
                        row["step"] if row else None)
    rt = get_runtime(cfg)
    run_id = row["run_id"] if row else rt.run_id
    names = [dataset_name(d) for d in datasets]
    rows = records.evaluation_results(rt.store, run_id, checkpoint["checkpoint_id"], names)
    print(format_table(list(rows[0]) if rows else ["dataset"], [tuple(r.values()) for r in rows]))
    print(f"Failures: .venv/bin/mel query --db {rt.store.path} \"SELECT problem_id, answer, verify_reason, text "
          f"FROM eval_samples WHERE checkpoint_id = '{checkpoint['checkpoint_id']}' AND greedy AND reward = 0 LIMIT 10\"")
    if args.suite:  # one line, named after the checkpoint's directory
        table = {Path(checkpoint["path"]).name: metrics_by_dataset(rows)}
        print("\n" + format_suite_table(table, cfg.eval.k, cfg.eval.temperature, SUITES[args.suite]))
    return 0


def cmd_gate(args) -> int:
    import json

    from mel_core import config as config_mod
    from mel_core import gate
    from mel_core.checkpoint_files import checkpoint_problem
    from mel_core.runtime import Checkpoint, get_runtime
    from mel_core.store import make_id

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
    from mel_core import compare as compare_mod
    from mel_core import config as config_mod

    command = compare_mod.command_line(args.argv)
    print(f"mel: {command}", flush=True)
    cfg = config_mod.load(args.config, args.overrides)
    arms = compare_mod.parse_arms(args.arms)
    compare_mod.plan(cfg, args.name, args.seeds, arms)  # every arm's config validates before any work
    _prefect_env(args.verbose)
    from flows.compare import compare

    report = compare(config_mod.to_dict(cfg), args.name, args.seeds, command, args.out, arms)
    print("\n" + compare_mod.format_markdown(report))
    print(f"mel: wrote {report['markdown_path']} and {report['json_path']}")
    return 0


DEBUG_ENV = "MEL_DEBUG"


def _exit_code(e: BaseException) -> int:
    """2: the input is wrong (config, data, a refused query, a store that is not mel's); 1: the work failed."""
    from mel_core.config import ConfigError
    from mel_core.data import DataError
    from mel_core.export import ExportError
    from mel_core.fork import ForkError
    from mel_core.runlock import RunDirError, RunLocked
    from mel_core.runs import RunNotFound, RunsError
    from mel_core.store import StoreError
    from mel_core.tabular import OutputError

    bad_input = (ConfigError, DataError, StoreError, RunLocked, RunDirError, UserSQLError, ExportError, OutputError,
                 RunsError, ForkError, RunNotFound)
    return 2 if isinstance(e, bad_input) else 1


def _one_line(e: BaseException) -> str:
    from mel_core.errors import PermanentError

    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, (PermanentError, UserSQLError)):
        return first
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr (and an exit code); the traceback only with --debug or MEL_DEBUG=1."""
    ap = argparse.ArgumentParser(prog="mel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a MEL campaign")
    r.add_argument("--config", required=True, help="YAML config (see configs/)")
    r.add_argument("--fork", metavar="RUN@STEP",
                   help="start from the checkpoint and optimizer state RUN (a run directory, a name under "
                        "run.root_dir or a run id) had after STEP; steps STEP+1..run.steps run with this config, in a "
                        "run of its own")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run.steps=10")
    r.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs")
    r.set_defaults(fn=cmd_run)
    q = sub.add_parser("query", help="read-only SQL over a run's DuckDB file")
    q.add_argument("sql")
    q.add_argument("--db", help="DuckDB file or run directory (default: the latest under ./runs)")
    q.add_argument("--format", default="table", help="table (default), csv, json or markdown; only table cuts "
                                                     "wide cells (see --width), and says so")
    q.add_argument("--width", type=int, default=60, help="table: max characters per cell, 0 for no limit (default 60)")
    q.add_argument("--out", help="write the result to FILE instead: .csv, .json or .parquet, by its suffix")
    q.set_defaults(fn=cmd_query)
    ex = sub.add_parser("export", help="a run's rollouts, analyses, heuristics and lineage as Parquet or JSONL files")
    ex.add_argument("--db", help="DuckDB file or run directory (default: the latest under ./runs)")
    ex.add_argument("--out", required=True, help="directory for the files (created if missing; files replaced whole)")
    ex.add_argument("--what", default="", help="comma-separated: rollouts,analyses,heuristics,lineage (default: all)")
    ex.add_argument("--accepted-only", action="store_true",
                    help="only accepted analyses and heuristics, and the rollouts of their pairs")
    ex.add_argument("--format", default="parquet", help="parquet (default) or jsonl")
    ex.set_defaults(fn=cmd_export)
    rs = sub.add_parser("runs", help="every run under a root: status, steps, last checkpoint, held-out accuracy, parent")
    rs.add_argument("--root", default="runs", help="where the run directories are (default: runs)")
    rs.set_defaults(fn=cmd_runs)
    lg = sub.add_parser("lineage", help="where a heuristic came from and which checkpoint learned it")
    lg.add_argument("heuristic_id", nargs="?")
    lg.add_argument("--checkpoint", help="list every heuristic this checkpoint internalized instead")
    lg.add_argument("--history", action="store_true", help="with --checkpoint: every checkpoint before it (across "
                                                           "forks) and every heuristic internalized on the way")
    lg.add_argument("--db")
    lg.set_defaults(fn=cmd_lineage)
    rc = sub.add_parser("rescore", help="re-score a run's rollouts, replays and eval samples with another verifier "
                                        "(a new reward version beside the old) and print what flipped")
    rc.add_argument("run", help="run name (under --root), run id, run directory or DuckDB file")
    rc.add_argument("overrides", nargs="*", help="verify.* overrides of the run's own verify settings, e.g. "
                                                 "verify.extraction=boxed_last")
    rc.add_argument("--root", default="runs", help="where run names are looked up (default: runs)")
    rc.add_argument("--examples", type=int, default=5, help="flipped records printed (default: 5)")
    rc.set_defaults(fn=cmd_rescore)
    rp = sub.add_parser("report", help="markdown report with plots of a run (curves, evals, stage times, heuristics)")
    rp.add_argument("run", help="run name (under --root), run id, run directory or DuckDB file")
    rp.add_argument("--root", default="runs", help="where run names are looked up (default: runs)")
    rp.add_argument("--out", default=None, help="output directory (default: <run dir>/report)")
    rp.add_argument("--top", type=int, default=10, help="heuristic clusters listed (default: 10)")
    rp.set_defaults(fn=cmd_report)
    sv = sub.add_parser("serve", help="a standalone Prefect server and a process worker (state under ./.prefect)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=serve.DEFAULT_PORT)
    sv.add_argument("--limit", type=int, default=None,
                    help=f"most concurrent flow runs on pool {serve.POOL} (e.g. 1 per GPU host); default: no cap")
    sv.set_defaults(fn=cmd_serve)
    dp = sub.add_parser("deploy", help="create prefect.yaml's campaign deployment on a server; --run starts a run")
    dp.add_argument("--api-url", default=None,
                    help=f"the server's API (default: $PREFECT_API_URL, else mel serve's "
                         f"{serve.api_url('127.0.0.1', serve.DEFAULT_PORT)})")
    dp.add_argument("--run", action="store_true", help="then run it and wait for the end")
    dp.add_argument("--config", default="configs/tiny.yaml", help="the run's config (a path the worker can read)")
    dp.add_argument("--timeout", type=float, default=None, help="seconds to wait for the run (default: until it ends)")
    dp.add_argument("overrides", nargs="*", help="key=value overrides of the run")
    dp.set_defaults(fn=cmd_deploy)
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
    gp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 loss.nll_coef=2")
    gp.set_defaults(fn=cmd_gate)
    cp = sub.add_parser("compare", help="A/B: GRPO vs MEL (and control arms) on identical data and seeds, "
                                        "with bootstrap CIs")
    cp.add_argument("--config", required=True, help="the shared config (every arm; see configs/)")
    cp.add_argument("--name", default="ab", help="runs are named <name>-<arm>-s<seed>")
    cp.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                    help=f"comma-separated arms, grpo always included: {', '.join(ARMS)} "
                         "(see mel_core/compare.py for what each changes)")
    cp.add_argument("--seeds", type=int, default=3, help="seeds per arm (run.seed, run.seed+1, ...)")
    cp.add_argument("--out", help="markdown report path; the numbers go to the same path with .json "
                                  "(default: <run.root_dir>/<name>-compare.md)")
    cp.add_argument("overrides", nargs="*", help="key=value overrides for both arms, e.g. run.steps=20")
    cp.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs")
    cp.set_defaults(fn=cmd_compare)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `mel compare` prints and records its command line
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    _log_stage_failures()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("mel: interrupted (a campaign resumes where it stopped when run again)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`mel runs | head -3`): stop quietly, as cat does; stdout goes to
        # devnull so the interpreter's own flush at exit does not raise again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (redirected in-process)
            pass
        return 141
    except Exception as e:
        if debug:
            raise
        print(f"mel: {_one_line(e)}  (--debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return _exit_code(e)


def _log_stage_failures() -> None:
    """Lines of logger 'mel' (a stage that failed and will be retried or not) to stderr, one each."""
    import logging

    log = logging.getLogger("mel")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("mel: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
