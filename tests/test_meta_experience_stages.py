"""The paper's MEL on real model output, through the stages: what is validated, what is trained, what fits.

Constructed situations (tests/scripted.py) on a micro model: the analyses are written the way real models
write them (the paper's four sections with runaway text after them, or the compact tiny layout), and the
checks are the issue's: every replay prompt holds its analysis's critique and failure point (the whole M,
the paper's Eq. 6); the trained target is M* — nothing after the heuristics section, ending with eos;
an analysis cut off by the length limit is `truncated`, counted, never replayed or trained; a retrospective
context too long for the window keeps its instruction and question; the NLL of each part of M is logged.
"""

from pathlib import Path

import pytest
import torch

from mel_core import config as C
from mel_core.algorithm import meta_experience, retrospective
from tests.scripted import Script, compact_analysis, run_step, scripted_runtime

FIXTURES = Path(__file__).parent / "fixtures" / "analyses"
RUNAWAY = "\nQ: 5+5\nWrong:\n5+5=11\nAnswer: 11"  # a base model starting the next problem after its analysis


def _cfg(tmp_path, micro_model, *more):
    return C.load("configs/tiny.yaml", [f"run.root_dir={tmp_path}", f"model.name_or_path={micro_model}",
                                        "sampling.prompts_per_step=4", "sampling.group_size=4", *more])


def test_replay_shows_the_whole_m_and_training_stops_at_the_heuristics(tmp_path, micro_model):
    rt, base = scripted_runtime(_cfg(tmp_path, micro_model, "run.name=full"),
                                Script(analysis=lambda q: compact_analysis(q) + RUNAWAY))
    run_step(rt, 1, base)
    analyses = rt.store.query("SELECT * FROM analyses WHERE status = 'accepted'")
    assert len(analyses) == 4
    replays = {r["analysis_id"]: r["prompt_text"] for r in rt.store.query("SELECT * FROM replays")}
    for a in analyses:
        assert a["bifurcation"] and a["critique"] and a["critique"] in replays[a["analysis_id"]]
        assert f"Bifurcation: step {a['bifurcation_step']}" in replays[a["analysis_id"]]
        assert a["raw_text"].endswith(RUNAWAY) and "Q: 5+5" not in a["trained_text"]
        assert a["trained_text"] == a["raw_text"][:len(a["trained_text"])] and a["trained_text"].endswith("exactly.")
        tok = rt.policy.tokenizer
        assert a["trained_token_ids"][-1] == tok.eos_token_id and a["trained_tokens"] == len(a["trained_token_ids"])
        assert tok.decode(a["trained_token_ids"][:-1]) == a["trained_text"]
        assert len(a["trained_parts"]) == len(a["trained_token_ids"])
    lineage = rt.store.query("SELECT trained_text FROM heuristic_lineage WHERE accepted")
    assert {r["trained_text"] for r in lineage} == {a["trained_text"] for a in analyses}
    # the update trained on exactly those targets, and logged the NLL of each part of M
    metrics = {r["name"]: r["value"] for r in rt.store.query("SELECT name, value FROM metrics WHERE step = 1")}
    assert {"nll_bifurcation", "nll_critique", "nll_heuristics"} <= set(metrics)
    assert rt.store.query("SELECT num_nll_sequences FROM updates")[0]["num_nll_sequences"] == 4


def test_heuristics_only_replay_context_is_an_option(tmp_path, micro_model):
    rt, base = scripted_runtime(_cfg(tmp_path, micro_model, "run.name=h", "experience.replay_context=heuristics"),
                                Script())
    run_step(rt, 1, base)
    for r in rt.store.query("SELECT r.prompt_text, a.critique FROM replays r JOIN analyses a USING (analysis_id)"):
        assert r["critique"] not in r["prompt_text"] and r["prompt_text"].startswith("Hint: If a step uses")


