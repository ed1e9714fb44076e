"""The embedded tiny model: tokenizer round trip, shape, a few warm-start steps, the on-disk cache.

Everything here runs on a micro shape in seconds; the real warm start is measured by hand (README).
"""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mel_core import config as config_mod
from mel_core.config import SyntheticConfig, TinyModelConfig
from mel_core.model import tiny
from mel_core.problems.prompts import PromptSet
from mel_core.problems.worlds import arithmetic, rules

torch.set_num_threads(2)

MICRO = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=320,
             max_position_embeddings=384)


@pytest.fixture(scope="module")
def prompts():
    return PromptSet.load("configs/prompts/tiny")


@pytest.fixture(scope="module")
def tokenizer(prompts):
    return tiny.build_tokenizer(TinyModelConfig(**MICRO), tiny.tokenizer_corpus(prompts, SyntheticConfig(), 300, 0))


def micro_config(tmp_path, extra: tuple = (), **warm):
    overrides = [f"model.tiny.{k}={v}" for k, v in MICRO.items()] + list(extra)
    overrides += [f"warm_start.{k}={v}" for k, v in {"steps": 4, "batch_size": 8, "warmup_steps": 1,
                                                      "eval_problems": 8, **warm}.items()]
    overrides += ["data.synthetic.train_size=50", "data.synthetic.eval_size=20", f"run.cache_dir={tmp_path / 'cache'}"]
    return config_mod.load("configs/tiny.yaml", overrides)


TEXTS = [
    "Q: 12+7*3-5\n",
    "7*3=21\n12+21=33\n33-5=28\nAnswer: 28",
    "5-12=-7\n-7+3=-4\nAnswer: -4",
    "  two  spaces,\ttab\n\n\nblank lines  \n",
    "Bifurcation: step 2\nCritique: 12+21=34 should be 12+21=33.\nHeuristic: If an addition passes a ten, then carry one to the tens.",
    "Ünïcödé — naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά, عربى, \\boxed{\\frac{1}{2}} $x^2$",
    "",
]


def test_tokenizer_round_trip_after_reload_from_qwen2_folder(tmp_path, tokenizer):
    model = tiny.build_model(TinyModelConfig(**MICRO), tokenizer)
    model.save_pretrained(tmp_path)  # config.json with model_type qwen2: AutoTokenizer picks Qwen2Tokenizer
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
        assert tokenizer.decode(ids) == text
        assert reloaded.decode(ids) == text
    assert reloaded.eos_token == reloaded.pad_token == tiny.EOS_TOKEN
    assert reloaded.eos_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    assert reloaded.padding_side == "left"
    batch = reloaded(["Q: 1+2\n", "Q: 12+7*3-5\n"], padding=True)["input_ids"]
    assert batch[0][0] == reloaded.pad_token_id  # left padding for batched generation


RULES_TEXTS = [
    "Q: five: inc dec dec neg\n",
    "1 inc five jump seven\n2 dec seven down six\n3 dec six skip six\n4 neg six mirror three\nAnswer: three",
    ("Bifurcation: step 2\nCritique: 2 dec seven stay seven should be 2 dec seven down six.\n"
     "Heuristic: If dec meets a digit above the lowest, then go down."),
    ("Hint: Bifurcation: step 1\nCritique: 1 inc three up four should be 1 inc three jump five.\n"
     "Heuristic: If inc meets an odd digit, then jump.\nQ: three: inc neg dbl dec\n"),
]


