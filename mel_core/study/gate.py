"""The gate: before any A/B, can MEL work on this world and this checkpoint at all?

MEL helps only if (a) the policy's own analysis of a contrast *discovers* the lesson that would fix its error,
and (b) learning that lesson by NLL in the retrospective context *reaches the solver*: it moves the solving
decision the lesson names. An A/B run where either is ~0 can only return a null, whatever MEL's merit. The gate
measures both, and what they rest on, on the held-out split of an embedded world that knows its rules
(``World.decision_points``; the rules world, mel_core/problems/worlds/rules.py):

1. **solve accuracy** (greedy Pass@1) where no weak rule applies and on each weak rule's problems;
2. **weak-rule decision accuracy**: given the correct solution up to the step where a weak rule applies, how
   often the policy puts most probability on that rule's tag (teacher-forced, one decision per problem), and
   the mean log-probability of the right tag;
3. **hint gain**: greedy Pass@1 on weak-rule problems with the correct meta-experience in the replay context
   minus with none; and **selectivity**, minus with a mismatched one (another rule's lesson): what the replay
   filter can select on. The meta-experience is the world's analysis of an injected error of the problem's rule,
   rendered as the replay renders it (experience.replay_context);
4. **D (discovery)**: of the policy's own incorrect rollouts in mixed groups (sampled as a step samples them),
   how often its own analysis -- the analysis prompt at experience.analysis_temperature, parsed as the abstract
   stage parses it -- names the rule the rollout broke (``World.classify_error``);
5. **kappa (coupling)**: ``kappa_steps`` MEL updates from the checkpoint at the config's learning rate and lambda,
   on the RL batches of real steps (sampled from the checkpoint) plus NLL on the *correct* lessons of those
   steps' pairs (the world's analysis of each incorrect rollout, in its retrospective context: MEL's volume if
   every pair were accepted) -- against the same updates with each lesson swapped for another rule's
   (mel_core.step.analysts.mismatch: as much NLL, lessons that do not fit) and with no NLL. kappa is the mean change
   of log p(right tag) at the held-out weak-rule decisions, lesson minus mismatched: what the content of a
   lesson does to the decision it names, beyond the extra gradient.

Differences carry paired bootstrap CIs over problems (paired_bootstrap); rates carry Wilson
intervals. The settings below are ours [C]: the paper has no such measurement.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from mel_core.algorithm import losses, meta_experience, pairing
from mel_core.config import ConfigError
from mel_core.ids import derive_seed
from mel_core.model.checkpoints import Checkpoint
from mel_core.model.engines.base import SamplingParams
from mel_core.model.policy import NLLBatch, RLBatch
from mel_core.problems import worlds
from mel_core.step import analysts
from mel_core.step.runtime import Runtime
from mel_core.step.stages import retrospective_prompt
from mel_core.study.ab_test import paired_bootstrap
from mel_core.study.metrics import wilson
from mel_core.tokens import encode_completions, encode_target

CI_LEVEL = 0.95


@dataclass(frozen=True)
class GateSettings:
    """What the gate measures on (all [C]: our choices, no paper counterpart)."""
    max_problems: int = 0  # held-out problems per subset (0: all of the split) -- more problems, narrower CIs
    kappa_steps: int = 3  # MEL updates per kappa arm: a few steps of a campaign's start, where an A/B differs first
    kappa_volume: int = 0  # lessons per kappa step (0: one per pair of the step, MEL's volume at 100% acceptance)
    resamples: int = 2000  # bootstrap resamples per CI
    seed: int = 0  # seeds injected errors and the gate's sampling (with run.seed)


def _difference(a: list[float], b: list[float], s: GateSettings) -> dict:
    """mean(a - b) over paired items, with its bootstrap CI (one row: items resampled)."""
    if not a:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    boot = paired_bootstrap([[x - y for x, y in zip(a, b)]], s.resamples, CI_LEVEL, seed=s.seed)
    return {"mean": boot["mean"], "ci_low": boot["ci_low"], "ci_high": boot["ci_high"], "p": boot["p"], "n": len(a)}


# ------------------------------------------------------------------------------------------ the world


def world_of(rt: Runtime):
    """The run's embedded world, if it can be gated (it knows the decision each step of a solution makes)."""
    cfg = rt.cfg
    if cfg.data.source != "synthetic":
        raise ConfigError("config key 'data.source': the gate measures an embedded world's rules; "
                          f"{cfg.data.source!r} has none (use data.source: synthetic)")
    world = worlds.get(cfg.data.synthetic.world)
    if not hasattr(world, "decision_points"):
        raise ConfigError(f"config key 'data.synthetic.world': the {world.name} world does not name the decision "
                          "each solution step makes; the gate needs one that does (world: rules)")
    return world