def test_a_truncated_analysis_is_counted_and_never_replayed_or_trained(tmp_path, micro_model):
    long_winded = lambda q: compact_analysis(q).replace("Critique:", "Critique: " + "and so on, " * 30)
    rt, base = scripted_runtime(_cfg(tmp_path, micro_model, "run.name=cut", "experience.analysis_max_new_tokens=60"),
                                Script(analysis=long_winded))
    run_step(rt, 1, base)
    rows = rt.store.query("SELECT status, reject_reason, finish_reason, trained_text FROM analyses")
    assert rows and all(r["reject_reason"] == "truncated" and r["finish_reason"] == "length" for r in rows)
    assert all(r["trained_text"] is None for r in rows)
    assert rt.store.query("SELECT count(*) AS n FROM replays")[0]["n"] == 0
    metrics = {r["name"]: r["value"] for r in rt.store.query("SELECT name, value FROM metrics WHERE step = 1")}
    assert metrics["truncated"] == len(rows) and metrics.get("accepted", 0) == 0
    assert rt.store.query("SELECT num_nll_sequences FROM updates")[0]["num_nll_sequences"] == 0


def test_a_paper_format_analysis_from_a_real_layout_goes_through(tmp_path, micro_model):
    """The paper's prompt set: an analysis written as real models write it (fixture w11: plain titles, a new
    problem invented after the heuristics) is parsed, trained without the runaway text, and replayed whole."""
    from tests.conftest import build_micro_model

    text = (FIXTURES / "w11_base_model_runaway_problem.md").read_text()
    wide = build_micro_model(tmp_path / "wide", context=4096)  # the paper's prompts are long in a 300-token vocabulary
    rt, base = scripted_runtime(_cfg(tmp_path, wide, "run.name=paper", "prompts.dir=configs/prompts/paper",
                                     "experience.analysis_max_new_tokens=1200", "model.max_seq_len=4096",
                                     "sampling.max_new_tokens=64", "experience.replay_max_new_tokens=64"),
                                Script(analysis=lambda q: text))
    run_step(rt, 1, base)
    a = rt.store.query("SELECT * FROM analyses")
    assert a and all(r["status"] == "accepted" for r in a), [r["reject_reason"] for r in a]
    r = a[0]
    assert r["bifurcation_step"] is None and "Problem: How many" not in r["trained_text"]
    assert r["trained_text"].endswith("belong to it.")
    replay = rt.store.query("SELECT prompt_text FROM replays WHERE analysis_id = ?", [r["analysis_id"]])[0]
    assert "Meta-experience (reference information)" in replay["prompt_text"]
    assert "treating an inequality in n^2" in replay["prompt_text"] and "Subject Heuristics" in replay["prompt_text"]


def test_the_nll_of_each_part_adds_up_to_the_whole(tmp_path, micro_model):
    """One accepted analysis: its per-token NLL over all trained tokens = the count-weighted parts."""
    rt, base = scripted_runtime(_cfg(tmp_path, micro_model, "run.name=parts", "sampling.prompts_per_step=1"),
                                Script())
    run_step(rt, 1, base)
    m = {r["name"]: r["value"] for r in rt.store.query("SELECT name, value FROM metrics WHERE step = 1")}
    a = rt.store.query("SELECT trained_parts FROM analyses WHERE status = 'accepted'")[0]
    counts = {p: a["trained_parts"].count(i) for i, p in enumerate(meta_experience.PARTS)}
    weighted = sum(counts[p] * m[f"nll_{p}"] for p in meta_experience.PARTS if counts[p])
    assert weighted / sum(counts.values()) == pytest.approx(m["nll_loss"], rel=1e-4)
    assert counts["bifurcation"] and counts["critique"] and counts["heuristics"] and counts["other"] == 1  # eos


@pytest.mark.parametrize("mode", ["shorten", "skip"])
def test_a_long_retrospective_context_keeps_its_head(tmp_path, micro_model, mode):
    """8-operation problems: their analysis prompts (~190-230 tokens here) do not all fit 340 - 160 tokens."""
    window, analysis = 340, 160
    rt, base = scripted_runtime(_cfg(tmp_path, micro_model, f"run.name=long-{mode}", f"model.max_seq_len={window}",
                                     f"experience.analysis_max_new_tokens={analysis}", f"experience.long_context={mode}",
                                     "sampling.max_new_tokens=128", "experience.replay_max_new_tokens=128",
                                     "data.synthetic.min_ops=8", "data.synthetic.max_ops=8"), Script())
    run_step(rt, 1, base)
    rows = rt.store.query("SELECT a.*, pr.question FROM analyses a JOIN pairs USING (pair_id) "
                          "JOIN prompts pr USING (prompt_id)")
    metrics = {r["name"]: r["value"] for r in rt.store.query("SELECT name, value FROM metrics WHERE step = 1")}
    count = lambda text: len(rt.policy.encode_prompts([text])[0])
    too_long = [r for r in rows if r["reject_reason"] == "context_too_long"]
    shortened = [r for r in rows if r["retro_shortened"]]
    assert metrics["retro_skipped"] == len(too_long) and metrics["retro_shortened"] == len(shortened)
    if mode == "skip":
        assert too_long and not shortened and all(r["prompt_text"] is None for r in too_long)
        return
    assert shortened and not too_long
    for r in rows:
        assert r["prompt_text"].startswith(f"Q: {r['question']}\nWrong:\n")  # the head is whole
        assert count(r["prompt_text"]) <= window - analysis  # prompt + analysis + eos fit the window
        assert ("tokens omitted" in r["prompt_text"]) == bool(r["retro_shortened"])
    # accepted analyses were trained on exactly those prompts, with no cut (Policy.encode refuses one)
    assert rt.store.query("SELECT num_nll_sequences FROM updates")[0]["num_nll_sequences"] == len(rows)


