"""The per-part gradient probe (`mel gate --probe`): which parts of an analysis M push the held-out weak-rule
decisions toward the right tag, and does anything MEL trains on do so at all?

On a checkpoint (issue 22, item 3):

- **g_dec** = ∇ mean log p(right tag) over the held-out weak-rule decisions (the gate's ``weak_decisions``,
  teacher-forced in the solve prompt): the direction that would fix what MEL is meant to fix.
- The NLL of the analyses MEL would train on -- the world's (oracle) analysis of each incorrect rollout of a
  step's mixed groups, sampled from the checkpoint as the gate's kappa samples them, in its retrospective
  context -- split into parts that partition its tokens: s* (``Bifurcation: step k``), the **wrong-line half
  of C** (the tokens that quote the incorrect solution line, which write the weak rule's wrong decision in
  solver syntax), the **rest of C** (``Critique:``, ``should be`` and the right line), H (the heuristic) and
  the rest (newlines, eos). Each part's loss is its share of MEL's NLL (token mean per sequence over *all* the
  sequence's target tokens, mean over sequences), so the parts' gradients sum to the gradient of the whole.
- The **RL batch** gradient: the config's policy loss on the same step's B x G rollouts (pi_old = pi_theta).

For each, the update direction d = -∇L (what a descent step on it moves), its norm, and its cosine with g_dec:
raw, and in Adam's metric -- preconditioned by 1/(sqrt(v) + eps), v the checkpoint's exp_avg_sq
(bias-corrected) where the checkpoint holds an optimizer state, else the mean over the batches of the squared
MEL gradient (RL + lambda NLL: the second moment a fresh Adam takes its first steps with). A positive cosine
means a small step on that part raises log p(right tag).

The confirmation: from the checkpoint (and its optimizer state), ``steps`` optimizer steps on one part's NLL
alone (and on all of M, and on the RL batch alone), per batch seed; the change of mean log p(right tag) at the
held-out decisions, mean over seeds with a paired bootstrap CI over decisions.

And, from the same forward pass, the NLL per part (nats per token) of the oracle analyses at the checkpoint:
what a campaign's first step would log as nll_bifurcation / nll_critique / nll_heuristics. All settings [C].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from mel_core.algorithm import losses, meta_experience
from mel_core.ids import derive_seed
from mel_core.model.checkpoints import Checkpoint
from mel_core.model.policy import RLBatch
from mel_core.step.runtime import Runtime
from mel_core.study import gate
from mel_core.tokens import encode_target

# The probe's parts of M: the parser's PARTS with C split into the quote of the incorrect line and the rest.
PROBE_PARTS = ("other", "bifurcation", "critique_wrong", "critique_rest", "heuristics")
# What the tables call each part-mask, and the parts it holds.
MASKS = {"s*": ("bifurcation",), "C: wrong line": ("critique_wrong",), "C: rest": ("critique_rest",),
         "H": ("heuristics",), "other (newlines, eos)": ("other",), "all of M": PROBE_PARTS}
STEP_MASKS = ("s*", "C: wrong line", "C: rest", "H", "all of M")  # confirmed by optimizer steps


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe measures on (all [C])."""
    batches: int = 3  # batch seeds: the RL batches and analyses of steps 1..batches, sampled from the checkpoint
    steps: int = 5  # optimizer steps per part mask and batch seed in the confirmation
    max_problems: int = 0  # held-out problems per subset for the decisions (0: all of the split)
    resamples: int = 2000  # bootstrap resamples per CI
    seed: int = 0


@dataclass
class Lesson:
    prompt: str  # the retrospective context (analysis prompt)
    target_ids: list[int]  # M*'s ids, eos last
    labels: list[int]  # per id, its index in PROBE_PARTS
    rule: str  # the rule the incorrect rollout broke


# ------------------------------------------------------------------------------------------ the lessons


def split_critique(target: str, spans: list[tuple[str, int, int]], wrong_line: str) -> list[tuple[str, int, int]]:
    """The parser's spans with the critique cut into the quote of `wrong_line` (its text and the space before it:
    a token is labelled by its first character) and the rest. A critique that does not quote it stays rest."""
    out = []
    for part, a, b in spans:
        if part != "critique":
            out.append((part, a, b))
            continue
        at = target.find(wrong_line, a, b) if wrong_line else -1
        if at < 0:
            out.append(("critique_rest", a, b))
            continue
        start = at - 1 if at > a and target[at - 1] == " " else at
        end = at + len(wrong_line)
        out += [(p, x, y) for p, x, y in (("critique_rest", a, start), ("critique_wrong", start, end),
                                          ("critique_rest", end, b)) if y > x]
    return out


