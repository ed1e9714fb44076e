"""The A/B harness as a flow: the chosen arms' campaigns on identical data, seeds and budgets, then the report.

    for each seed:  campaign(<name>-grpo-s<seed>)   experience off, lambda = 0 (the baseline)
                    campaign(<name>-<arm>-s<seed>)  for every other arm (mel, mel-oracle, grpo+sft, ...)
    report: per-step curves, held-out Pass@1 differences to GRPO at equal steps and equal wall time with
            paired bootstrap CIs and Holm-corrected p-values, time per step (mel_core.study.ab_test)

Each arm is a whole campaign with its own run directory and DuckDB file, cached like any campaign: running
the same comparison again reuses every finished stage and evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, tags

from flows.campaign import announce, campaign
from mel_core.config import from_dict, to_dict
from mel_core.step.runtime import clear_runtimes
from mel_core.study import ab_test
from mel_core.study.evaluation import dataset_name


@flow(name="mel-compare")
def compare(config: dict, name: str, seeds: int = 3, command: str = "", out: str | None = None,
            arms: tuple[str, ...] = ab_test.DEFAULT_ARMS) -> dict:
    """Run every arm at `seeds` seeds, write `out` (markdown) and its `.json` twin; returns the report."""
    cfg = from_dict(config)
    runs = []
    for arm in ab_test.plan(cfg, name, seeds, tuple(arms)):
        announce(f"compare: arm {arm.arm} seed {arm.seed} -> run {arm.config.run.name}")
        # grpo+sft takes its per-step NLL counts from the mel run of its seed, which plan() put before it
        config = ab_test.count_matched(arm, {(r.arm, r.seed): r for r in runs})
        with tags(f"arm:{arm.arm}"):  # beside the run's own tags (flows/campaign.py run_tags)
            result = campaign(to_dict(config))
        runs.append(ab_test.ArmRun(arm.arm, arm.seed, arm.config.run.name, result["run_id"], result["db"],
                                       result["final_checkpoint"].checkpoint_id))
        clear_runtimes()  # this arm's policy is not needed again: free it before the next arm loads its own

    datasets = [dataset_name(d) for d in cfg.eval.datasets]
    report = ab_test.build_report(runs, name=name, command=command, config=cfg, datasets=datasets)
    md_path = Path(out) if out else Path(cfg.run.root_dir) / f"{name}-compare.md"
    md_path.parent.mkdir(parents=True, exist_ok=True)
    report["plots"] = ab_test.write_plots(report, md_path.parent, md_path.stem)
    report["markdown_path"], report["json_path"] = str(md_path), str(md_path.with_suffix(".json"))
    md_path.write_text(ab_test.format_markdown(report))
    md_path.with_suffix(".json").write_text(json.dumps(report, indent=2, sort_keys=True))
    return report
