"""`mel eval --suite paper`: the paper's five benchmarks and its Table 1 layout (pure functions), then the command
end to end on a micro model (its scores are ~0; the test checks the table's shape, not its values)."""

from __future__ import annotations

import pytest

from mel_app import cli
from mel_core.config import ConfigError, resolve_path
from mel_core.step.runtime import clear_runtimes
from mel_core.study import evaluation as ev

HEADINGS = ["AIME 2024", "AIME 2025", "AMC 2023", "MATH 500", "OlympiadBench", "Average"]
NAMES = ["aime24", "aime25", "amc23", "math500", "olympiadbench"]

# The paper's Table 1, Qwen3-4B-Base "Baseline" row (percent): Pass@1, Avg@8, Pass@8 per benchmark, then Average.
PAPER_BASELINE_4B = {
    "aime24": (13.33, 9.90, 30.00), "aime25": (10.00, 6.56, 23.33), "amc23": (45.00, 42.73, 72.50),
    "math500": (74.20, 65.74, 89.60), "olympiadbench": (39.17, 35.37, 60.38),
}
PAPER_BASELINE_4B_AVERAGE = ("36.34", "32.06", "55.16")


def _as_metrics(triple, k=8):
    return dict(zip(["pass@1", f"avg@{k}", f"pass@{k}"], (v / 100 for v in triple)))


def _parse(table: str) -> dict[str, dict[str, list[str]]]:
    """label -> benchmark heading -> its cells, read back from the printed blocks (each: a heading line, a
    metric line, a rule, one line per method)."""
    lines = table.splitlines()
    out: dict[str, dict[str, list[str]]] = {}
    i = 0
    while i < len(lines):
        if "|" in lines[i] and i + 2 < len(lines) and set(lines[i + 2]) <= {"-", "+"}:
            headings = [h.strip() for h in lines[i].split("|")[1:]]
            i += 3
            while i < len(lines) and "|" in lines[i]:
                label, *groups = [c.strip() for c in lines[i].split("|")]
                for h, g in zip(headings, groups):
                    out.setdefault(label, {})[h] = g.split()
                i += 1
        else:
            i += 1
    return out


def test_the_paper_suite_is_table_1s_benchmarks_in_order():
    paths = ev.suite_datasets("paper")
    assert [ev.dataset_name(p) for p in paths] == NAMES
    assert all(resolve_path(p).is_file() for p in paths)
    # --datasets adds to the suite (after it); one already in it, however spelled, is not evaluated twice
    assert ev.suite_datasets("paper", ["synthetic", "./data/math500/test.jsonl"]) == paths + ["synthetic"]
    with pytest.raises(ConfigError, match="unknown suite 'papr'"):
        ev.suite_datasets("papr")


def test_table_reproduces_the_papers_layout_and_average():
    table = ev.format_suite_table({"Baseline": {n: _as_metrics(t) for n, t in PAPER_BASELINE_4B.items()}}, 8, 0.6)
    lines = table.splitlines()
    assert "Avg@8 / Pass@8 from 8 samples at T=0.6" in lines[0]
    # two blocks of three column groups, as the paper prints them
    heading_lines = [ln for ln in lines if "AIME" in ln or "MATH 500" in ln]
    assert [[h.strip() for h in ln.split("|")[1:]] for ln in heading_lines] == [HEADINGS[:3], HEADINGS[3:]]
    metric_lines = [ln for ln in lines if ln.startswith("Method")]
    assert [ln.split() for ln in metric_lines] == [["Method"] + ["|", "Pass@1", "Avg@8", "Pass@8"] * 3] * 2
    cells = _parse(table)["Baseline"]
    assert list(cells) == HEADINGS
    for name, heading in zip(NAMES, HEADINGS):
        assert cells[heading] == [f"{v:.2f}" for v in PAPER_BASELINE_4B[name]]
    assert tuple(cells["Average"]) == PAPER_BASELINE_4B_AVERAGE  # the unweighted mean of the five, as printed