def test_word_tokenizer_round_trips_and_makes_each_decision_one_token(tmp_path, prompts):
    rules_world = SyntheticConfig(world="rules", train_size=40, eval_size=8)
    corpus = tiny.tokenizer_corpus(prompts, rules_world, 300, 0)
    tok = tiny.build_tokenizer(TinyModelConfig(**{**MICRO, "vocab_size": 2048}, tokenizer="words"), corpus)
    bpe = tiny.build_tokenizer(TinyModelConfig(**{**MICRO, "vocab_size": 320}), corpus)
    model = tiny.build_model(TinyModelConfig(**MICRO), tok)
    model.save_pretrained(tmp_path)  # a qwen2 config: AutoTokenizer rebuilds a Qwen2Tokenizer from the files
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + RULES_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
        assert tok.decode(ids) == reloaded.decode(ids) == text
    assert reloaded.eos_token_id == tok.eos_token_id and reloaded.padding_side == "left"
    # Every word of a solution is one token, so the rule tag -- the step's decision -- is one prediction.
    for p in rules.problems(rules_world, "eval"):
        for line in rules.solution_lines(p.question)[:-1]:
            pieces = reloaded.convert_ids_to_tokens(reloaded(line, add_special_tokens=False)["input_ids"])
            assert [piece.replace("Ġ", " ") for piece in pieces] == [line.split()[0]] + [f" {w}" for w in line.split()[1:]]
    tags = [reloaded(f" {tag}", add_special_tokens=False)["input_ids"] for tag in rules.ERROR_TYPES]
    assert all(len(t) == 1 for t in tags) and len({t[0] for t in tags}) == len(tags)
    assert len(tok) <= 2048 and len(bpe) <= 320  # a ceiling for words; bpe stops at its vocab_size
    assert len(bpe(RULES_TEXTS[3], add_special_tokens=False)["input_ids"]) > \
        len(tok(RULES_TEXTS[3], add_special_tokens=False)["input_ids"])


def test_tokenizer_splits_digits(tokenizer):
    # The Qwen pre-tokenizer keeps each digit a token of its own, so numbers are spelled digit by digit.
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("1234+56", add_special_tokens=False)["input_ids"])
    assert tokens == ["1", "2", "3", "4", "+", "5", "6"]


def test_model_shape_and_untied_embeddings(prompts):
    tok = tiny.build_tokenizer(TinyModelConfig(), tiny.tokenizer_corpus(prompts, SyntheticConfig(), 300, 0))
    model = tiny.build_model(TinyModelConfig(), tok)
    assert 0.5e6 <= tiny.count_parameters(model) <= 2e6
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tok) <= TinyModelConfig().vocab_size
    assert model.config.pad_token_id == model.config.eos_token_id == tok.eos_token_id


