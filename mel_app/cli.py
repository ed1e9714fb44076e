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
    mel verify RUN                            # every checkpoint file against its recorded digest; exit 1 if damaged
    mel pin RUN@STEP [--remove]               # keep a checkpoint run.keep_checkpoints would prune (README)
    mel serve [--port 4200]                   # standalone Prefect server + process worker
    mel deploy [--run] [key=value ...]        # prefect.yaml's campaign deployment, optionally run it
    mel config show CONFIG [key=value ...] [--plain]   # the resolved config: values, help, [P]/[C], ranges, origins
    mel --version

--debug (before or after the command) shows the traceback of a failure.
"""

from __future__ import annotations

import argparse
import os
import sys

from mel_app import campaign_commands, config_commands, reader_commands, server_commands
from mel_app.common import UserSQLError

DEBUG_ENV = "MEL_DEBUG"
DISTRIBUTION = "mel"  # pyproject.toml's [project] name



def _exit_code(e: BaseException) -> int:
    """2: the input is wrong (config, data, a refused query, a store that is not mel's, a damaged or missing checkpoint); 1: the
    work failed."""
    from mel_core.config import ConfigError
    from mel_core.model.checkpoints import DamagedCheckpoint, MissingCheckpoint
    from mel_core.problems.sources import DataError
    from mel_core.run.fork import ForkError
    from mel_core.run.listing import RunsError
    from mel_core.run.lock import RunDirError, RunLocked
    from mel_core.run.refs import RunNotFound
    from mel_core.store.database import StoreError
    from mel_core.store.export import ExportError
    from mel_core.store.query_output import OutputError

    bad_input = (ConfigError, DataError, StoreError, RunLocked, RunDirError, UserSQLError, ExportError, OutputError,
                 RunsError, ForkError, RunNotFound, DamagedCheckpoint, MissingCheckpoint)
    return 2 if isinstance(e, bad_input) else 1



MAX_LINE = 400  # characters of an error line: a message that quotes hostile input (a 100,000-character value) is cut


def _one_line(e: BaseException) -> str:
    from mel_core.errors import PermanentError

    first = (str(e).strip().splitlines() or [""])[0]
    if len(first) > MAX_LINE:
        first = f"{first[:MAX_LINE]}... ({len(first) - MAX_LINE} more characters)"
    if isinstance(e, (PermanentError, UserSQLError)):
        return first
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class _Parser(argparse.ArgumentParser):
    """argparse's parser with usage errors in one line (argparse prints the whole usage above them): the line names
    the command and the argument, and where the usage is."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        self.exit(2, f"{self.prog}: error: {message}  (mel {command + ' ' if command else ''}--help for usage)\n")


def _version() -> str:
    """The installed distribution's version (pyproject.toml's [project] name and version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "(not installed: pip install -e .)"


def _debug_everywhere(sub: argparse._SubParsersAction) -> None:
    """--debug after the command too (`mel run --config x --debug`), as the one-line error's hint reads; on every
    subcommand, nested ones included. SUPPRESS: a subcommand that is not given --debug leaves `mel --debug`'s."""
    for parser in dict.fromkeys(sub.choices.values()):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help=f"show tracebacks (also: {DEBUG_ENV}=1)")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                _debug_everywhere(action)


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line on stderr (and an exit code); the traceback only with --debug or MEL_DEBUG=1.
    As the process's command (`argv` None: the `mel` script, `python -m mel_app.cli`), a failure ends the process
    here (:func:`_exit_after_failure`)."""
    code = _main(argv)
    if code != 0 and argv is None:
        _exit_after_failure(code)
    return code


def _exit_after_failure(code: int) -> None:
    """End the process after a failed command without the interpreter's teardown. A failed stage's exception (kept by
    the orchestrator's state, by tracebacks) still holds DuckDB objects at exit, and DuckDB's bindings (nanobind)
    then print ~45 lines of "nanobind: leaked instances" under the one error line. The exit handlers still run
    (shared store connections closed, verifier workers and servers stopped), the output is flushed; only the
    finalization of the modules, where those lines are printed, is skipped."""
    import atexit

    _flush()
    atexit._run_exitfuncs()
    _flush()
    os._exit(code)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader left
            pass


def _main(argv: list[str] | None) -> int:
    ap = _Parser(prog="mel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help=f"show tracebacks (also: {DEBUG_ENV}=1)")
    ap.add_argument("--version", action="version", version=f"mel {_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for commands in (campaign_commands, reader_commands, server_commands, config_commands):
        commands.register(sub)
    _debug_everywhere(sub)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `mel compare` prints and records its command line
    args.own_process = argv is None  # `mel` is this process's command: it may change the process (a reader's nice)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    _log_stage_failures()
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM where mel_app.interrupts handles it: 128 + the signal
        if debug:
            raise
        resumes = " (a campaign resumes where it stopped when run again)" if args.cmd in ("run", "compare") else ""
        print(f"mel: interrupted{resumes}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
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
