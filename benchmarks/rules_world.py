"""The rules world's warm start, measured: greedy accuracy per rule, the weak rules' decisions, and what a lesson
in context does (docs/results/world.md).

Greedy decoding (the HF engine, as the campaign's evaluation) on the held-out split of data.synthetic.rules:

- accuracy overall, on `plain` problems (no exception rule applies) and on each exception rule's problems;
- weak-rule decision accuracy: on an exception rule's problems, how often the step where the rule applies is
  written with its tag (greedy, and sampled at temperature 1 -- the successes GRPO learns from);
- the policy's own analysis of an injected error of each rule: parses, names the bifurcation step, states the
  rule's lesson;
- the hint effect, on the same problems through the validation prompt (the replay's ``Hint: ... Q: ...``):
  no hint; the correct analysis (the oracle's analysis of an error of the rule the problem needs); a true
  analysis of this problem naming another rule (an injected error of a rule every solver gets right); the
  correct bifurcation and critique with another exception rule's lesson; the correct lesson alone; another
  exception rule's lesson alone.

    .venv/bin/python benchmarks/rules_world.py [--config configs/tiny-rules.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mel_core import config as C
from mel_core.algorithm import meta_experience
from mel_core.algorithm.rewards.synthetic import verify_synthetic
from mel_core.model import tiny
from mel_core.model.engines.base import SamplingParams
from mel_core.problems.prompts import PromptSet
from mel_core.problems.worlds import rules as R

HINTS = ("none", "correct analysis", "analysis of another rule", "critique + wrong lesson", "correct lesson alone",
         "wrong lesson alone")
STRONG_RULES = tuple(t for t in R.ERROR_TYPES if t not in R.EXCEPTION_RULES)


def exception_step(question: str) -> int:
    """0-based index of the step where the problem's one exception rule applies."""
    return next(i for i, s in enumerate(R.solve(question)) if s.tag in R.EXCEPTION_RULES)