def test_examples_mask_the_prompt(prompts, tokenizer):
    rng = random.Random(0)
    world = arithmetic.WORLD
    examples = [tiny.solve_example(prompts, world, SyntheticConfig(), "12+7*3-5", rng),
                tiny.analysis_example(prompts, world, "12+7*3-5", rng),
                tiny.validation_example(prompts, world, SyntheticConfig(), "12+7*3-5", rng)]
    assert examples[1].target.startswith("Bifurcation: step ") and "Wrong:" in examples[1].prompt
    assert examples[2].prompt.startswith("Hint: Bifurcation: step ")  # the whole M of an error (replay_context full)
    input_ids, attention, labels = tiny.pad_sequences(tiny.tokenize_examples(tokenizer, examples), tokenizer.pad_token_id)
    for row, ex in enumerate(examples):
        target = labels[row][labels[row] != -100].tolist()
        assert target[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(target[:-1]) == ex.target
        n = int(attention[row].sum())
        assert tokenizer.decode(input_ids[row, :n].tolist()[:-1]) == ex.prompt + ex.target


def test_a_few_warm_start_steps_reduce_the_loss(prompts, tokenizer):
    torch.manual_seed(0)
    model = tiny.build_model(TinyModelConfig(**MICRO), tokenizer)
    stream = tiny.example_stream(prompts, SyntheticConfig(), 0.3, 0.1, random.Random(0))
    batch = [next(stream) for _ in range(16)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = tiny.cosine_with_warmup(optimizer, 2, 20)
    losses = [tiny.train_step(model, tokenizer, batch, optimizer, scheduler) for _ in range(20)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_parse_check_and_answer_extraction():
    good = "Bifurcation: step 2\nCritique: 12+21=34 should be 12+21=33.\nHeuristic: If an addition passes a ten, then carry one to the tens."
    assert tiny.is_parseable_analysis(good)
    assert not tiny.is_parseable_analysis(good.replace("a ten", "10"))
    assert not tiny.is_parseable_analysis(good.replace("Critique: ", "Critic: "))
    assert not tiny.is_parseable_analysis("Bifurcation: step 2\nCritique: x")


def test_warm_start_key_covers_exactly_what_shapes_the_model(tmp_path):
    base = micro_config(tmp_path)
    key = tiny.warm_start_key(base)
    same = config_mod.load("configs/tiny.yaml", [f"model.tiny.{k}={v}" for k, v in MICRO.items()] + [
        "warm_start.steps=4", "warm_start.batch_size=8", "warm_start.warmup_steps=1", "warm_start.eval_problems=8",
        "data.synthetic.train_size=50", "data.synthetic.eval_size=20", "run.steps=99", "sampling.group_size=4",
        "optim.lr=0.5", "run.cache_dir=/elsewhere"])
    assert tiny.warm_start_key(same) == key
    assert tiny.warm_start_key(micro_config(tmp_path, steps=5)) != key
    changed_shape = config_mod.load("configs/tiny.yaml", [f"model.tiny.{k}={v}" for k, v in {**MICRO, "hidden_size": 64}.items()])
    assert tiny.warm_start_key(changed_shape) != tiny.warm_start_key(config_mod.load("configs/tiny.yaml", [f"model.tiny.{k}={v}" for k, v in MICRO.items()]))
    # the chosen world's knobs and the tokenizer kind shape it too
    for override in ["data.synthetic.world=rules", "data.synthetic.rules.weak_rate=0.2", "model.tiny.tokenizer=words"]:
        assert tiny.warm_start_key(micro_config(tmp_path, extra=[override])) != key, override
    other_prompts = tmp_path / "prompts"
    other_prompts.mkdir()
    for name in ("solve", "analysis", "validation"):
        text = Path(f"configs/prompts/tiny/{name}.txt").read_text()
        (other_prompts / f"{name}.txt").write_text(text if name != "solve" else "Problem: {question}\n")
    base.prompts.dir = str(other_prompts)
    assert tiny.warm_start_key(base) != key


def test_ensure_warm_start_trains_once_then_reuses(tmp_path):
    cfg = micro_config(tmp_path)
    first_log: list[str] = []
    path = tiny.ensure_warm_start(cfg, log=first_log.append)
    assert path == (tmp_path / "cache" / f"tiny-{tiny.warm_start_key(cfg)}")
    assert any("warm start step 4/4" in line for line in first_log)
    summary = tiny.read_summary(path)
    assert set(summary) >= {"accuracy", "analysis_parse_rate", "seconds", "steps", "key"}
    assert summary["steps"] == 4 and summary["key"] == tiny.warm_start_key(cfg)
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["analysis_parse_rate"] <= 1.0
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind

    second_log: list[str] = []
    assert tiny.ensure_warm_start(cfg, log=second_log.append) == path
    assert second_log == [f"warm start cached: {path}"]
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime

    # The folder is an ordinary HF checkpoint: it reloads and generates through the Auto classes.
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.tie_word_embeddings is False
    enc = tok(["Q: 1+2\n", "Q: 12+7*3-5\n"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 4


def test_relative_cache_dir_resolves_against_cwd(tmp_path, monkeypatch):
    cfg = micro_config(tmp_path)
    cfg.run.cache_dir = "rel/cache"
    cfg.prompts.dir = str(Path("configs/prompts/tiny").resolve())
    monkeypatch.chdir(tmp_path)
    assert tiny.warm_start_dir(cfg) == tmp_path / "rel" / "cache" / f"tiny-{tiny.warm_start_key(cfg)}"
