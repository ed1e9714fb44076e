"""`mel query`, `mel lineage`, `mel export`, `mel runs`, `mel report`, `mel verify`, `mel rescore`: the commands that
read a run's store (its published snapshot, through a reader that cannot write), and `mel rescore`, which adds reward
versions."""

from __future__ import annotations

import argparse
import os
import sys

from mel_app.common import UserSQLError, find_db
from mel_core.store import lineage, rescore_reads, run_reads
from mel_core.store.reader import ReaderLimits


def cmd_query(args) -> int:
    from mel_core.store import query_output
    from mel_core.store.reader import StoreReader, check_read_only

    # Everything the user can get wrong is refused before any file is opened.
    check_read_only(args.sql)
    query_output.check_print_options(args.format, args.width)
    out_format = query_output.file_format(args.out) if args.out else None
    with StoreReader(find_db(args.db)) as store:  # bounded by the command's limits (_bounded)
        try:
            if out_format == "parquet":  # DuckDB's column types kept; the file is written here, not by DuckDB
                table = store.query_user_arrow(args.sql)
            else:
                cols, rows = store.query_user(args.sql)
        except duckdb_error() as e:  # SQL errors and refused operations are the user's to fix: say what DuckDB said
            raise UserSQLError(f"query failed: {str(e).splitlines()[0]}") from e
    if out_format is None:
        sys.stdout.write(query_output.format_rows(args.format, cols, rows, args.width))
        return 0
    with query_output.writing_out(f"--out {args.out}"):
        if out_format == "parquet":
            query_output.write_parquet_file(args.out, table)
            n = table.num_rows
        else:
            text = (query_output.format_csv(cols, rows, bare_scalar=False) if out_format == "csv"
                    else query_output.format_json(cols, rows))
            query_output.write_text_file(args.out, text)
            n = len(rows)
    print(f"mel: wrote {query_output.row_count(n)} to {args.out}")
    return 0






RUN_HELP = ("a run directory, its .duckdb file, a run name under ./runs or a run id (default: the newest run under "
            "./runs, named on stderr when there are several)")


def duckdb_error():
    import duckdb
    return duckdb.Error



def cmd_lineage(args) -> int:
    from mel_core.store.reader import StoreReader

    wanted = args.checkpoint or args.heuristic_id  # no --db: the run that knows this id, wherever it is under runs/
    holds = (lambda r: lineage.checkpoint(r, wanted) is not None) if args.checkpoint else \
        (lambda r: lineage.heuristic_lineage(r, wanted) is not None) if wanted else None
    with StoreReader(find_db(args.db, holds=holds)) as store:
        return _lineage(args, store)



def _lineage(args, store) -> int:
    if args.checkpoint:
        rows = lineage.checkpoint_heuristics(store, args.checkpoint)
        ck = lineage.checkpoint(store, args.checkpoint)
        if ck is None:
            print(f"mel: no checkpoint with id {args.checkpoint}", file=sys.stderr)
            return 1
        if args.history:
            return _checkpoint_history(store, args.checkpoint)
        pruned = (f" (pruned at {ck['pruned_at']:%Y-%m-%d %H:%M:%S} by run.keep_checkpoints: weights deleted)"
                  if ck.get("pruned_at") is not None else "")
        print(f"checkpoint {args.checkpoint} (step {ck['step']}, parent {ck['parent_checkpoint_id']})\n"
              f"  {ck['path']}{pruned}\n  internalized {len(rows)} heuristic(s):")
        for r in rows:
            print(f"    {r['heuristic_id']}  [step {r['heuristic_step']}]  {r['heuristic']}")
        return 0
    if not args.heuristic_id:
        print("mel: give a HEURISTIC_ID or --checkpoint ID", file=sys.stderr)
        return 2
    r = lineage.heuristic_lineage(store, args.heuristic_id)
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
    from mel_core.store import export

    what = export.parse_what(args.what)  # bad input is refused before any file is opened
    export.check_format(args.format)
    db = find_db(args.db)
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
    from mel_core.run import listing
    from mel_core.store.query_output import format_table

    summaries, notes = listing.list_runs(args.root)
    if not summaries:
        print(f"mel: no runs under {args.root}/")
        return 0
    print(format_table(list(listing.COLUMNS), listing.as_rows(summaries), max_width=0))
    for note in notes:
        print(f"mel: unreadable: {note}", file=sys.stderr)
    return 0