def lesson_of(rt: Runtime, world, problem, incorrect: str, correct: str) -> Lesson | None:
    """The oracle analysis of one pair as MEL would train on it, its tokens labelled by PROBE_PARTS; None when the
    incorrect rollout broke no rule or its context does not fit."""
    rule = world.classify_error(problem.question, incorrect.splitlines())
    analysis = world.oracle_analysis(problem.question, incorrect.splitlines()) if rule else None
    prompt = gate._analysis_prompt(rt, problem, incorrect, correct) if analysis else None
    if prompt is None:
        return None
    m = meta_experience.parse_analysis(analysis, gold_answer=problem.answer, question=problem.question,
                                       max_heuristics=rt.cfg.experience.max_heuristics)
    if not m.ok:
        return None
    critique = next((line for line in analysis.splitlines() if line.startswith("Critique: ")), "")
    wrong_line = critique.removeprefix("Critique: ").split(" should be ")[0]
    spans = split_critique(m.target_text, m.spans, wrong_line)
    ids, labels = encode_target(rt.policy.tokenizer, m.target_text, spans, PROBE_PARTS)
    return Lesson(prompt, ids, labels, rule)


def probe_batches(rt: Runtime, world, s: ProbeSettings) -> list[tuple[RLBatch, list[Lesson]]]:
    """Per batch seed: step i's RL batch sampled from the checkpoint, and the lessons of its pairs."""
    out = []
    for i in range(1, s.batches + 1):
        seed = derive_seed(rt.cfg.run.seed, s.seed, "gate-probe", i)
        groups = gate._sample_groups(rt, rt.step_problems(i), seed, f"probe rollouts {i}")
        lessons = [lesson_of(rt, world, *pair) for pair in gate._pairs(rt, groups, seed)]
        out.append((gate.rl_batch(rt, groups), [x for x in lessons if x is not None]))
    return out


# ---------------------------------------------------------------------------------------------- losses


def _params(rt: Runtime) -> list[torch.Tensor]:
    return [p for p in rt.policy.model.parameters() if p.requires_grad]


def gradient(rt: Runtime, loss_fn) -> torch.Tensor:
    """∇ loss_fn() over every trainable parameter, flattened (float64): one vector of the model's size."""
    params = _params(rt)
    rt.policy.model.train()
    for p in params:
        p.grad = None
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().double().flatten()
                      for g, p in zip(grads, params)])


