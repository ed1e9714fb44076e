"""The GPU configs load, carry the paper's settings, and build every component — with a micro model
standing in for the Qwen3 weights (nothing can be downloaded here)."""

import pytest

from mel_core import config as C
from mel_core.algorithm import losses
from mel_core.algorithm.rewards.verifier import reward_kind_for_source
from mel_core.model.engines.base import SamplingParams
from mel_core.model.engines.hf import HFEngine
from mel_core.step.runtime import Runtime

CONFIGS = ["configs/qwen3-4b-base.yaml", "configs/qwen3-8b-base.yaml", "configs/qwen3-14b-base.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_paper_settings(path):
    cfg = C.load(path)
    assert (cfg.sampling.group_size, cfg.sampling.temperature, cfg.sampling.prompts_per_step) == (8, 1.0, 128)
    assert cfg.optim.lr == 1e-6 and cfg.optim.mini_batch_size in (0, 128)
    assert (cfg.loss.advantage, cfg.loss.policy_loss, cfg.loss.beta, cfg.loss.nll_coef) == ("grpo", "grpo", 0.0, 1.0)
    assert (cfg.experience.replays_per_experience, cfg.experience.accept_min_correct) == (1, 1)
    assert cfg.eval.greedy and cfg.eval.temperature == 0.6 and cfg.eval.k == 8
    assert "Qwen3" in cfg.model.name_or_path and (cfg.model.dtype, cfg.model.master_dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize("path", CONFIGS)
def test_every_component_builds(path, micro_model, tmp_path):
    cfg = C.load(path, [f"model.name_or_path={micro_model}", "data.source=data/math500/test.jsonl",
                        "data.question_field=problem", "data.answer_field=answer", "data.id_field=unique_id",
                        f"run.root_dir={tmp_path}", "model.dtype=float32", "model.max_seq_len=256",
                        "sampling.max_new_tokens=8", "data.too_long=skip"])
    rt = Runtime(cfg)
    assert len(rt.train_problems) == 500 and rt.reward_kind == "math"
    assert rt.prompts.render_solve("x").count("\\boxed{}") == 1
    rt.ensure_version(rt.base_checkpoint)
    assert 0 < len(rt.usable_problems) < 500  # the micro tokenizer spells long problems out past 256 tokens
    engine = HFEngine(rt.policy.model, rt.policy.tokenizer)
    problems = rt.step_problems(1)[:2]
    outs = engine.generate([rt.prompts.render_solve(p.question) for p in problems],
                           SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0))
    assert [len(o) for o in outs] == [2, 2]
    assert cfg.loss.advantage in losses.ADVANTAGES and cfg.loss.policy_loss in losses.POLICY_LOSSES
    assert reward_kind_for_source(cfg.data.source) == "math"
    for ds in cfg.eval.datasets:
        assert (C.Path(ds)).exists(), ds