def _checkpoint_history(store, checkpoint_id: str) -> int:
    """The checkpoint's history back to the base, across forks, and every heuristic internalized on it."""
    chain = lineage.checkpoint_chain(store, checkpoint_id)
    learned = lineage.checkpoint_history_heuristics(store, checkpoint_id)
    names = run_reads.run_names(store)
    print(f"checkpoint {checkpoint_id}: {len(chain)} checkpoints on its history, base first")
    for c in chain:
        pruned = "  [pruned: weights deleted, records kept]" if c.get("pruned_at") is not None else ""
        print(f"  step {c['step']:>3}  {c['checkpoint_id']}  run {names.get(c['run_id'], '?')} ({c['run_id']}){pruned}")
    print(f"  internalized {len(learned)} heuristic(s) on its history:")
    for r in learned:
        print(f"    {r['heuristic_id']}  [step {r['heuristic_step']}, run {names.get(r['heuristic_run_id'], '?')}, "
              f"in {r['internalized_in_checkpoint']}]  {r['heuristic']}")
    return 0



def cmd_rescore(args) -> int:
    from mel_core.run import lock, refs
    from mel_core.store.reader import StoreReader
    from mel_core.store.writer import Store
    from mel_core.study import rescore as rescore_mod

    rescore_mod.check_overrides(args.overrides)  # refused before any file is opened
    ref = refs.resolve_run(args.run, args.root)
    with StoreReader(ref.db) as reader:
        run_row = refs.pick_run(reader, ref)
    cfg = rescore_mod.rescore_config(run_row, args.overrides)
    run_dir = ref.db.parent
    held = lock.holder(run_dir)
    if held:
        raise lock.RunLocked(f"run directory {run_dir} is in use by a campaign: pid {held.get('pid')} on "
                                f"{held.get('host')}, started {held.get('started_at')}; rescore it once the campaign "
                                f"has ended (nothing was written)")
    with lock.run_lock(run_dir, log=print):  # no campaign starts while the rewards are written
        store = Store(ref.db)
        done = rescore_mod.rescore(store, run_row, cfg)
        store.publish()
        _print_rescore(store, run_row, done, args.examples)
    return 0



def _print_rescore(store, run_row: dict, done, examples: int) -> None:
    from mel_core.store.query_output import format_table
    from mel_core.study.rescore import describe_verifier

    run_id, hashes = run_row["run_id"], done.hashes
    totals = rescore_reads.rescore_totals(store, run_id, hashes)
    total, flipped = sum(t["rescored"] for t in totals), sum(t["flipped"] for t in totals)
    print(f"mel: rescored run {run_row['name']} ({run_id}): {total} rewards ({done.verified} verified now, "
          f"{done.already} already scored by this verifier)")
    for old in rescore_reads.original_verifiers(store, run_id):
        what = (f"{old['verifier_hash']} ({old['kind']}, extraction {old['extraction']})" if old["verifier_hash"]
                else "not recorded (scored before verifier provenance)")
        print(f"  original: {what}: {old['n']} rewards")
    for v in done.verifiers.values():
        print(f"  new:      {describe_verifier(v)}")
    print("  the original rewards are untouched; the new version is in table rewards")
    down, up = sum(t["down"] for t in totals), sum(t["up"] for t in totals)
    print(f"\nflipped: {flipped} of {total} rewards ({down} went from 1 to 0, {up} from 0 to 1)")
    if totals:
        print(format_table(list(totals[0]), [tuple(t.values()) for t in totals]))
    flips = rescore_reads.reward_flips(store, run_id, hashes, limit=examples)
    if flips:
        print(f"\nexamples (first {len(flips)}):")
        for f in flips:
            text = " ".join((f["text"] or "").split())
            print(f"  {f['record_kind']} {f['record_id']} ({f['problem_id']}, gold {f['answer']}): "
                  f"{f['old_reward']:g} -> {f['new_reward']:g}  {f['old_reason']} ({f['old_extracted']}) -> "
                  f"{f['new_reason']} ({f['new_extracted']})  {text[:80]!r}")
    changed = rescore_reads.heuristic_acceptance_flips(store, run_id, hashes)
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