def test_fit_cuts_the_middle_of_the_longer_solution_first():
    from mel_core.model import tiny
    from mel_core.problems.prompts import PromptSet

    cfg = C.load("configs/tiny.yaml")
    prompts = PromptSet.load(cfg.prompts.dir)
    tok = tiny.build_tokenizer(cfg.model.tiny, tiny.tokenizer_corpus(prompts, cfg.data.synthetic, 200, 0))
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])
    short, long = "1+2=3\nAnswer: 3", "\n".join(f"{i}+1={i + 1}" for i in range(40)) + "\nAnswer: 41"
    render = lambda a, b: f"Q: 1+2\nWrong:\n{a}\nRight:\n{b}\nAnalysis:\n"
    budget = count(render(short, long)) - 40
    fitted = retrospective.fit(render, short, long, budget, tok, count)
    assert fitted.shortened and count(fitted.prompt) <= budget
    assert f"Wrong:\n{short}\nRight:\n0+1=1" in fitted.prompt and fitted.prompt.rstrip().endswith("Answer: 41\nAnalysis:")
    assert retrospective.fit(render, short, long, budget, tok, count, mode="skip").prompt is None
    assert retrospective.fit(render, short, long, 10, tok, count).prompt is None  # nothing sensible is left


def test_one_tokenization_path_with_a_bos_adding_tokenizer(tmp_path, micro_model):
    """A tokenizer that adds BOS to a prompt (as Llama's does): the engine generates from, and the trainer
    computes log-probs on, the same prompt ids — BOS included — and completions get none."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from mel_core.model.engines.base import Chunk, SamplingParams
    from mel_core.model.engines.hf import HFEngine
    from mel_core.model.policy import Policy
    from mel_core.tokens import encode_completions, encode_prompts

    tok = AutoTokenizer.from_pretrained(micro_model)
    bos = tok.eos_token_id  # the micro vocabulary's one special token stands in for BOS
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{tok.eos_token} $A", special_tokens=[
        (tok.eos_token, bos)])
    path = tmp_path / "bos-model"
    tok.save_pretrained(path)
    for f in Path(micro_model).iterdir():
        if not (path / f.name).exists():
            (path / f.name).write_bytes(f.read_bytes())
    policy = Policy(C.load("configs/tiny.yaml", [f"model.name_or_path={path}"]), path)
    prompts = ["Q: 1+2\n", "Q: 12*3-4\n"]
    ids = encode_prompts(policy.tokenizer, prompts)
    assert all(x[0] == bos for x in ids) and encode_completions(policy.tokenizer, ["1+2=3"])[0][0] != bos
    seen = []
    generate = policy.model.generate
    policy.model.generate = lambda **kw: seen.append(kw["input_ids"].clone()) or generate(**kw)
    engine = HFEngine(policy.model, policy.tokenizer)
    engine.generate_chunk(Chunk(0, prompts), SamplingParams(n=1, temperature=0.0, max_new_tokens=2))
    generated_from = [row.tolist()[-len(x):] for row, x in zip(seen[0], ids)]  # left-padded rows
    assert generated_from == ids
    trained_ids, attn, mask, _ = policy.encode(prompts, [[5, 6], [7]])
    P = trained_ids.size(1) - mask.size(1)
    assert [row[P - len(x):P].tolist() for row, x in zip(trained_ids, ids)] == ids
    assert torch.equal(attn[:, P - len(ids[0]):P][0], torch.ones(len(ids[0]), dtype=attn.dtype))
