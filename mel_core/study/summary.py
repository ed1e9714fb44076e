"""Per-step summaries read back from the store: what `mel run` prints and the flows return."""

from __future__ import annotations

from mel_core.store import run_reads
from mel_core.store.writer import Store
from mel_core.vocabulary import STAGES


# What the analyses of a step's pairs record (diagnose, abstract, replay), under the step of the pairs.
EXPERIENCE_METRICS = ("analyses", "diagnosed", "truncated", "retro_shortened", "retro_skipped", "candidates",
                      "abstract_truncated", "accepted", "retention_ratio", "replay_passed", "transfer_rejected")
EXPERIENCE_STAGES = ("diagnose", "abstract", "replay")


def step_summary(store: Store, run_id: str, step: int, experience_step: int | None = None) -> dict:
    """Metrics of one step plus seconds per stage (latest completed execution of each). With `experience_step`
    (orchestration.overlap: the step whose meta-experience this step's update trained on), the experience metrics
    and the abstract and replay seconds are that step's: what this step's flow ran and its update learned from."""
    metrics = run_reads.step_metrics(store, run_id, step)
    seconds = run_reads.stage_seconds_of_step(store, run_id, step)
    if experience_step is not None and experience_step != step:
        metrics = {k: v for k, v in metrics.items() if k not in EXPERIENCE_METRICS}
        seconds = {k: v for k, v in seconds.items() if k not in EXPERIENCE_STAGES}
        earlier = run_reads.step_metrics(store, run_id, experience_step)
        if earlier:
            metrics.update({k: v for k, v in earlier.items() if k in EXPERIENCE_METRICS},
                           experience_step=experience_step)
            seconds.update({k: v for k, v in run_reads.stage_seconds_of_step(store, run_id, experience_step).items()
                            if k in EXPERIENCE_STAGES})
    return {"step": step, **metrics, "stage_seconds": seconds}


def format_step(s: dict) -> str:
    g = lambda k, fmt="{:.0f}": fmt.format(s[k]) if s.get(k) is not None else "-"
    secs = s.get("stage_seconds", {})
    stage_part = " ".join(f"{st}={secs[st]:.1f}" for st in STAGES if st in secs)
    lagged = f" (of step {s['experience_step']})" if s.get("experience_step") not in (None, s["step"]) else ""
    return (f"step {s['step']:>3} | reward {g('reward_mean', '{:.3f}')} | mixed {g('mixed_groups')}/{g('groups')} "
            f"| analyses {g('analyses')} | accepted {g('accepted')}{lagged} "
            f"| retention {g('retention_ratio', '{:.2f}')} "
            f"| nll {g('nll_loss', '{:.3f}')} | s/stage {stage_part}")


# A campaign whose first this-many steps hold no mixed group says so once (no_signal_warning).
NO_SIGNAL_STEPS = 5


def no_signal_warning(summaries: list[dict], steps: int = NO_SIGNAL_STEPS) -> str | None:
    """The campaign's one line when its first `steps` step summaries hold no mixed group (every group's rollouts
    all scored alike, so there is no pair to analyse and no GRPO advantage): at the `steps`-th summary only, so it
    is said once; None otherwise."""
    if steps < 1 or len(summaries) != steps or any(s.get("mixed_groups") for s in summaries):
        return None
    rewards = [s["reward_mean"] for s in summaries if s.get("reward_mean") is not None]
    scored = ("every rollout scored 0" if rewards and max(rewards) == 0 else
              "every rollout scored 1" if rewards and min(rewards) == 1 else "every group scored all alike")
    return (f"mel: no mixed groups in {steps} steps: MEL has nothing to analyse ({scored}); check the reward "
            f"(verify.reward, data.answer_field) or start from a policy that solves some of the problems")


def acceptance(summaries: list[dict]) -> tuple[int, int]:
    """(accepted, candidates) summed over the steps (a GRPO-only step has neither: counted as 0)."""
    return (int(sum(s.get("accepted") or 0 for s in summaries)),
            int(sum(s.get("candidates") or 0 for s in summaries)))


def base_and_last(evals: list[dict]) -> list[dict]:
    """Per dataset and metric: the value at the earliest evaluated step (the base, step 0) and at the latest,
    from evaluation manifests (mel_core.study.evaluation.evaluate) of one campaign."""
    by: dict[tuple[str, str], dict[int, float]] = {}
    for e in evals:
        if e.get("step") is None:
            continue
        for metric, value in e["metrics"].items():
            by.setdefault((e["dataset"], metric), {})[e["step"]] = value
    rows = []
    for (dataset, metric), at in sorted(by.items()):
        first, last = min(at), max(at)
        rows.append({"dataset": dataset, "metric": metric, "base_step": first, "base": at[first],
                     "last_step": last, "last": at[last]})
    return rows


def campaign_markdown(name: str, run_id: str, summaries: list[dict], evals: list[dict]) -> str:
    """The end-of-campaign summary: held-out accuracy, base vs last evaluation, and acceptance over the campaign."""
    lines = [f"## Campaign `{name}`", "", f"Run `{run_id}`, {len(summaries)} steps.", "", "### Held-out accuracy", ""]
    rows = base_and_last(evals)
    if rows:
        lines += ["| dataset | metric | base | last | change |", "|---|---|---|---|---|"]
        lines += [f"| {r['dataset']} | {r['metric']} | {r['base']:.3f} (step {r['base_step']}) | {r['last']:.3f} "
                  f"(step {r['last_step']}) | {r['last'] - r['base']:+.3f} |" for r in rows]
    else:
        lines.append("No evaluation in this campaign (eval.every_n_steps = 0).")
    accepted, candidates = acceptance(summaries)
    ratio = f"{accepted / candidates:.2f}" if candidates else "-"
    lines += ["", "### Acceptance", "", "| accepted | candidates | retention (accepted / candidates) |",
              "|---|---|---|", f"| {accepted} | {candidates} | {ratio} |"]
    return "\n".join(lines)