def cmd_report(args) -> int:
    from mel_core.study import report

    path = report.write_report(report.resolve_run(args.run, args.root), args.out, args.top)
    print(f"mel: report written to {path}")
    for png in sorted(path.parent.glob("*.png")):
        print(f"  {png}")
    return 0


def cmd_verify(args) -> int:
    """Every checkpoint file the store recorded, checked against its size and digest: one line per missing or damaged
    file, exit 1 if there is any."""
    from mel_core.model.checkpoints import damaged_files
    from mel_core.run import refs
    from mel_core.run.retention import step_ranges
    from mel_core.store.reader import StoreReader

    ref = refs.resolve_run(args.run, args.root)
    with StoreReader(ref.db) as store:
        checkpoints = lineage.checkpoints_with_files(store)
    pruned = [c for c in checkpoints if c["pruned_at"] is not None]  # retention deleted them: not missing
    recorded = [c for c in checkpoints if c["files"] and c["pruned_at"] is None]
    unrecorded = len(checkpoints) - len(recorded) - len(pruned)
    skipped = (f"; {unrecorded} checkpoint{'s' if unrecorded != 1 else ''} without recorded files (a base model, or "
               f"written before mel recorded them) not checked" if unrecorded else "")
    bad_files, bad_checkpoints = 0, 0
    for c in recorded:
        bad = damaged_files(c["path"], c["files"])
        for file, what in bad:
            print(f"{file}: {what} (checkpoint {c['checkpoint_id']}, step {c['step']})")
        bad_files, bad_checkpoints = bad_files + len(bad), bad_checkpoints + bool(bad)
    files = sum(len(c["files"]) for c in recorded)
    if pruned:
        print(f"mel: pruned by run.keep_checkpoints (weights deleted, records kept): step"
              f"{'s' if len(pruned) > 1 else ''} {step_ranges(c['step'] for c in pruned)}")
    stripped = [c for c in recorded if c["pruned_files"]]
    if stripped:
        print(f"mel: optimizer state pruned (weights kept): step{'s' if len(stripped) > 1 else ''} "
              f"{step_ranges(c['step'] for c in stripped)}")
    if bad_files:
        print(f"mel: {bad_files} of {files} files damaged or missing, in {bad_checkpoints} of {len(recorded)} "
              f"checkpoints of {ref.db}{skipped}", file=sys.stderr)
        return 1
    print(f"mel: {len(recorded)} checkpoints of {ref.db}, {files} files: all as they were written{skipped}")
    return 0


def _size(text: str) -> int:
    from mel_core.store.reader import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 for no limit)")
    return value


READER_NICE = 10  # a reader's default nice increment: behind the campaign for the CPU


def _add_limits(parser) -> None:
    """The reader limits' flags, the same on every command that reads a store (see _bounded)."""
    parser.add_argument("--memory-limit", type=_size, default=ReaderLimits.memory, metavar="SIZE",
                        help="memory a read may use, e.g. 4GB or 512MiB (default 1GB); past it the read stops with "
                             "one line saying so")
    parser.add_argument("--threads", type=_positive_int, default=ReaderLimits.threads,
                        help="DuckDB threads of the reader (default 1: a reader leaves the cores to the campaign)")
    parser.add_argument("--time-limit", type=_seconds, default=ReaderLimits.seconds, metavar="SECONDS",
                        help=f"seconds a read may run before it is stopped, with one line saying so (default "
                             f"{ReaderLimits.seconds:g}; 0 for none)")
    parser.add_argument("--nice", type=int, default=READER_NICE, metavar="N",
                        help=f"CPU priority of the reader below the campaign's (default +{READER_NICE}: a reader that "
                             f"computes for its whole time limit takes little of a core a campaign needs; 0 = as "
                             f"started)")


def _bounded(fn):
    """`fn` (a command) with every store reader it opens under the limits of its flags: one code path for all
    reader commands (mel_core.store.reader.bounded_readers)."""
    def command(args) -> int:
        from mel_core.store.reader import bounded_readers

        limits = ReaderLimits(memory=args.memory_limit, threads=args.threads, seconds=args.time_limit)
        if args.nice > 0 and getattr(args, "own_process", False):  # never the caller's process (tests, the API)
            os.nice(args.nice)
        with bounded_readers(limits):
            return fn(args)
    return command


