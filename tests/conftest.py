import os
from pathlib import Path

import pytest

from mel_app.environment import prefect_environment

REPO = Path(__file__).resolve().parent.parent

# Prefect state under the repo, never in $HOME; telemetry off. Set before prefect is imported.
prefect_environment(home=REPO / ".prefect")
os.chdir(REPO)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server/database for the whole session (it takes ~8 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def build_micro_model(path: Path, num_layers: int = 1, chat_template: str | None = None, corpus_size: int = 200,
                      context: int = 512, config: str = "configs/tiny.yaml") -> Path:
    """A freshly initialised micro Qwen2 model + tokenizer saved at `path` (no warm start): for tests of
    the update step, the engine and the wiring, where what the model says does not matter. The tokenizer is
    learned from `config`'s world (its tokenizer kind and vocabulary ceiling too)."""
    import torch

    from mel_core import config as C
    from mel_core.model import tiny
    from mel_core.problems.prompts import PromptSet

    vocab = [] if config != "configs/tiny.yaml" else ["model.tiny.vocab_size=300"]
    cfg = C.load(config, ["model.tiny.hidden_size=32", f"model.tiny.num_layers={num_layers}",
                          "model.tiny.intermediate_size=64", f"model.tiny.max_position_embeddings={context}", *vocab])
    prompts = PromptSet.load(cfg.prompts.dir)
    tok = tiny.build_tokenizer(cfg.model.tiny, tiny.tokenizer_corpus(prompts, cfg.data.synthetic, corpus_size, 0))
    tok.chat_template = chat_template
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny.build_model(cfg.model.tiny, tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    """One micro model for the whole session (read-only: tests load it, never write into it)."""
    return build_micro_model(tmp_path_factory.mktemp("micro-model"))


UI_ENV = "MEL_UI_TEST"


def pytest_collection_modifyitems(config, items):
    """Browser tests (marker `ui`) are a make target of their own, `make test-ui` (it installs Chromium and sets
    MEL_UI_TEST=1): elsewhere they are deselected, not skipped -- the default suite reports what it ran."""
    if os.environ.get(UI_ENV) == "1":
        return
    deselected = [item for item in items if "ui" in item.keywords]
    if deselected:
        items[:] = [item for item in items if "ui" not in item.keywords]
        config.hook.pytest_deselected(items=deselected)


def assert_adam_steps_agree(got: dict, reference: dict, start: dict, lr: float, steps: int = 1) -> None:
    """Weights after `steps` AdamW steps from `start` (no weight decay) agree with a reference run of the same steps
    to what the math fixes, not to the float reduction order.

    Adam moves a weight by at most about lr per step: |m_hat / (sqrt(v_hat) + eps)| <= 1 at step 1 and, by
    Cauchy-Schwarz over the bias-corrected moments, <= 1.0014 at step 2 (betas 0.9, 0.999). So two runs whose
    gradients differ only in reduction order can differ anywhere by up to 2 * 1.0014 * lr per step: where a gradient
    is ~0, its sign is the reduction order's to decide (seen: 2.6e-5 at lr 1e-3). Where the reference moved a weight by at least
    0.9 * lr * steps, every step's gradient there was far above eps, so the direction and the size of the step are
    fixed by the gradient: the two runs agree to 2% of a step. A wrong gradient (sign, part of the batch left out)
    moves such weights elsewhere; the losses and grad norm, compared with a relative tolerance, catch a wrong scale."""
    import torch

    assert steps in (1, 2), "the bound below is derived for the first two Adam steps"
    confident = 0
    for name, ref in reference.items():
        w, w0 = got[name].float(), start[name].float()
        ref = ref.float()
        ulp = 4 * torch.finfo(torch.float32).eps * torch.maximum(ref.abs(), w.abs())
        assert ((w - ref).abs() <= 2 * 1.0014 * lr * steps + ulp).all(), f"{name}: moved further than Adam can"
        sure = (ref - w0).abs() >= 0.9 * lr * steps
        confident += int(sure.sum())
        worst = ((w - ref).abs() - ulp)[sure].max().item() if sure.any() else 0.0
        assert worst <= 0.02 * lr * steps, f"{name}: a weight with a clear gradient moved {worst:.2e} away"
    assert confident, "no weight moved a full Adam step: nothing was compared"