def heldout(rt: Runtime, world, s: GateSettings) -> list:
    """The held-out problems, at most `max_problems` per subset (in split order: the subsets are interleaved)."""
    problems = world.problems(rt.cfg.data.synthetic, "eval")
    if not s.max_problems:
        return problems
    taken: dict[str, int] = {}
    out = []
    for p in problems:
        subset = p.meta.get("subset")
        if taken.get(subset, 0) < s.max_problems:
            taken[subset] = taken.get(subset, 0) + 1
            out.append(p)
    return out


# --------------------------------------------------------------------------------------- 1. solving


def _greedy(rt: Runtime, prompts: list[str], golds: list[str], desc: str, problems: list) -> list[float]:
    """Greedy rewards, one per prompt; a reward plug-in is given each prompt's problem, as in evaluation."""
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=rt.cfg.eval.max_new_tokens)
    return [s.verdict.reward for s in rt.solve(prompts, golds, params, desc=desc, problems=problems)]


def solve_accuracy(rt: Runtime, problems: list, weak: tuple[str, ...]) -> dict:
    """Greedy Pass@1 per subset, and where no weak rule applies (every subset that is not a weak rule's)."""
    rewards = _greedy(rt, [rt.model_input(rt.prompts.render_solve(p.question)) for p in problems],
                      [p.answer for p in problems], "gate solve", problems)
    by: dict[str, list[float]] = {}
    for p, r in zip(problems, rewards):
        by.setdefault(p.meta.get("subset"), []).append(r)
    no_weak = [r for p, r in zip(problems, rewards) if p.meta.get("subset") not in weak]
    return {"no_weak_rule": wilson(sum(r > 0 for r in no_weak), len(no_weak)),
            "by_subset": {k: wilson(sum(r > 0 for r in v), len(v)) for k, v in sorted(by.items(), key=str)}}


# -------------------------------------------------------------------------------------- 2. decisions


def option_logprobs(rt: Runtime, contexts: list[str], prefixes: list[str], options: list[tuple[str, ...]]) -> list[list[float]]:
    """log p(option | context, prefix) for every option of every decision, teacher-forced (no sampling).

    Each option is scored as the tokens that `prefix + option` adds to `prefix`'s tokens, so an option of
    several tokens is its summed log-probability; the model is in eval mode while scoring."""
    policy = rt.policy
    rows, spans = option_rows(policy.tokenizer, contexts, prefixes, options)
    out: list[float] = []
    micro = rt.cfg.optim.micro_batch_size or 64
    was_training = policy.model.training
    policy.model.eval()
    try:
        with torch.no_grad(), policy.compute():
            for i in range(0, len(rows), micro):
                chunk = rows[i:i + micro]
                ids, attn, mask, _ = (t.to(policy.device) for t in policy.encode([c for c, _ in chunk],
                                                                                 [x for _, x in chunk]))
                logps = losses.per_token_logps(policy.model, ids, attn, mask.size(1))  # [b, T]
                for j, (start, end) in enumerate(spans[i:i + micro]):
                    out.append(float(logps[j, start:end].sum()))
    finally:
        policy.model.train(was_training)
    it = iter(out)
    return [[next(it) for _ in opts] for opts in options]