def _lesson_logps(rt: Runtime, lessons: list[Lesson]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the lessons' targets in their contexts [M, T], the target mask [M, T] and each
    token's part index [M, T]."""
    policy = rt.policy
    ids, attn, mask, labels = (t.to(policy.device) for t in policy.encode(
        [x.prompt for x in lessons], [x.target_ids for x in lessons], [x.labels for x in lessons]))
    with policy.compute():
        logps = losses.per_token_logps(policy.model, ids, attn, mask.size(1), 1.0)  # [M, T]
    return logps, mask, labels


def part_nll(logps: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, parts: tuple[str, ...]) -> torch.Tensor:
    """The parts' share of MEL's NLL: -(1/M) Σ_i (1/n_i) Σ_{t of seq i in `parts`} log p_t, n_i = all of seq i's
    target tokens. Masks that partition the tokens give losses that sum to losses.nll_loss, and gradients too."""
    keep = torch.zeros_like(mask, dtype=torch.bool)
    for name in parts:
        keep |= labels == PROBE_PARTS.index(name)
    keep &= mask.bool()
    per_seq = -(logps.masked_fill(~keep, 0.0)).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [M]
    return per_seq.mean()


def rl_loss(rt: Runtime, rl: RLBatch) -> torch.Tensor:
    """The config's policy loss on the batch at pi_old = pi_theta (one step's L_RL; with beta > 0 the reference is
    the checkpoint itself, whose KL gradient there is zero)."""
    L, policy = rt.cfg.loss, rt.policy
    ids, attn, mask, _ = (t.to(policy.device) for t in policy.encode(rl.prompts, rl.completion_ids))
    with policy.compute():
        logps = losses.per_token_logps(policy.model, ids, attn, mask.size(1), rt.cfg.sampling.temperature)
    loss, _ = losses.policy_loss(L.policy_loss, logps, logps.detach(), rl.advantages.to(logps), mask,
                                 ref_per_token_logps=logps.detach() if L.beta > 0 else None, beta=L.beta,
                                 epsilon=L.epsilon, epsilon_high=L.epsilon_high,
                                 max_completion_length=rt.cfg.sampling.max_new_tokens)
    return loss


def decision_objective(rt: Runtime, decisions: list[tuple]) -> torch.Tensor:
    """mean log p(right tag) over the decisions, teacher-forced in the solve prompt (differentiable)."""
    policy = rt.policy
    contexts = [rt.model_input(rt.prompts.render_solve(p.question)) for p, _ in decisions]
    rows, spans = gate.option_rows(policy.tokenizer, contexts, [d.prefix for _, d in decisions],
                                   [(d.continuations[d.choices.index(d.right)],) for _, d in decisions])
    ids, attn, mask, _ = (t.to(policy.device) for t in policy.encode([c for c, _ in rows], [x for _, x in rows]))
    with policy.compute():
        logps = losses.per_token_logps(policy.model, ids, attn, mask.size(1))  # [N, T]
    span = torch.zeros_like(logps, dtype=torch.bool)
    for j, (a, b) in enumerate(spans):
        span[j, a:b] = True
    return logps.masked_fill(~span, 0.0).sum() / len(decisions)


# ------------------------------------------------------------------------------------------- geometry


def preconditioner(rt: Runtime, mel_grads: list[torch.Tensor]) -> tuple[torch.Tensor, str]:
    """1/(sqrt(v̂) + eps) per parameter: v̂ the optimizer's bias-corrected exp_avg_sq where the loaded checkpoint
    has one for every parameter, else the mean of the squared MEL gradients of the batches."""
    opt = rt.policy.optimizer
    group = opt.param_groups[0]
    eps, beta2 = group.get("eps", 1e-8), group["betas"][1]
    states = [opt.state.get(p, {}) for p in _params(rt)]
    if states and all("exp_avg_sq" in st for st in states):
        v = []
        for st in states:
            step = float(st.get("step", 1))
            v.append(st["exp_avg_sq"].detach().double().flatten() / (1 - beta2 ** max(step, 1.0)))
        return 1.0 / (torch.cat(v).sqrt() + eps), "checkpoint exp_avg_sq (bias-corrected)"
    v = torch.stack(mel_grads).pow(2).mean(0)
    return 1.0 / (v.sqrt() + eps), (f"none in the checkpoint: mean of the squared MEL gradient (RL + lambda NLL) "
                                    f"over {len(mel_grads)} batches")


def cosine(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> float | None:
    """a·Wb / (|a|_W |b|_W) (W diagonal, default identity); None when either vector is zero."""
    w = weight if weight is not None else torch.ones_like(a)
    na, nb = float((a * w * a).sum().sqrt()), float((b * w * b).sum().sqrt())
    return float((a * w * b).sum()) / (na * nb) if na > 0 and nb > 0 else None


def _summary(xs: list[float | None]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def nll_per_part(per_batch: list[tuple], weak: tuple[str, ...]) -> dict:
    """Nats per token of each part at the checkpoint, over all lessons and over weak-rule lessons only."""
    sums: dict[str, dict[str, list[float]]] = {"all": {}, "weak": {}}
    for logps, mask, labels, lessons in per_batch:
        nll = -logps.detach().double()
        for row, lesson in enumerate(lessons):
            for which in ("all", "weak") if lesson.rule in weak else ("all",):
                for name in PROBE_PARTS + ("critique",):
                    names = ("critique_wrong", "critique_rest") if name == "critique" else (name,)
                    sel = mask[row].bool() & torch.isin(labels[row], torch.tensor([PROBE_PARTS.index(n) for n in names],
                                                                                  device=labels.device))
                    acc = sums[which].setdefault(name, [0.0, 0.0])
                    acc[0] += float(nll[row][sel].sum())
                    acc[1] += float(sel.sum())
    return {which: {name: {"nats_per_token": s / c if c else None, "tokens": int(c)} for name, (s, c) in by.items()}
            for which, by in sums.items()}


# --------------------------------------------------------------------------------------- confirmation


def _steps(rt: Runtime, ckpt: Checkpoint, loss_fn, steps: int) -> None:
    """`steps` optimizer steps on loss_fn() from the checkpoint and its optimizer state (clipped as a step is)."""
    policy = rt.policy
    policy.load_checkpoint(ckpt.path)
    policy.model.train()
    clip = rt.cfg.optim.max_grad_norm
    for _ in range(steps):
        policy.optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), clip if clip > 0 else math.inf)
        policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)


