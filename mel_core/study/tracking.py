"""Experiment trackers (``logging.report_to``): TensorBoard, MLflow and W&B receive what the store already has.

Per step, the step's ``metrics`` rows as ``train/<name>`` and its stage seconds as ``time/<stage>``; per
evaluation, ``eval/<dataset>/<metric>`` at the evaluated step; once, the run config. Every tracker run is
named after the mel run id, so one campaign is one tracker run however often it is resumed:

- TensorBoard: event files in ``<run dir>/<logging.dir>/tensorboard/<run id>/`` (a resumed process adds a
  new event file to the same directory: TensorBoard reads them as one run);
- MLflow: the run tagged ``mel.run_id`` in ``logging.mlflow.experiment`` (found again on resume), in a SQLite
  store ``<run dir>/<logging.dir>/mlflow.db`` unless ``logging.mlflow.tracking_uri`` names another;
- W&B: run id = the mel run id, ``resume="allow"``, offline files under ``<run dir>/<logging.dir>/wandb/``.

A resumed campaign walks its finished steps again (each one a cache hit), so what each tracker received is
kept in a ledger, ``<run id>.logged.json`` beside them, written after the tracker has flushed: a step is never
logged twice, and a tracker added to a running campaign is backfilled with every step. A W&B step logged just
before a SIGKILL can be lost (W&B writes from a process of its own, with no flush to wait on); the other two
are written when the ledger is.

Each library is imported only when its tracker opens; a missing one is a ConfigError naming the key and the
pip install. A tracker that fails while logging is reported once and left out for the rest of the process:
a week-long campaign does not stop for its dashboard, and the ledger lets the next run backfill it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from mel_core.config import ConfigError, LoggingConfig
from mel_core.vocabulary import missing_tracker_package

_log = logging.getLogger("mel")

LEDGER_SUFFIX = ".logged.json"


def _import(tracker: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"config key 'logging.report_to': {missing_tracker_package(tracker) or e}") from e


# ------------------------------------------------------------------------------------- what is logged


def step_scalars(summary: dict) -> dict[str, float]:
    """A step summary (mel_core.study.summary.step_summary) -> tracker scalars: train/<metric>, time/<stage>."""
    out = {f"train/{k}": float(v) for k, v in summary.items()
           if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"time/{stage}": float(s) for stage, s in summary.get("stage_seconds", {}).items() if s is not None})
    return out


def eval_scalars(result: dict) -> dict[str, float]:
    """One evaluation manifest (mel_core.study.evaluation.evaluate) -> eval/<dataset>/<metric>."""
    return {f"eval/{result['dataset']}/{metric}": float(v) for metric, v in result["metrics"].items()}


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> dotted keys with JSON values (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str)
    return out


def mlflow_key(name: str) -> str:
    """MLflow's spelling of a metric name: it refuses '@' (pass@1 -> pass_at_1) and anything but letters, digits
    and _ - . space : /."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def step_key(step: int) -> str:
    return f"step:{step}"


def eval_key(step: int, dataset: str) -> str:
    return f"eval:{step}:{dataset}"


# ------------------------------------------------------------------------------------------ the ledger