def test_a_missing_metric_shows_as_dash_and_blanks_its_average():
    full = {n: _as_metrics(t) for n, t in PAPER_BASELINE_4B.items()}
    no_sampling = {n: {"pass@1": m["pass@1"]} for n, m in full.items()}
    partial = {**full, "math500": {"pass@1": 0.5, "avg@8": 0.25}}          # MATH 500 lacks pass@8
    del partial["aime25"]                                                  # AIME 2025 not evaluated at all
    cells = _parse(ev.format_suite_table({"full": full, "greedy only": no_sampling, "partial": partial}, 8, 0.6))
    assert list(cells) == ["full", "greedy only", "partial"]
    assert cells["greedy only"]["AMC 2023"] == ["45.00", "-", "-"]
    assert cells["greedy only"]["Average"] == ["36.34", "-", "-"]
    assert cells["partial"]["MATH 500"] == ["50.00", "25.00", "-"]
    assert cells["partial"]["AIME 2025"] == ["-", "-", "-"]
    assert cells["partial"]["Average"] == ["-", "-", "-"]                  # never a mean over fewer benchmarks
    assert cells["full"]["Average"] == list(PAPER_BASELINE_4B_AVERAGE)


def test_sampled_columns_follow_eval_k():
    assert ev.table_metrics(8) == [("Pass@1", "pass@1"), ("Avg@8", "avg@8"), ("Pass@8", "pass@8")]
    # k = 1: 'pass@1' is the greedy metric's name, so there is no sampled Pass@k; k = 0: no sampling at all
    assert ev.table_metrics(1) == [("Pass@1", "pass@1"), ("Avg@1", "avg@1"), ("Pass@k", None)]
    assert ev.table_metrics(0) == [("Pass@1", "pass@1"), ("Avg@k", None), ("Pass@k", None)]
    rows = [{"dataset": "aime24", "metric": "pass@1", "value": 0.1}, {"dataset": "aime24", "metric": "avg@1", "value": 0.2}]
    cells = _parse(ev.format_suite_table({"m": ev.metrics_by_dataset(rows)}, 1, 0.6))["m"]
    assert cells["AIME 2024"] == ["10.00", "20.00", "-"]


@pytest.fixture
def cli_env(monkeypatch):
    """`mel eval` sets Prefect's variables for its process; give them back after the test."""
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("PREFECT_LOGGING_SETTINGS_PATH", raising=False)


@pytest.mark.slow
def test_mel_eval_suite_paper_end_to_end(prefect_harness, micro_model, tmp_path, capsys, cli_env):
    rc = cli.main(["eval", "--checkpoint", str(micro_model), "--suite", "paper", "--datasets", "synthetic",
                   "--config", "configs/tiny.yaml", f"model.name_or_path={micro_model}", f"run.root_dir={tmp_path}",
                   "run.name=suite", "eval.max_problems=2", "eval.k=2", "eval.max_new_tokens=8",
                   "model.max_seq_len=512"])  # the micro model's window: its tokenizer spells benchmark words in pieces
    out = capsys.readouterr().out
    clear_runtimes()
    assert rc == 0, out
    assert "on data/aime24/test.jsonl, data/aime25/test.jsonl, data/amc23/test.jsonl, data/math500/test.jsonl, " \
           "data/olympiadbench/test.jsonl, synthetic" in out
    per_dataset, table = out.split("Table 1 layout", 1)
    for name in NAMES + ["synthetic"]:  # the existing per-dataset output still comes first, extras included
        assert name in per_dataset
    assert "Avg@2 / Pass@2 from 2 samples at T=0.6" in table
    cells = _parse(table)
    assert list(cells) == [micro_model.name]  # one line, named after the checkpoint directory
    assert list(cells[micro_model.name]) == HEADINGS  # the extra 'synthetic' is evaluated but not in the table
    for heading, values in cells[micro_model.name].items():
        assert len(values) == 3 and all(v != "-" and 0 <= float(v) <= 100 for v in values), (heading, values)
    assert [ln.split() for ln in table.splitlines() if ln.startswith("Method")] == \
        [["Method"] + ["|", "Pass@1", "Avg@2", "Pass@2"] * 3] * 2