def confirm(rt: Runtime, ckpt: Checkpoint, batches: list, decisions: list[tuple], s: ProbeSettings) -> dict:
    """Δ mean log p(right tag) after `s.steps` optimizer steps on each mask alone (and on the RL batch alone)."""
    before = gate.decision_scores(rt, decisions)["right_logp"]
    out = {}
    for mask in STEP_MASKS + ("RL batch",):
        per_seed = []
        for rl, lessons in batches:
            if mask == "RL batch":
                fn = lambda rl=rl: rl_loss(rt, rl)
            elif not lessons:
                continue
            else:
                fn = lambda lessons=lessons, mask=mask: part_nll(*_lesson_logps(rt, lessons), MASKS[mask])
            _steps(rt, ckpt, fn, s.steps)
            per_seed.append(gate.decision_scores(rt, decisions)["right_logp"])
        if not per_seed:
            continue
        mean_after = [sum(x) / len(per_seed) for x in zip(*per_seed)]
        seeds = [sum(a - b for a, b in zip(x, before)) / len(before) for x in per_seed]
        out[mask] = {"delta": gate._difference(mean_after, before, gate.GateSettings(resamples=s.resamples,
                                                                                      seed=s.seed)),
                     "delta_by_seed": seeds}
    rt.policy.load_checkpoint(ckpt.path)
    rt.forget_version()  # the runtime reloads the checkpoint before its next use
    return out


# ------------------------------------------------------------------------------------------------ probe


def run_probe(rt: Runtime, ckpt: Checkpoint, s: ProbeSettings = ProbeSettings()) -> dict:
    """The probe's measurements on checkpoint `ckpt` (module docstring); returns the report as data."""
    world = gate.world_of(rt)
    rt.ensure_version(ckpt)
    weak = tuple(world.weak_rules(rt.cfg.data.synthetic))
    problems = gate.heldout(rt, world, gate.GateSettings(max_problems=s.max_problems))
    decisions = gate.weak_decisions(rt, world, problems, weak)
    batches = probe_batches(rt, world, s)
    rt.policy.load_checkpoint(ckpt.path)  # the optimizer state the checkpoint holds (none for a warm start)
    lam = rt.cfg.loss.nll_coef

    g_dec = gradient(rt, lambda: decision_objective(rt, decisions))
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in (*MASKS, "RL batch", "MEL step (RL + lambda NLL)")}
    nll_forwards = []
    for rl, lessons in batches:
        d_rl = -gradient(rt, lambda rl=rl: rl_loss(rt, rl))
        rows["RL batch"].append(d_rl)
        if not lessons:
            rows["MEL step (RL + lambda NLL)"].append(d_rl)
            continue
        with torch.no_grad():
            nll_forwards.append((*_lesson_logps(rt, lessons), lessons))
        for name, parts in MASKS.items():
            rows[name].append(-gradient(rt, lambda lessons=lessons, parts=parts:
                                        part_nll(*_lesson_logps(rt, lessons), parts)))
        rows["MEL step (RL + lambda NLL)"].append(d_rl + lam * rows["all of M"][-1])
    precond, precond_source = preconditioner(rt, [-g for g in rows["MEL step (RL + lambda NLL)"]])
    geometry = {}
    for name, ds in rows.items():
        geometry[name] = {"norm": _summary([float(d.norm()) for d in ds]),
                          "cos_raw": _summary([cosine(d, g_dec) for d in ds]),
                          "cos_adam": _summary([cosine(d, g_dec, precond) for d in ds])}
    confirmation = confirm(rt, ckpt, batches, decisions, s)
    h_cos = [geometry["H"][k]["max"] for k in ("cos_raw", "cos_adam")]
    return {"world": world.name, "checkpoint": asdict(ckpt), "settings": asdict(s), "weak_rules": list(weak),
            "decisions": len(decisions), "g_dec_norm": float(g_dec.norm()),
            "lessons_per_batch": [len(lessons) for _, lessons in batches],
            "lesson_rules": _count([x.rule for _, lessons in batches for x in lessons]),
            "rollouts_per_batch": [len(rl.prompts) for rl, _ in batches],
            "lr": rt.cfg.optim.lr, "nll_coef": lam, "preconditioner": precond_source,
            "nll_per_part": nll_per_part(nll_forwards, weak), "geometry": geometry, "confirmation": confirmation,
            "H_projects_positively": any(c is not None and c > 0 for c in h_cos)}


