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