def option_rows(tok, contexts: list[str], prefixes: list[str], options: list[tuple[str, ...]]) -> tuple[list, list]:
    """One row (context, completion ids of prefix + option) per option of every decision, and the span of the
    option's own tokens in those ids."""
    rows, spans = [], []
    for ctx, prefix, opts in zip(contexts, prefixes, options):
        head = encode_completions(tok, [prefix])[0] if prefix else []
        for o in opts:
            ids = encode_completions(tok, [prefix + o])[0]
            if ids[:len(head)] != head or len(ids) == len(head):
                raise ValueError(f"option {o!r} does not extend the tokens of its prefix {prefix[-40:]!r}")
            rows.append((ctx, ids))
            spans.append((len(head), len(ids)))
    return rows, spans


def weak_decisions(rt: Runtime, world, problems: list, weak: tuple[str, ...]) -> list[tuple]:
    """(problem, decision) for the first step of each weak-rule problem where its weak rule applies."""
    out = []
    for p in problems:
        if p.meta.get("subset") in weak:
            for d in world.decision_points(p.question):
                if d.right == p.meta["subset"]:
                    out.append((p, d))
                    break
    return out


def decision_scores(rt: Runtime, decisions: list[tuple]) -> dict:
    """Per decision: was the right option the most probable, and the log-probability of the right option."""
    contexts = [rt.model_input(rt.prompts.render_solve(p.question)) for p, _ in decisions]
    scores = option_logprobs(rt, contexts, [d.prefix for _, d in decisions], [d.continuations for _, d in decisions])
    right = [s[d.choices.index(d.right)] for (_, d), s in zip(decisions, scores)]
    correct = [float(max(range(len(s)), key=s.__getitem__) == d.choices.index(d.right))
               for (_, d), s in zip(decisions, scores)]
    return {"right_logp": right, "correct": correct, "rules": [d.right for _, d in decisions]}


def summarise_decisions(scores: dict) -> dict:
    by: dict[str, list[int]] = {}
    for rule, c in zip(scores["rules"], scores["correct"]):
        by.setdefault(rule, []).append(int(c))
    n = len(scores["correct"])
    return {"accuracy": wilson(int(sum(scores["correct"])), n),
            "mean_right_logp": sum(scores["right_logp"]) / n if n else None,
            "by_rule": {r: wilson(sum(v), len(v)) for r, v in sorted(by.items())}}


# ------------------------------------------------------------------------------------------- 3. hints


def _experience_text(rt: Runtime, problem, analysis: str) -> str | None:
    m = meta_experience.parse_analysis(analysis, gold_answer=problem.answer, question=problem.question,
                                       max_heuristics=rt.cfg.experience.max_heuristics)
    return meta_experience.render_experience(m, rt.cfg.experience.replay_context) if m.ok else None


def hint_gain(rt: Runtime, world, problems: list, weak: tuple[str, ...], s: GateSettings) -> dict:
    """Greedy Pass@1 on weak-rule problems with no meta-experience, the right one and a mismatched one."""
    rng = random.Random(derive_seed(rt.cfg.run.seed, s.seed, "gate-hints"))
    rows = []
    for p in problems:
        rule = p.meta.get("subset")
        if rule not in weak:
            continue
        injected = world.inject_error(p.question, rule, rng)
        analysis = world.oracle_analysis(p.question, injected[0]) if injected else None
        if analysis is None:
            continue
        right = _experience_text(rt, p, analysis)
        wrong = _experience_text(rt, p, analysts.mismatch(analysis, world.error_types))
        if right and wrong:
            rows.append((p, right, wrong))
    if not rows:
        return {"problems": 0}
    golds = [p.answer for p, _, _ in rows]
    render = lambda q, e: rt.model_input(rt.prompts.render_validation(q, e))
    asked = [p for p, _, _ in rows]
    none = _greedy(rt, [rt.model_input(rt.prompts.render_solve(p.question)) for p in asked], golds, "gate no hint",
                   asked)
    right = _greedy(rt, [render(p.question, e) for p, e, _ in rows], golds, "gate right hint", asked)
    wrong = _greedy(rt, [render(p.question, e) for p, _, e in rows], golds, "gate mismatched hint", asked)
    acc = lambda xs: wilson(sum(x > 0 for x in xs), len(xs))
    by_rule = {}
    for rule in weak:
        idx = [i for i, (p, _, _) in enumerate(rows) if p.meta["subset"] == rule]
        if idx:
            by_rule[rule] = {"none": acc([none[i] for i in idx]), "right": acc([right[i] for i in idx]),
                             "mismatched": acc([wrong[i] for i in idx])}
    return {"problems": len(rows), "none": acc(none), "right": acc(right), "mismatched": acc(wrong),
            "gain": _difference(right, none, s), "selectivity": _difference(right, wrong, s), "by_rule": by_rule}