def _count(xs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def _num(x: float | None, fmt: str = "+.3f") -> str:
    return "-" if x is None else format(x, fmt)


def _range(d: dict, fmt: str = "+.3f") -> str:
    if d["mean"] is None:
        return "-"
    return f"{format(d['mean'], fmt)} [{format(d['min'], fmt)}, {format(d['max'], fmt)}]"


def format_probe(r: dict) -> str:
    """The probe's report as markdown: NLL per part, the gradient table, the confirmation."""
    n = len(r["lessons_per_batch"])
    lines = [f"# Gradient probe: {r['world']} world, checkpoint {r['checkpoint']['path']}", "",
             *([f"`{r['command']}`", ""] if r.get("command") else []),
             (f"{r['decisions']} held-out weak-rule decisions; {n} batches of {r['rollouts_per_batch']} rollouts with "
              f"{r['lessons_per_batch']} oracle analyses of their incorrect rollouts (broken rules: "
              f"{r['lesson_rules']}); lr {r['lr']:g}, lambda {r['nll_coef']:g}. |g_dec| = {r['g_dec_norm']:.4g}."),
             "", "NLL per part of the oracle analyses at the checkpoint (nats per token; tokens):", "",
             "| lessons | s* | C | C: wrong line | C: rest | H | other |", "|---|---|---|---|---|---|---|"]
    for which, by in r["nll_per_part"].items():
        cells = [f"{_num(by[p]['nats_per_token'], '.4f')} ({by[p]['tokens']})" if p in by else "-"
                 for p in ("bifurcation", "critique", "critique_wrong", "critique_rest", "heuristics", "other")]
        lines.append(f"| {'weak-rule errors' if which == 'weak' else 'all'} | {' | '.join(cells)} |")
    lines += ["", (f"Update directions d = -∇L per batch: norm, and cosine with g_dec = ∇ mean log p(right tag), raw "
                   f"and in Adam's metric (preconditioner: {r['preconditioner']}). Mean [min, max] over batches."), "",
              "| direction | norm | cos(d, g_dec) raw | cos(d, g_dec) Adam |", "|---|---|---|---|"]
    for name, g in r["geometry"].items():
        lines.append(f"| {name} | {_range(g['norm'], '.4g')} | {_range(g['cos_raw'])} | {_range(g['cos_adam'])} |")
    steps = r["settings"]["steps"]
    lines += ["", (f"Confirmation: {steps} optimizer steps on each mask alone from the checkpoint, per batch; Δ mean "
                   "log p(right tag) at the held-out decisions (nats; mean over batches, 95% paired bootstrap CI over "
                   "decisions; per batch)."), "",
              "| steps on | Δ log p(right tag) | per batch |", "|---|---|---|"]
    for name, c in r["confirmation"].items():
        d = c["delta"]
        lines.append(f"| {name} | {_num(d['mean'], '+.4f')} [{_num(d['ci_low'], '+.4f')}, {_num(d['ci_high'], '+.4f')}]"
                     f" | {', '.join(_num(x, '+.4f') for x in c['delta_by_seed'])} |")
    h = r["confirmation"].get("H", {}).get("delta", {})
    if not r["H_projects_positively"] and (h.get("mean") is None or h["mean"] <= 0):
        lines += ["", ("**H never projects positively on g_dec** (no batch, raw or preconditioned) and its steps do not "
                       "raise log p(right tag): in this world no optimizer trick on the heuristic's NLL can help.")]
    return "\n".join(lines + [""])
