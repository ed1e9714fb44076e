"""benchmarks/gpu_step.py must not rot before a GPU host runs it: its main function at the micro shape on CPU,
in a process where Prefect, the flows and tasks, vLLM, Ray and math-verify cannot be imported (the bare GPU
host has none of them), with every MEL stage doing its work and sane numbers printed."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ABSENT = ("prefect", "flows", "tasks", "vllm", "ray", "math_verify", "pebble", "trl", "peft")

RUN = """
import json, sys
for name in {absent!r}:
    sys.modules[name] = None  # importing it raises ImportError
sys.path.insert(0, {repo!r})
sys.argv = ["gpu_step.py"]
from benchmarks import gpu_step
res = gpu_step.main({argv!r})
r = res["results"][0]
print("RESULT " + json.dumps({{"manifests": r["arms"]["mel"]["manifests"], "headline": res["headline"],
                              "nll": r["arms"]["mel"]["update"]["nll_sequences"],
                              "grpo_stages": list(r["arms"]["grpo"]["seconds"]),
                              "mel_stages": list(r["arms"]["mel"]["seconds"])}}, default=str))
"""


def test_gpu_step_runs_at_micro_shape_on_cpu(tmp_path):
    argv = ["--shape", "micro", "--device", "cpu", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "64",
            "--analysis-max-new-tokens", "64", "--replay-max-new-tokens", "64", "--threads", "1", "--no-doc",
            "--workdir", str(tmp_path)]
    proc = subprocess.run([sys.executable, "-c", RUN.format(absent=ABSENT, repo=str(REPO), argv=argv)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    import json
    res = json.loads(next(ln for ln in out if ln.startswith("RESULT "))[len("RESULT "):])

    assert res["grpo_stages"] == ["sample", "verify", "update"]
    assert res["mel_stages"] == ["sample", "verify", "pair", "diagnose", "abstract", "replay", "update"]
    m = res["manifests"]
    assert m["sample"]["rollouts"] == 4 and m["verify"]["mixed_groups"] == 2  # half of each group right
    assert m["pair"]["pairs"] == 2 and m["diagnose"]["diagnosed"] == 2 and m["replay"]["accepted"] == 2
    assert res["nll"] == 2  # the accepted M* were trained on

    h = res["headline"]
    for k in ("sample", "analysis", "replay"):
        assert h[f"gpu_step_micro_{k}_tokens_per_s"] > 0
    assert h["gpu_step_micro_update_s_mel"] > 0 and h["gpu_step_micro_update_s_grpo"] > 0
    assert h["gpu_step_micro_mel_grpo_step_ratio"] > 0
    assert h["gpu_step_micro_update_mfu_mel"] is None and h["gpu_step_micro_peak_gpu_memory_gib"] is None  # CPU

    # One `name: value` line per headline number, the step ratio last.
    tail = [ln for ln in out if re.fullmatch(r"gpu_step_micro_[a-z0-9_]+: \S+", ln)]
    assert [ln.split(":")[0] for ln in tail] == list(h)
    assert tail[-1].startswith("gpu_step_micro_mel_grpo_step_ratio: ")
    assert not list(tmp_path.iterdir())  # the model and the runs are removed