# ---------------------------------------------------------------------------------------- 4. discovery


def _sample_groups(rt: Runtime, problems: list, seed: int, desc: str) -> list[tuple]:
    """B x G rollouts at the rollout temperature, verified: [(problem, [(text, token_ids, reward)])]."""
    c = rt.cfg.sampling
    prompts = [rt.model_input(rt.prompts.render_solve(p.question)) for p in problems]
    params = SamplingParams(n=c.group_size, temperature=c.temperature, top_p=c.top_p,
                            max_new_tokens=c.max_new_tokens, seed=seed)
    solved = rt.solve(prompts, [p.answer for p in problems], params, desc=desc, problems=problems)
    groups = [(p, prompt, []) for p, prompt in zip(problems, prompts)]
    for x in solved:
        groups[x.prompt_index][2].append((x.completion.text, x.completion.token_ids, x.verdict.reward))
    return groups


def _pairs(rt: Runtime, groups: list[tuple], seed: int) -> list[tuple]:
    """(problem, incorrect text, correct text) for the pairs a step would form (experience.pairing)."""
    ids = {f"{i}": g for i, g in enumerate(groups)}
    rewards = {i: [(f"{i}:{j}", r) for j, (_, _, r) in enumerate(g[2])] for i, g in ids.items()}
    out = []
    for pair in pairing.make_pairs(rewards, rt.cfg.experience.pairs_per_group, seed,
                                      strategy=rt.cfg.experience.pairing):
        problem, _, rollouts = ids[pair.prompt_id]
        text = {rid: rollouts[int(rid.split(":")[1])][0] for rid in (pair.incorrect_rollout_id, pair.correct_rollout_id)}
        out.append((problem, text[pair.incorrect_rollout_id], text[pair.correct_rollout_id]))
    return out


def _analysis_prompt(rt: Runtime, problem, incorrect: str, correct: str) -> str | None:
    return retrospective_prompt(rt, lambda a, b: rt.prompts.render_analysis(problem.question, a, b),
                                incorrect, correct).prompt


