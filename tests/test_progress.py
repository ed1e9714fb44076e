"""Progress bars: drawn on a terminal, absent from captured output (tests, CI logs); log lines kept."""

import io
import sys

import pytest
import torch

from mel_core import config as C
from mel_core import progress
from mel_core.config import SyntheticConfig, TinyModelConfig
from mel_core.model import tiny
from mel_core.model.engines.base import SamplingParams
from mel_core.model.engines.hf import HFEngine
from mel_core.problems.prompts import PromptSet

MICRO = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=300,
             max_position_embeddings=256)


class Terminal(io.StringIO):
    """What a TTY stderr looks like to the code under test, with what was drawn kept for reading."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def micro():
    cfg = C.load("configs/tiny.yaml", [f"model.tiny.{k}={v}" for k, v in MICRO.items()] +
                 ["warm_start.steps=3", "warm_start.batch_size=4", "warm_start.warmup_steps=1"])
    prompts = PromptSet.load(cfg.prompts.dir)
    tok = tiny.build_tokenizer(TinyModelConfig(**MICRO), tiny.tokenizer_corpus(prompts, SyntheticConfig(), 200, 0))
    return cfg, prompts, tok


@pytest.mark.parametrize("tty", [True, False])
def test_warm_start_training_draws_a_bar_only_on_a_terminal_and_keeps_its_log_lines(micro, monkeypatch, tty):
    cfg, prompts, tok = micro
    err = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    lines: list[str] = []
    torch.manual_seed(0)
    tiny._train(cfg, prompts, tok, "k", 0.0, lines.append)
    assert any(ln.startswith("warm start step 3/3: loss") for ln in lines)  # the log line is there either way
    drawn = err.getvalue()
    if tty:
        assert "warm start" in drawn and "/3 [" in drawn  # tqdm redraws at most every 0.1 s: the last count may be skipped
    else:
        assert drawn == ""


@pytest.mark.parametrize("tty", [True, False])
def test_engine_chunks_draw_a_bar_only_on_a_terminal(micro, monkeypatch, tty):
    cfg, _, tok = micro
    torch.manual_seed(0)
    model = tiny.build_model(cfg.model.tiny, tok)
    err = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    engine = HFEngine(model, tok, max_batch_sequences=2, progress=True)
    out = engine.generate(["Q: 1+2\n", "Q: 3*4\n"], SamplingParams(n=2, temperature=1.0, max_new_tokens=3, seed=1),
                          desc="sample step 1")
    assert [len(g) for g in out] == [2, 2]
    if tty:
        assert "sample step 1" in err.getvalue() and "/2 [" in err.getvalue()  # 4 sequences in chunks of 2
    else:
        assert err.getvalue() == ""
    assert progress.on_terminal() is tty