def decision_right(text: str, question: str) -> bool:
    """The generated solution writes the exception rule's tag at its step."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    k = exception_step(question)
    right = R.solution_lines(question)[k]
    return len(lines) > k and lines[k].split()[3:4] == right.split()[3:4]  # "k command digit TAG digit"


def hints(question: str, rule: str, rng: random.Random) -> dict[str, str | None]:
    """The hint texts of HINTS for one problem of exception rule `rule` (None: the solve prompt)."""
    wrong, _ = R.inject_error(question, rule, rng)
    correct = R.oracle_analysis(question, wrong)
    other_rule = rng.choice([t for t in R.EXCEPTION_RULES if t != rule])
    strong = [t for t in STRONG_RULES if R.inject_error(question, t, rng) is not None]
    other = R.analysis_target(R.inject_error(question, strong[0], rng)[0], R.solution_lines(question), strong[0]) \
        if strong else None
    head = correct.rsplit("\n", 1)[0]
    return {"none": None, "correct analysis": correct, "analysis of another rule": other,
            "critique + wrong lesson": f"{head}\nHeuristic: {R.ERROR_TYPES[other_rule]}",
            "correct lesson alone": R.ERROR_TYPES[rule], "wrong lesson alone": R.ERROR_TYPES[other_rule]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny-rules.yaml")
    ap.add_argument("--samples", type=int, default=8, help="samples per problem at temperature 1")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = C.load(args.config, args.overrides)
    assert cfg.data.synthetic.world == "rules", "this benchmark measures the rules world"
    if cfg.run.torch_threads:
        torch.set_num_threads(cfg.run.torch_threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny.ensure_warm_start(cfg)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    prompts = PromptSet.load(cfg.prompts.dir)
    held_out = R.problems(cfg.data.synthetic, "eval")
    weak = [p for p in held_out if p.meta["subset"] in R.EXCEPTION_RULES]
    budget = cfg.eval.max_new_tokens
    t0 = time.perf_counter()

    texts = tiny.greedy_generate(model, tok, [prompts.render_solve(p.question) for p in held_out], budget)
    rewards = [verify_synthetic(t, p.answer).reward for t, p in zip(texts, held_out)]
    by_subset = tiny.accuracy_by_subset(held_out, rewards)
    greedy_decisions = {p.problem_id: decision_right(t, p.question) for t, p in zip(texts, held_out)
                        if p.meta["subset"] in R.EXCEPTION_RULES}

    from mel_core.model.engines.hf import HFEngine
    sampled = HFEngine(model, tok).generate([prompts.render_solve(p.question) for p in weak],
                                            SamplingParams(n=args.samples, temperature=1.0, max_new_tokens=budget,
                                                           seed=0))
    sampled_decisions = {p.problem_id: sum(decision_right(c.text, p.question) for c in cs) / len(cs)
                         for p, cs in zip(weak, sampled)}
    sampled_rewards = {p.problem_id: sum(verify_synthetic(c.text, p.answer).reward for c in cs) / len(cs)
                       for p, cs in zip(weak, sampled)}

    rng = random.Random(0)
    hint_texts = [hints(p.question, p.meta["subset"], rng) for p in weak]
    hint_rewards: dict[str, list[float]] = {}
    for name in HINTS:
        rows = [(p, h[name]) for p, h in zip(weak, hint_texts) if h[name] is not None or name == "none"]
        rendered = [prompts.render_solve(p.question) if h is None else prompts.render_validation(p.question, h)
                    for p, h in rows]
        outs = tiny.greedy_generate(model, tok, rendered, budget)
        hint_rewards[name] = [verify_synthetic(t, p.answer).reward for t, (p, _) in zip(outs, rows)]
        hint_rewards[name + ":subsets"] = [p.meta["subset"] for p, _ in rows]

    # The policy's own analysis of an injected error of each rule (the analysis prompt, greedy): does it parse,
    # name the bifurcation step, and state the rule's lesson?
    analysis_rows = []
    for error_type in R.ERROR_TYPES:
        for p in held_out:
            injected = R.inject_error(p.question, error_type, rng)
            if injected is not None:
                analysis_rows.append((error_type, p, injected))
    analysis_texts = tiny.greedy_generate(model, tok, [
        prompts.render_analysis(p.question, "\n".join(wrong), "\n".join(R.solution_lines(p.question)))
        for _, p, (wrong, _) in analysis_rows], cfg.experience.analysis_max_new_tokens)
    analysis_by_type: dict[str, list[tuple[bool, bool, bool]]] = {}
    for (error_type, p, (wrong, k)), text in zip(analysis_rows, analysis_texts):
        parsed = meta_experience.parse_analysis(text, gold_answer=p.answer, question=p.question)
        analysis_by_type.setdefault(error_type, []).append(
            (parsed.ok, parsed.bifurcation_step == k, parsed.ok and parsed.heuristics[:1] == [R.ERROR_TYPES[error_type]]))

    summary = tiny.read_summary(path)
    print(f"warm start {path.name}: {summary['steps']} steps, {summary['seconds']}s ({summary['train_seconds']}s "
          f"training), torch threads {summary['torch_threads']}, {summary['parameters'] / 1e6:.2f}M parameters; "
          f"weak rules {cfg.data.synthetic.rules.weak_rules} at rate {cfg.data.synthetic.rules.weak_rate}; "
          f"analysis parse rate {summary['analysis_parse_rate']:.3f}, bifurcation step right "
          f"{summary['analysis_step_accuracy']:.3f}, rule right {summary['analysis_rule_accuracy']:.3f}")
    print(f"\n{len(held_out)} held-out problems, greedy unless stated ({time.perf_counter() - t0:.0f}s)\n")
    rules = [s for s in R.EXCEPTION_RULES if s in by_subset]
    print("| | all | plain | " + " | ".join(rules) + " |")
    print("|---|---|---|" + "---|" * len(rules))
    print(f"| Pass@1 (greedy) | {sum(rewards) / len(rewards):.3f} | {by_subset['plain']:.3f} | "
          + " | ".join(f"{by_subset[s]:.3f}" for s in rules) + " |")

    def per_rule(values: dict[str, float]) -> str:
        means = [sum(v for p, v in ((p, values[p.problem_id]) for p in weak) if p.meta["subset"] == s)
                 / sum(p.meta["subset"] == s for p in weak) for s in rules]
        return " | ".join(f"{m:.3f}" for m in means)

    print(f"| weak-rule decision right (greedy) | {sum(greedy_decisions.values()) / len(greedy_decisions):.3f} | - | "
          f"{per_rule({k: float(v) for k, v in greedy_decisions.items()})} |")
    print(f"| weak-rule decision right (T=1, {args.samples} samples) | "
          f"{sum(sampled_decisions.values()) / len(sampled_decisions):.3f} | - | {per_rule(sampled_decisions)} |")
    print(f"| Pass@1 sampled (T=1) | {sum(sampled_rewards.values()) / len(sampled_rewards):.3f} | - | "
          f"{per_rule(sampled_rewards)} |")
    print(f"\nHint in context (validation prompt), greedy Pass@1 on the {len(weak)} held-out problems of an "
          f"exception rule\n")
    print("| hint | n | all | " + " | ".join(rules) + " |")
    print("|---|---|---|" + "---|" * len(rules))
    for name in HINTS:
        values, subsets = hint_rewards[name], hint_rewards[name + ":subsets"]
        cells = [sum(v for v, s in zip(values, subsets) if s == r) / max(1, sum(s == r for s in subsets))
                 for r in rules]
        print(f"| {name} | {len(values)} | {sum(values) / max(1, len(values)):.3f} | "
              + " | ".join(f"{c:.3f}" for c in cells) + " |")
    print(f"\nThe policy's own analysis (greedy) of an injected error, per rule broken ({len(analysis_rows)} "
          f"held-out cases)\n")
    print("| rule broken | weak | n | parses | bifurcation step right | states the rule's lesson |")
    print("|---|---|---|---|---|---|")
    for error_type, rows in analysis_by_type.items():
        n = len(rows)
        print(f"| {error_type} | {'yes' if error_type in cfg.data.synthetic.rules.weak_rules else 'no'} | {n} | "
              + " | ".join(f"{sum(r[i] for r in rows) / n:.3f}" for i in range(3)) + " |")
    example = hint_texts[0]
    print("\nExample hints (first problem: " + weak[0].question + ")")
    for name in HINTS[1:]:
        print(f"- {name}: {example[name]!r}")


if __name__ == "__main__":
    main()
