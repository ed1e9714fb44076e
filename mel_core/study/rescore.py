"""Re-scoring a run's rewards with another verifier: `mel rescore RUN [verify.* overrides]`.

Every reward row (rollouts, replays, eval_samples) names the verifier that produced it (``verifier_hash``; the
``verifiers`` table holds each identity: kind, extraction, truncation rule, time limit, math-verify's version).
Re-scoring verifies the run's stored texts again with the run's own verify settings changed by the overrides and
writes each verdict to ``rewards``, keyed by (record id, verifier hash): a new reward version beside the original,
which stays where it is, untouched — training used it, and the comparison needs it. Rescoring again with the same
verifier verifies only what it has not scored yet, so it is idempotent and resumable.

The views compare the versions (mel_core.store.schema.REWARD_VIEWS): ``reward_flips`` (records whose reward changed),
``replay_acceptance`` and ``heuristic_acceptance_flips`` (which accepted heuristics would not have been accepted
under the new verifier: an accepted analysis whose own replays no longer pass the run's acceptance rule).

Rescoring writes through the store's writer and holds the run lock while it does (mel_core.run.lock): it is refused
while a campaign holds the run, and a campaign cannot start while it runs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

from mel_core import config as config_mod
from mel_core import ids
from mel_core.algorithm.rewards.verifier import Verifier, reward_kind_for_source
from mel_core.config import ConfigError, MelConfig
from mel_core.store import rescore_reads, stage_records
from mel_core.study import evaluation

RECORD_KINDS = ("rollout", "replay", "eval_sample")


@dataclass(frozen=True)
class Rescored:
    """What one rescoring did: the verifier per reward kind it used, and how many records it verified now or
    found already scored by that verifier."""
    verifiers: dict[str, Verifier]
    verified: int
    already: int

    @property
    def hashes(self) -> list[str]:
        return sorted({v.identity_hash for v in self.verifiers.values()})


def check_overrides(overrides: list[str]) -> None:
    """Only verify.* keys change what a verifier says; anything else is refused in one line."""
    for ov in overrides:
        key = ov.split("=", 1)[0].strip()
        if "=" not in ov or not key.startswith("verify."):
            raise ConfigError(f"override '{ov}': mel rescore takes verify.* overrides only (e.g. "
                              f"verify.extraction=boxed_last); the rest of the config is the run's own")


def rescore_config(run_row: dict, overrides: list[str]) -> MelConfig:
    """The run's stored config with the verify.* overrides applied (a bad value names its key)."""
    check_overrides(overrides)
    return config_mod.load(overrides=overrides, base=json.loads(run_row["config_json"]))


def reward_kind(record: dict, run_kind: str) -> str:
    """Rollouts and replays are of the run's training data; an evaluation sample is of its dataset."""
    if record["record_kind"] != "eval_sample":
        return run_kind
    return evaluation.reward_kind(record["dataset"])  # 'synthetic:stay' is the world's too, not math


def verdict_rows(todo: list[dict], verifiers: dict[str, Verifier], run_kind: str, run_id: str) -> list[dict]:
    """Verify each record with the verifier of its reward kind (one batched call per kind): `rewards` rows."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for r in todo:
        by_kind[reward_kind(r, run_kind)].append(r)
    created, rows = ids.now(), []
    for kind, group in sorted(by_kind.items()):
        verifier = verifiers[kind]
        verdicts = verifier.verify([r["text"] for r in group], [r["answer"] for r in group],
                                   [r["finish_reason"] for r in group], problems=group)
        rows += [{"record_id": r["record_id"], "verifier_hash": verifier.identity_hash, "record_kind": r["record_kind"],
                  "run_id": run_id, "reward": v.reward, "extracted_answer": v.extracted, "verify_reason": v.reason,
                  "created_at": created} for r, v in zip(group, verdicts)]
    return rows


def rescore(store, run_row: dict, cfg: MelConfig) -> Rescored:
    """Re-score every verified record of the run with `cfg.verify`; write the new versions to `rewards` (and the
    verifiers to `verifiers`) in one transaction. `store` is the writer (mel_core.store.writer.Store)."""
    run_kind = reward_kind_for_source(cfg.data.source)
    verifiers = {kind: Verifier.from_config(cfg.verify, kind) for kind in ("synthetic", "math")}
    stored = rescore_reads.records_to_rescore(store, run_row["run_id"])
    wanted = {reward_kind(r, run_kind) for r in stored}
    verifiers = {k: v for k, v in verifiers.items() if k in wanted}
    done = rescore_reads.rescored_ids(store, run_row["run_id"], [v.identity_hash for v in verifiers.values()])
    todo = [r for r in stored if (r["record_id"], verifiers[reward_kind(r, run_kind)].identity_hash) not in done]
    rows = verdict_rows(todo, verifiers, run_kind, run_row["run_id"])
    with store.transaction() as w:
        w.insert("verifiers", [stage_records.verifier_row(v) for v in verifiers.values()])
        w.insert("rewards", rows)
    return Rescored(verifiers, verified=len(rows), already=len(stored) - len(todo))


def describe_verifier(v: Verifier) -> str:
    """'1a2b3c… (math, extraction boxed_last, math-verify 0.9.0)' for the terminal."""
    identity = v.identity
    version = identity["packages"].get("math-verify")
    return (f"{v.identity_hash} ({identity['kind']}, extraction {identity['extraction']}, truncated_reward "
            f"{identity['truncated_reward']}" + (f", math-verify {version}" if version else "") + ")")