def _reader_command(sub, name: str, fn, **kwargs):
    """A subcommand that reads stores: its parser, with the reader limits' flags, running `fn` under them."""
    parser = sub.add_parser(name, **kwargs)
    _add_limits(parser)
    parser.set_defaults(fn=_bounded(fn))
    return parser


def register(sub) -> None:
    """The subcommands of this module on `mel`'s parser."""
    q = _reader_command(sub, "query", cmd_query, help="read-only SQL over a run's DuckDB file")
    q.add_argument("sql")
    q.add_argument("--db", metavar="RUN", help=RUN_HELP)
    q.add_argument("--format", default="table", help="table (default), csv, json or markdown; only table cuts "
                                                     "wide cells (see --width), and says so")
    q.add_argument("--width", type=int, default=60, help="table: max characters per cell, 0 for no limit (default 60)")
    q.add_argument("--out", help="write the result to FILE instead: .csv, .json or .parquet, by its suffix")
    ex = _reader_command(sub, "export", cmd_export,
                         help="a run's rollouts, analyses, heuristics and lineage as Parquet or JSONL files")
    ex.add_argument("--db", metavar="RUN", help=RUN_HELP)
    ex.add_argument("--out", required=True, help="directory for the files (created if missing; files replaced whole)")
    ex.add_argument("--what", default="", help="comma-separated: rollouts,analyses,heuristics,lineage (default: all)")
    ex.add_argument("--accepted-only", action="store_true",
                    help="only accepted analyses and heuristics, and the rollouts of their pairs")
    ex.add_argument("--format", default="parquet", help="parquet (default) or jsonl")
    rs = _reader_command(sub, "runs", cmd_runs,
                         help="every run under a root: status, steps, last checkpoint, held-out accuracy, parent")
    rs.add_argument("--root", default="runs", help="where the run directories are (default: runs)")
    lg = _reader_command(sub, "lineage", cmd_lineage, help="where a heuristic came from and which checkpoint learned it")
    lg.add_argument("heuristic_id", nargs="?")
    lg.add_argument("--checkpoint", help="list every heuristic this checkpoint internalized instead")
    lg.add_argument("--history", action="store_true", help="with --checkpoint: every checkpoint before it (across "
                                                           "forks) and every heuristic internalized on the way")
    lg.add_argument("--db", metavar="RUN", help="a run directory, its .duckdb, a run name under ./runs or a run id "
                    "(default: the run under ./runs that knows the id asked about)")
    rc = sub.add_parser("rescore", help="re-score a run's rollouts, replays and eval samples with another verifier "
                                        "(a new reward version beside the old) and print what flipped")
    rc.add_argument("run", help="run name (under --root), run id, run directory or DuckDB file")
    rc.add_argument("overrides", nargs="*", help="verify.* overrides of the run's own verify settings, e.g. "
                                                 "verify.extraction=boxed_last")
    rc.add_argument("--root", default="runs", help="where run names are looked up (default: runs)")
    rc.add_argument("--examples", type=int, default=5, help="flipped records printed (default: 5)")
    rc.set_defaults(fn=cmd_rescore)
    vf = _reader_command(sub, "verify", cmd_verify,
                         help="check every checkpoint file of a run against the size and digest recorded when it was "
                              "written: one line per damaged or missing file, exit 1 if any")
    vf.add_argument("run", help="run directory, run name (under --root), run id or DuckDB file")
    vf.add_argument("--root", default="runs", help="where run names are looked up (default: runs)")
    rp = _reader_command(sub, "report", cmd_report,
                         help="markdown report with plots of a run (curves, evals, stage times, heuristics)")
    rp.add_argument("run", help="run name (under --root), run id, run directory or DuckDB file")
    rp.add_argument("--root", default="runs", help="where run names are looked up (default: runs)")
    rp.add_argument("--out", default=None, help="output directory (default: <run dir>/report)")
    rp.add_argument("--top", type=int, default=10, help="heuristic clusters listed (default: 10)")
