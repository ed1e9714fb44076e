"""Prefect artifacts per step, under stable keys so the UI shows each one's history across steps, and at the
end of a campaign a link to its report and a summary of held-out accuracy and acceptance."""

from __future__ import annotations

import re
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from mel_core.step.runtime import Runtime
from mel_core.store import library, run_reads
from mel_core.study.summary import campaign_markdown, format_step


def _key(rt: Runtime, what: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"mel-{rt.cfg.run.name}-{what}".lower()).strip("-")


def publish_step(rt: Runtime, step: int, summary: dict) -> None:
    heuristics = run_reads.accepted_heuristics_of_step(rt.store, rt.run_id, step)
    create_table_artifact(key=_key(rt, "accepted-heuristics"), table=heuristics or [{"heuristic_id": "", "text": "(none)"}],
                          description=f"Heuristics accepted at step {step} of run {rt.run_id}")
    clusters = library.top_clusters(rt.store, rt.run_id, limit=10)
    create_table_artifact(key=_key(rt, "heuristic-library"),
                          table=[{k: c[k] for k in ("representative", "produced", "accepted", "internalized",
                                                    "first_step", "last_step", "cluster_id")} for c in clusters]
                          or [{"representative": "(no heuristic yet)"}],
                          description=f"Top heuristic clusters of run {rt.run_id} after step {step} (produced, "
                                      f"accepted and internalized over the campaign so far)")
    secs = summary.get("stage_seconds", {})
    lines = [f"## Step {step} of `{rt.cfg.run.name}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in summary.items() if isinstance(v, (int, float)) and k != "step"]
    lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.2f} |" for k, v in secs.items()]
    lines += ["", "```", format_step(summary), "```"]
    create_markdown_artifact(key=_key(rt, "step-summary"), markdown="\n".join(lines),
                             description=f"Metrics of step {step}")


def publish_report_link(rt: Runtime, report: Path) -> None:
    """A link artifact to `mel report`'s markdown (a file:// URL: the UI shows where it is; browsers open it
    from a page on the same machine only)."""
    create_link_artifact(key=_key(rt, "report"), link=Path(report).resolve().as_uri(), link_text=str(report),
                         description=f"Report of run {rt.run_id} (mel report {rt.run_dir})")


def publish_campaign_summary(rt: Runtime, summaries: list[dict], evals: list[dict]) -> None:
    create_markdown_artifact(key=_key(rt, "campaign-summary"),
                             markdown=campaign_markdown(rt.cfg.run.name, rt.run_id, summaries, evals),
                             description=f"Held-out accuracy (base vs last evaluation) and acceptance of run {rt.run_id}")