def discovery(rt: Runtime, world, problems: list, s: GateSettings) -> dict:
    """D: the share of the policy's own errors (in mixed groups) whose own analysis names the broken rule."""
    seed = derive_seed(rt.cfg.run.seed, s.seed, "gate-discovery")
    pairs = _pairs(rt, _sample_groups(rt, problems, seed, "gate discovery rollouts"), seed)
    jobs = []
    for problem, incorrect, correct in pairs:
        true_rule = world.classify_error(problem.question, incorrect.splitlines())
        prompt = _analysis_prompt(rt, problem, incorrect, correct)
        if true_rule is not None and prompt is not None:
            jobs.append((problem, true_rule, prompt))
    if not jobs:
        return {"pairs": len(pairs), "classified": 0, "D": wilson(0, 0)}
    params = SamplingParams(n=1, temperature=rt.cfg.experience.analysis_temperature,
                            max_new_tokens=rt.cfg.experience.analysis_max_new_tokens, seed=seed)
    outs = [c for (c,) in rt.engine.generate([j[2] for j in jobs], params, desc="gate discovery analyses")]
    hits, parsed, by_rule, confusion = 0, 0, {}, {}
    for (problem, true_rule, _), c in zip(jobs, outs):
        m = meta_experience.parse_analysis(c.text, gold_answer=problem.answer, question=problem.question,
                                           max_heuristics=rt.cfg.experience.max_heuristics)
        named = worlds.named_rules(world, m.heuristics) if m.ok and c.finish_reason != "length" else []
        parsed += m.ok
        hit = true_rule in named
        hits += hit
        by_rule.setdefault(true_rule, []).append(hit)
        said = named[0] if named else ("unparsed" if not m.ok else "other")
        confusion.setdefault(true_rule, {}).setdefault(said, 0)
        confusion[true_rule][said] += 1
    return {"pairs": len(pairs), "classified": len(jobs), "parsed": wilson(parsed, len(jobs)),
            "D": wilson(hits, len(jobs)), "by_rule": {r: wilson(sum(v), len(v)) for r, v in sorted(by_rule.items())},
            "named": confusion}


# ------------------------------------------------------------------------------------------ 5. coupling


def rl_batch(rt: Runtime, groups: list[tuple]) -> RLBatch:
    """The RL batch a step trains on from its sampled groups: every rollout with its group's advantage."""
    prompts, completions, rewards, group_ids = [], [], [], []
    for g, (_, prompt, rollouts) in enumerate(groups):
        for _, ids, r in rollouts:
            prompts.append(prompt), completions.append(ids), rewards.append(r), group_ids.append(g)
    advantages = losses.get_advantage(rt.cfg.loss.advantage)(torch.tensor(rewards, dtype=torch.float32),
                                                           torch.tensor(group_ids))  # [B*G]
    return RLBatch(prompts, completions, advantages)


def _kappa_batches(rt: Runtime, world, s: GateSettings) -> list[tuple[RLBatch, NLLBatch, NLLBatch]]:
    """Per kappa step: the step's RL batch (B x G rollouts of its training problems from the checkpoint) and the
    NLL batches of its pairs' correct and mismatched lessons, each in its retrospective context."""
    tok = rt.policy.tokenizer
    out = []
    for step in range(1, s.kappa_steps + 1):
        seed = derive_seed(rt.cfg.run.seed, s.seed, "gate-kappa", step)
        groups = _sample_groups(rt, rt.step_problems(step), seed, f"gate kappa rollouts {step}")
        lessons = {"right": ([], [], []), "mismatched": ([], [], [])}
        for problem, incorrect, correct in _pairs(rt, groups, seed):
            analysis = world.oracle_analysis(problem.question, incorrect.splitlines())
            prompt = _analysis_prompt(rt, problem, incorrect, correct) if analysis else None
            if prompt is None:
                continue
            for kind, text in (("right", analysis), ("mismatched", analysts.mismatch(analysis, world.error_types))):
                m = meta_experience.parse_analysis(text, gold_answer=problem.answer, question=problem.question,
                                                   max_heuristics=rt.cfg.experience.max_heuristics)
                if m.ok:
                    ids, parts = encode_target(tok, m.target_text, m.spans, meta_experience.PARTS)
                    for xs, x in zip(lessons[kind], (prompt, ids, parts)):
                        xs.append(x)
        cap = s.kappa_volume or None
        nll = {k: NLLBatch(prompts=p[:cap], target_ids=t[:cap], parts=q[:cap], part_names=meta_experience.PARTS)
               for k, (p, t, q) in lessons.items()}
        out.append((rl_batch(rt, groups), nll["right"], nll["mismatched"]))
    return out


