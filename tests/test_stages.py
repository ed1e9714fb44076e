"""The stage functions called directly (no orchestrator): two_pass analysis and chat-template prompts."""

import pytest
import torch
from conftest import build_micro_model

from mel_core import config as C
from mel_core.algorithm import meta_experience
from mel_core.run import executions
from mel_core.step import stages
from mel_core.step.runtime import Runtime
from tests.scripted import Script, run_step, scripted_runtime

pytestmark = pytest.mark.slow


def test_two_pass_generates_heuristics_from_the_diagnosis(tmp_path, micro_model):
    """s*, C in one call and H in a second one that sees them. The first call also writes a heuristic unasked
    (as a model may): it is neither shown to the second call nor trained on."""
    cfg = C.load("configs/tiny.yaml", ["run.name=two-pass", f"run.root_dir={tmp_path}", "sampling.prompts_per_step=4",
                                       f"model.name_or_path={micro_model}", "experience.analysis_mode=two_pass"])
    rt, base = scripted_runtime(cfg, Script())
    out = run_step(rt, 1, base)

    rows = rt.store.query("SELECT * FROM analyses WHERE status != 'rejected' OR reject_reason = 'replay_failed'")
    assert rows, "no analysis reached the abstract stage"
    for r in rows:
        assert r["mode"] == "two_pass"
        diagnosis = meta_experience.diagnosis_part(r["raw_text"])
        assert diagnosis and "Heuristic" not in diagnosis
        # the second call is conditioned on the question, both solutions and exactly the kept diagnosis
        assert r["abstract_prompt_text"].endswith(diagnosis + "\n")
        assert r["abstract_prompt_text"].startswith(r["prompt_text"])
        assert r["abstract_text"] and r["abstract_token_ids"]
        heuristics = rt.store.query("SELECT text FROM heuristics WHERE analysis_id = ? ORDER BY position",
                                    [r["analysis_id"]])
        parsed = meta_experience.parse_heuristics(r["abstract_text"], max_heuristics=cfg.experience.max_heuristics)
        assert [h["text"] for h in heuristics] == parsed.heuristics
        # the diagnosis target is the kept text alone (what the first call wrote past it is not learned)
        assert r["trained_text"] == diagnosis
        assert rt.policy.tokenizer.decode(r["trained_token_ids"][:-1]) == diagnosis
    accepted = rt.store.query("SELECT count(*) AS n FROM analyses WHERE status = 'accepted'")[0]["n"]
    update = rt.store.query("SELECT num_nll_sequences FROM updates")[0]
    assert update["num_nll_sequences"] == 2 * accepted  # M spans two generations, each an NLL target
    assert out["checkpoint"].checkpoint_id != base.checkpoint_id


def test_chat_template_wraps_what_is_generated_stored_and_trained(tmp_path):
    """With prompts.chat_template, every prompt the engine sees and the store keeps is the templated turn."""
    model_dir = build_micro_model(tmp_path / "chat-model",
                                  chat_template="{% for m in messages %}<user>{{ m.content }}</user>{% endfor %}<assistant>")

    cfg = C.load("configs/tiny.yaml", ["run.name=chat", f"run.root_dir={tmp_path / 'runs'}", f"model.name_or_path={model_dir}",
                                       "sampling.prompts_per_step=2", "sampling.group_size=2", "sampling.max_new_tokens=8",
                                       "prompts.chat_template=true"])
    rt = Runtime(cfg)
    base = rt.base_checkpoint
    executions.register_run(rt, base)
    run_step(rt, 1, base, experience_stages=False)
    rows = rt.store.query("SELECT question, prompt_text FROM prompts")
    assert len(rows) == 2
    for r in rows:
        assert r["prompt_text"] == f"<user>{rt.prompts.render_solve(r['question'])}</user><assistant>"
    assert rt.store.query("SELECT num_sequences FROM updates")[0]["num_sequences"] == 4

    # a tokenizer without a template is a config error, not a silently raw prompt
    plain_dir = build_micro_model(tmp_path / "plain-model")
    rt2 = Runtime(C.load("configs/tiny.yaml", ["run.name=plain", f"run.root_dir={tmp_path / 'runs'}",
                                               f"model.name_or_path={plain_dir}", "prompts.chat_template=true"]))
    with pytest.raises(C.ConfigError, match="prompts.chat_template"):
        rt2.ensure_version(rt2.base_checkpoint)  # the engine's stop tokens already need the template
        rt2.model_input("Q: 1+1\n")


def test_update_killed_after_its_checkpoint_resumes_from_it(tmp_path, monkeypatch, micro_model):
    """A process dies between the checkpoint's rename and the commit: the next update records that
    checkpoint and its stats instead of training again."""
    from safetensors.torch import load_file

    from mel_core.model.checkpoints import saved_update_stats
    from mel_core.model.policy import Policy

    cfg = C.load("configs/tiny.yaml", ["run.name=resume-ckpt", f"run.root_dir={tmp_path}", "sampling.prompts_per_step=4",
                                       f"model.name_or_path={micro_model}", "experience.enabled=false", "loss.nll_coef=0"])
    rt, base = scripted_runtime(cfg, Script())  # mixed groups: the step has a gradient
    stages.sample(rt, 1, base)
    stages.verify(rt, 1)
    out = stages.update(rt, 1, base)
    rt.settle_saves()  # run.async_save: the checkpoint is written in the background
    saved = saved_update_stats(out["checkpoint"].path)
    assert saved and saved["num_sequences"] == 4 * cfg.sampling.group_size
    # the crash: the checkpoint is on disk, its rows are not; a new process starts from the base policy
    rt.store.execute("DELETE FROM updates")
    rt.store.execute("DELETE FROM checkpoints WHERE step = 1")
    rt.ensure_version(base)
    monkeypatch.setattr(Policy, "train_step", lambda *a, **k: pytest.fail("the update trained again"))
    again = stages.update(rt, 1, base)
    assert again["checkpoint"].checkpoint_id == out["checkpoint"].checkpoint_id
    row = rt.store.query("SELECT loss, num_sequences FROM updates")[0]
    assert row == {"loss": saved["loss"], "num_sequences": saved["num_sequences"]}
    weights = load_file(f"{out['checkpoint'].path}/model.safetensors")
    served = dict(rt.policy.model.named_parameters())
    assert all(torch.equal(served[k], v) for k, v in weights.items() if k in served)