class Ledger:
    """What each tracker has received: {tracker: sorted keys (config, step:N, eval:N:dataset)}, one JSON file
    replaced whole (temp file + rename) after every change."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            raw = {}
        except ValueError:  # a torn or foreign file: log everything again rather than refuse the campaign
            _log.warning("tracking ledger %s is unreadable; the trackers get every step again", self.path)
            raw = {}
        self._keys = {tracker: set(keys) for tracker, keys in raw.items()}

    def has(self, tracker: str, key: str) -> bool:
        return key in self._keys.get(tracker, ())

    def add(self, tracker: str, key: str) -> None:
        self._keys.setdefault(tracker, set()).add(key)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({t: sorted(k) for t, k in self._keys.items()}, indent=1))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------- the trackers


class TensorBoardTracker:
    def __init__(self, settings: LoggingConfig, run_id: str, root: Path):
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter  # torch's writer; needs the tensorboard package

        self.log_dir = root / "tensorboard" / run_id
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, sort_keys=True) + "\n```", 0)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, ok: bool) -> None:
        self.writer.close()


class MlflowTracker:
    RUN_TAG = "mel.run_id"
    PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch request

    def __init__(self, settings: LoggingConfig, run_id: str, root: Path):
        _import("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        for name in ("mlflow.store.db.utils", "alembic"):  # schema creation on the first open: not ours to print
            logging.getLogger(name).setLevel(logging.WARNING)
        local = settings.mlflow.tracking_uri == ""
        if local:
            root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'mlflow.db'}" if local else settings.mlflow.tracking_uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(settings.mlflow.experiment)
        if exp is None:  # a local store keeps its artifacts beside it, not in ./mlruns of the working directory
            exp_id = self.client.create_experiment(
                settings.mlflow.experiment, artifact_location=(root / "mlflow-artifacts").as_uri() if local else None)
        else:
            exp_id = exp.experiment_id
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{self.RUN_TAG}` = '{run_id}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_id, tags={self.RUN_TAG: run_id}).info.run_id

    def log_config(self, config: dict) -> None:
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), self.PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.PARAMS_PER_BATCH])
        self.client.log_dict(self.run_id, config, "config.json")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, ms, step) for k, v in scalars.items()])

    def flush(self) -> None:  # log_batch is synchronous
        pass

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


class WandbTracker:
    def __init__(self, settings: LoggingConfig, run_id: str, root: Path):
        wandb = _import("wandb", "wandb")
        root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.wandb.project, name=run_id, id=run_id, resume="allow", dir=str(root),
            mode=settings.wandb.mode, reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", save_code=False, disable_git=True,
                                    x_disable_stats=True))

    def log_config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def flush(self) -> None:  # W&B writes from its own process; there is nothing to wait on
        pass

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


OPENERS: dict[str, Callable[[LoggingConfig, str, Path], Any]] = {
    "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Tracking:
    """The trackers of ``logging.report_to`` for one run, behind one ledger. With no tracker configured every
    call does nothing."""

    def __init__(self, settings: LoggingConfig, run_id: str, run_dir: Path):
        self.root = Path(run_dir) / settings.dir
        self.ledger = Ledger(self.root / f"{run_id}{LEDGER_SUFFIX}")
        self.trackers: dict[str, Any] = {}
        try:
            for name in settings.report_to:
                self.trackers[name] = OPENERS[name](settings, run_id, self.root)
        except BaseException:
            self.close(ok=False)
            raise

    def log_config(self, config: dict) -> None:
        self._log("config", lambda t: t.log_config(config))

    def log_step(self, summary: dict) -> None:
        scalars = step_scalars(summary)
        self._log(step_key(summary["step"]), lambda t: t.log_scalars(summary["step"], scalars))

    def log_evals(self, results: list[dict]) -> None:
        for r in results:
            if r.get("step") is not None:
                self._log(eval_key(r["step"], r["dataset"]), lambda t, r=r: t.log_scalars(r["step"], eval_scalars(r)))

    def close(self, ok: bool = True) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                tracker.close(ok)
            except Exception as e:  # closing one must not keep the others open
                _log.warning("tracker %s failed to close: %s", name, (str(e).splitlines() or [""])[0][:200])
        self.trackers.clear()

    def _log(self, key: str, send: Callable[[Any], None]) -> None:
        changed = False
        for name, tracker in list(self.trackers.items()):
            if self.ledger.has(name, key):
                continue
            try:
                send(tracker)
                tracker.flush()
            except Exception as e:
                _log.warning("tracker %s failed (%s: %s); it gets no more data in this process, and the next "
                             "run of the campaign backfills it", name, type(e).__name__,
                             (str(e).splitlines() or [""])[0][:200])
                self.trackers.pop(name)
                try:
                    tracker.close(False)
                except Exception:
                    pass  # already reported as failed
                continue
            self.ledger.add(name, key)
            changed = True
        if changed:
            self.ledger.save()