def coupling(rt: Runtime, world, ckpt: Checkpoint, decisions: list[tuple], s: GateSettings) -> dict:
    """kappa: log p(right tag) at the held-out weak-rule decisions after MEL updates on correct lessons, minus
    after the same updates on mismatched lessons (and the RL-only updates for reference)."""
    batches = _kappa_batches(rt, world, s)
    before = decision_scores(rt, decisions)
    arms = {}
    for arm in ("rl_only", "right", "mismatched"):
        rt.policy.load_checkpoint(ckpt.path)  # every arm starts from the checkpoint and its optimizer state
        stats = []
        for rl, right, mismatched in batches:
            nll = {"rl_only": None, "right": right, "mismatched": mismatched}[arm]
            stats.append(rt.policy.train_step(rl, nll))
        arms[arm] = {"scores": decision_scores(rt, decisions),
                     "nll_sequences": sum(x["num_nll_sequences"] for x in stats),
                     "nll_loss_first": stats[0].get("nll_loss") if nll else None,
                     "nll_loss_last": stats[-1].get("nll_loss") if nll else None}
    rt.policy.load_checkpoint(ckpt.path)
    rt.forget_version()  # the runtime reloads the checkpoint before its next use
    lp = {a: v["scores"]["right_logp"] for a, v in arms.items()}
    acc = {a: v["scores"]["correct"] for a, v in arms.items()}
    per_rule = {}
    for rule in sorted(set(before["rules"])):
        idx = [i for i, r in enumerate(before["rules"]) if r == rule]
        per_rule[rule] = _difference([lp["right"][i] for i in idx], [lp["mismatched"][i] for i in idx], s)
    return {
        "steps": s.kappa_steps, "lr": rt.cfg.optim.lr, "nll_coef": rt.cfg.loss.nll_coef,
        "lessons_per_step": [len(r.prompts) for _, r, _ in batches],
        "rollouts_per_step": len(batches[0][0].prompts) if batches else 0,
        "kappa": _difference(lp["right"], lp["mismatched"], s),
        "kappa_by_rule": per_rule,
        "right_vs_rl_only": _difference(lp["right"], lp["rl_only"], s),
        "mismatched_vs_rl_only": _difference(lp["mismatched"], lp["rl_only"], s),
        "decision_accuracy": {"before": sum(before["correct"]) / max(1, len(decisions)),
                              **{a: sum(v) / max(1, len(v)) for a, v in acc.items()}},
        "mean_right_logp": {"before": sum(before["right_logp"]) / max(1, len(decisions)),
                            **{a: sum(v) / max(1, len(v)) for a, v in lp.items()}},
        "nll": {a: {"sequences": v["nll_sequences"], "first": v["nll_loss_first"], "last": v["nll_loss_last"]}
                for a, v in arms.items() if a != "rl_only"},
    }


# ---------------------------------------------------------------------------------------------- gate


def run_gate(rt: Runtime, ckpt: Checkpoint, s: GateSettings = GateSettings()) -> dict:
    """Every measurement of the gate on checkpoint `ckpt` (module docstring); returns the report as data."""
    world = world_of(rt)
    rt.ensure_version(ckpt)
    weak = tuple(world.weak_rules(rt.cfg.data.synthetic))
    problems = heldout(rt, world, s)
    decisions = weak_decisions(rt, world, problems, weak)
    report = {"world": world.name, "checkpoint": asdict(ckpt), "settings": asdict(s), "weak_rules": list(weak),
              "heldout_problems": len(problems),
              "solve": solve_accuracy(rt, problems, weak),
              "decisions": summarise_decisions(decision_scores(rt, decisions)),
              "hints": hint_gain(rt, world, problems, weak, s),
              "discovery": discovery(rt, world, problems, s)}
    report["coupling"] = coupling(rt, world, ckpt, decisions, s)
    d, k = report["discovery"]["D"], report["coupling"]["kappa"]
    report["verdict"] = {"D_above_zero": bool(d["ci_low"] and d["ci_low"] > 0),
                         "kappa_above_zero": bool(k["ci_low"] is not None and k["ci_low"] > 0)}
    report["verdict"]["open"] = report["verdict"]["D_above_zero"] and report["verdict"]["kappa_above_zero"]
    return report


