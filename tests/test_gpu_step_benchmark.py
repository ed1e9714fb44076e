"""benchmarks/gpu_step.py must not rot before a GPU host runs it.

* Slow: the CPU dry run end to end (micro shape, HF generation, TRL without vLLM, 1 warm-up + 1 timed step): each
  arm in its own process printed its per-phase table, the ratio lines are there, the decode micro-benchmark ran its
  HF side (vLLM is not installed here), mel's arms imported no optional dependency a bare GPU host lacks, and the
  model and the runs are removed. MEL overlap's timed step (its second) generated step 1's analyses in its rollout
  call (one shared engine call and phase, no analyses phase of its own) and abstracted and replayed step 1's pair,
  where sequential MEL diagnosed its own step's pair in a call of its own. Timings' values are not checked.
* Fast: the parent's reading of arms that crashed, were cut or never ran (the others still report), and the mixed
  groups' spread.
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import gpu_step  # noqa: E402

SMALLEST = ["--shape", "micro", "--device", "cpu", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "64",
            "--analysis-max-new-tokens", "64", "--replay-max-new-tokens", "64", "--micro-batch-size", "4",
            "--warmup", "1", "--steps", "1", "--threads", "1", "--decode-batches", "2", "--decode-contexts", "16",
            "--decode-tokens", "2", "--no-doc"]


@pytest.mark.slow
def test_cpu_dry_run_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), *SMALLEST,
                           "--arms", "trl", "grpo", "mel", "mel-overlap", "decode", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=420, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]

    for name in ("TRL GRPOTrainer", "mel GRPO", "mel MEL", "mel MEL overlap"):
        table = out.split(f"#### {name}, mixed 50%: done", 1)
        assert len(table) == 2, f"no per-phase table of {name}:\n{out[-3000:]}"
        body = table[1].split("####", 1)[0]
        assert "| phase | median s | min s | max s |" in body and "| **step** |" in body
        assert "| step without save |" in body
        for phase in ("train", "save"):
            assert f"| {phase} |" in body
        if name == "mel MEL":  # step 2 diagnoses its own pair in a call of its own, timed as the analyses
            assert "| rollouts |" in body and "| analyses |" in body and "| replays |" in body
            assert "| rollouts+analyses |" not in body
            assert "- last step (2): reward mean 0.75, 1 mixed groups, 1 pairs; 1 analyses parsed and 1 accepted\n" in body
            assert "- its engine calls: sample step 2; diagnose step 2; replay step 2\n" in body
        elif name == "mel MEL overlap":  # step 2 writes step 1's analyses in its rollout call: no analyses phase
            assert "| rollouts+analyses |" in body and "| replays |" in body
            assert "| rollouts |" not in body and "| analyses |" not in body
            assert re.search(r"- generated: rollouts \S+ tokens within rollouts\+analyses, rollouts\+analyses \S+ tokens "
                             r"at \S+ tok/s, analyses \S+ tokens within rollouts\+analyses, replays", body)
            assert ("- last step (2): reward mean 0.75, 1 mixed groups, 1 pairs; 1 analyses parsed and 1 accepted of "
                    "step 1's pairs\n") in body
            assert "- its engine calls: sample step 2 + diagnose step 1; replay step 1\n" in body
        else:
            assert "| rollouts |" in body
        if name == "TRL GRPOTrainer":
            assert "| score |" in body and re.search(r"optional modules imported: .*\btrl\b", body)
        else:  # a bare GPU host: none of prefect, flows, tasks, ray, math-verify, trl, peft (nor vllm with HF)
            assert "- optional modules imported: none" in body
    for line in ("mel-GRPO ÷ TRL-GRPO, step with save: **", "mel-GRPO ÷ TRL-GRPO, step without save: **",
                 "MEL ÷ mel-GRPO at 50% mixed, step with save: **", "MEL ÷ mel-GRPO at 50% mixed, step without save: **",
                 "MEL overlap ÷ mel-GRPO at 50% mixed, step with save: **",
                 "MEL overlap ÷ mel-GRPO at 50% mixed, step without save: **", "- update MFU (6N"):
        assert line in out, line
    assert "#### decode: HF generate: done" in out and "| 2 | 16 |" in out
    assert "[decode-vllm] skipped: vLLM is not installed" in out
    heads = dict(ln.split(": ", 1) for ln in out.splitlines() if ln.startswith("gpu_step_micro_"))
    assert float(heads["gpu_step_micro_mel_grpo_over_trl_step"]) > 0
    assert float(heads["gpu_step_micro_mel_over_grpo_50_step_without_save"]) > 0
    assert float(heads["gpu_step_micro_mel_overlap_over_grpo_50_step_without_save"]) > 0
    assert not list(tmp_path.iterdir())  # the model and the runs are removed


def _arm(arm, mixed, steps, status="done", **extra):
    phases = {"rollouts": 2.0, "weight_sync": 0.5, "train": 3.0, "save": 1.0, "other": 0.5}
    return {"arm": arm, "mixed": mixed, "status": status, "engine": "vllm",
            "steps": [{"step": k, "warmup": k <= 1, "step_s": 7.0 + k, "phases": phases,
                       "tokens": {"rollouts": 1000, "trained": 1200, "scored": 1000}} for k in range(1, steps + 1)],
            **extra}


def test_crashed_cut_and_skipped_arms_are_reported_and_the_others_still_are():
    a = SimpleNamespace(mixed=[50.0, 25.0], shape="1.7b", device="cuda", peak_tflops=989.0,
                        no_gradient_checkpointing=False)
    counts = {"parameters": 1_700_000_000, "embedding": 300_000_000}
    results = [_arm("trl", 0.5, 4),
               _arm("grpo", 0.5, 2, status="crashed (exit 1)", tail=["RuntimeError: CUDA out of memory"]),
               _arm("mel", 0.5, 1, status="cut: its 100s of the budget ran out"),
               {"arm": "mel", "mixed": 0.25, "status": "skipped: no time left in the budget", "steps": []}]
    summaries = [gpu_step.summarize(r, counts, a) for r in results]
    assert summaries[0]["n"] == 3 and summaries[0]["step"] == (10.0, 9.0, 11.0)  # median, min, max of timed steps
    assert summaries[0]["step_without_save"][0] == 9.0 and summaries[0]["mfu"] > 0
    assert summaries[1]["n"] == 1  # the one timed step it finished before crashing
    assert summaries[2]["n"] == 1 and results[2]["timed"] is False  # cut during its first timed step
    assert summaries[3] == {}

    crashed = "\n".join(gpu_step.arm_table(results[1], summaries[1]))
    assert "crashed (exit 1)" in crashed and "CUDA out of memory" in crashed and "| **step** |" in crashed
    cut = "\n".join(gpu_step.arm_table(results[2], summaries[2]))
    assert "cut: its 100s" in cut and "warm-up step(s) only" in cut
    assert "No step finished." in "\n".join(gpu_step.arm_table(results[3], summaries[3]))

    table = "\n".join(gpu_step.summary_table(results, summaries))
    assert "skipped: no time left" in table and "crashed (exit 1)" in table and "| 10.00 (9.00–11.00) |" in table
    lines, heads = gpu_step.ratios(results, summaries, a, counts)
    text = "\n".join(lines)
    assert "mel-GRPO ÷ TRL-GRPO, step with save: **0.90** — goal ≤ 1: met" in text
    assert "MEL ÷ mel-GRPO at 25% mixed, step with save: **n/a**" in text
    assert heads["mel_over_grpo_25_step"] is None and "goal ≥ 35% at 1.7B" in text


def test_a_cut_arm_is_killed_at_its_timeout_and_reported(tmp_path):
    a = gpu_step.parse_args(["--device", "cpu", "--no-doc"])
    r = gpu_step.run_child(a, ["--device", "cpu"], "grpo", 0.5, tmp_path / "no-model", tmp_path, 0.5, lambda m: None)
    assert r["status"].startswith("cut") and r["steps"] == []


def test_a_step_runs_the_stages_a_campaign_runs_in_sequence_and_with_overlap():
    from mel_core.vocabulary import STAGES

    assert gpu_step.step_plan(STAGES, 2, 2, 0) == [(name, 2) for name in STAGES]
    assert gpu_step.step_plan(gpu_step.GRPO_STAGES, 1, 1, 0) == [("sample", 1), ("verify", 1), ("update", 1)]
    # overlap (flows/iteration.py): no diagnose (sample generates step-1's analyses); abstract and replay on step-1,
    # and not at all at the first step, which has no earlier pairs
    assert gpu_step.step_plan(STAGES, 1, 0, 0) == [("sample", 1), ("verify", 1), ("pair", 1), ("update", 1)]
    assert gpu_step.step_plan(STAGES, 3, 2, 0) == [("sample", 3), ("verify", 3), ("pair", 3), ("abstract", 2),
                                                   ("replay", 2), ("update", 3)]


def test_mixed_groups_are_spread_evenly():
    for fraction, expected in ((0.25, [3, 7, 11, 15]), (0.5, list(range(1, 16, 2))), (1.0, list(range(16)))):
        assert [p for p in range(16) if gpu_step.is_mixed(p, fraction)] == expected
    assert not any(gpu_step.is_mixed(p, 0.0) for p in range(16))


def test_an_arm_result_is_valid_json_after_every_step(tmp_path):
    res = gpu_step.Result(str(tmp_path / "r.json"), arm="grpo")
    res.step(lambda m: None, 1, True, 1.5, {"train": 1.0}, {"trained": 10})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["status"] == "running" and data["steps"][0]["phases"] == {"train": 1.0}