def _pct(w: dict | None) -> str:
    if not w or w.get("rate") is None:
        return "-"
    return f"{100 * w['rate']:.1f}% [{100 * w['ci_low']:.1f}, {100 * w['ci_high']:.1f}] (n={w['n']})"


def _diff(d: dict | None, scale: float = 100.0, unit: str = " pts") -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{scale * d['mean']:+.2f}{unit} [{scale * d['ci_low']:+.2f}, {scale * d['ci_high']:+.2f}] (n={d['n']})"


def format_gate(r: dict) -> str:
    """The gate's report as markdown: one table per measurement, the verdict last."""
    lines = [f"# Gate: {r['world']} world, checkpoint {r['checkpoint']['path']}", "",
             (f"{r['heldout_problems']} held-out problems; weak rules: {', '.join(r['weak_rules'])}. 95% intervals "
             "(Wilson for rates, paired bootstrap for differences)."), "",
             "| measurement | value |", "|---|---|",
             f"| solve accuracy, no weak rule applies | {_pct(r['solve']['no_weak_rule'])} |"]
    lines += [f"| solve accuracy, subset {k} | {_pct(v)} |" for k, v in r["solve"]["by_subset"].items()]
    dec = r["decisions"]
    lines += [f"| weak-rule decision accuracy | {_pct(dec['accuracy'])} |"]
    lines += [f"| decision accuracy, {k} | {_pct(v)} |" for k, v in dec["by_rule"].items()]
    h = r["hints"]
    if h.get("problems"):
        lines += [f"| weak-rule Pass@1, no hint | {_pct(h['none'])} |",
                  f"| weak-rule Pass@1, right M in context | {_pct(h['right'])} |",
                  f"| weak-rule Pass@1, mismatched M in context | {_pct(h['mismatched'])} |",
                  f"| **hint gain** (right - none) | {_diff(h['gain'])} |",
                  f"| **selectivity** (right - mismatched) | {_diff(h['selectivity'])} |"]
    d = r["discovery"]
    lines += [f"| own errors in mixed groups (pairs, classified) | {d['pairs']}, {d['classified']} |",
              f"| analyses parsed | {_pct(d.get('parsed'))} |",
              f"| **D**: own analysis names the broken rule | {_pct(d['D'])} |"]
    lines += [f"| D, {k} | {_pct(v)} |" for k, v in d.get("by_rule", {}).items()]
    c = r["coupling"]
    lines += [(f"| kappa updates | {c['steps']} steps at lr {c['lr']:g}, lambda {c['nll_coef']:g}; lessons per step "
              f"{c['lessons_per_step']}; {c['rollouts_per_step']} rollouts per step |"),
              f"| **kappa**: d log p(right tag), right - mismatched lessons | {_diff(c['kappa'], 1.0, ' nats')} |",
              f"| right lessons - RL only | {_diff(c['right_vs_rl_only'], 1.0, ' nats')} |",
              f"| mismatched lessons - RL only | {_diff(c['mismatched_vs_rl_only'], 1.0, ' nats')} |"]
    lines += [f"| kappa, {k} | {_diff(v, 1.0, ' nats')} |" for k, v in c["kappa_by_rule"].items()]
    acc = c["decision_accuracy"]
    lines += [(f"| decision accuracy before / RL only / right / mismatched | {acc['before']:.3f} / {acc['rl_only']:.3f}"
              f" / {acc['right']:.3f} / {acc['mismatched']:.3f} |")]
    v = r["verdict"]
    lines += ["", f"Verdict: D > 0: **{'yes' if v['D_above_zero'] else 'no'}**; kappa > 0: "
              f"**{'yes' if v['kappa_above_zero'] else 'no'}** (lower 95% bound above zero). "
              + ("An A/B here can show whether MEL's lessons help." if v["open"] else
                 "An A/B at these settings can only return a null: change the settings first."), ""]
    return "\n".join(lines)
