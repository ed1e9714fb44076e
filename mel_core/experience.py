"""Meta-experience: contrastive pairing, parsing M = (s*, C, H), and the acceptance rule.

Pure functions over plain data; the stages in ``mel_core.stages`` feed them records from the store.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

# ----------------------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    correct_rollout_id: str
    incorrect_rollout_id: str


def is_mixed(rewards: Sequence[float]) -> bool:
    """A group teaches by contrast only if it holds at least one success and one failure."""
    return any(r > 0 for r in rewards) and any(r <= 0 for r in rewards)


def make_pairs(groups: dict[str, list[tuple[str, float]]], pairs_per_group: int, seed: int,
               strategy: str = "random") -> list[Pair]:
    """Contrastive (y+, y-) pairs from mixed groups.

    groups: prompt_id -> [(rollout_id, reward)] in sample order. `random` draws `pairs_per_group`
    distinct (correct, incorrect) combinations per group with a seeded RNG (the paper does not say
    how pairs are chosen); `all` takes every combination; `disjoint` matches successes and failures
    one-to-one so no rollout is used twice.
    """
    pairs: list[Pair] = []
    for prompt_id in sorted(groups):
        members = groups[prompt_id]
        correct = [rid for rid, r in members if r > 0]
        wrong = [rid for rid, r in members if r <= 0]
        if not correct or not wrong:
            continue
        rng = random.Random(f"{seed}:{prompt_id}")
        if strategy == "all":
            chosen = [(c, w) for c in correct for w in wrong]
        elif strategy == "disjoint":
            c, w = correct[:], wrong[:]
            rng.shuffle(c)
            rng.shuffle(w)
            chosen = list(zip(c, w))[:pairs_per_group] if pairs_per_group > 0 else list(zip(c, w))
        elif strategy == "random":
            combos = [(c, w) for c in correct for w in wrong]
            chosen = rng.sample(combos, min(pairs_per_group, len(combos)))
        else:
            raise ValueError(f"unknown pairing strategy {strategy!r}; one of random, all, disjoint")
        pairs += [Pair(prompt_id, c, w) for c, w in chosen]
    return pairs


# ----------------------------------------------------------------------------------------- parsing


@dataclass
class ParsedAnalysis:
    bifurcation_step: int | None = None
    critique: str | None = None
    heuristics: list[str] = field(default_factory=list)
    reject_reason: str | None = None  # None = parsed completely

    @property
    def ok(self) -> bool:
        return self.reject_reason is None


# Section headers as models write them: "Bifurcation:", "**Bifurcation point**:", "## 1. Critique" ...
_HEADER = r"^[ \t>*#\-\d.)]*\**\s*(?:{names})\b[^:\n]*?\**\s*:?\**[ \t]*"
_SECTIONS = {
    "bifurcation": r"bifurcation(?:\s+point)?|failure\s+point",
    "critique": r"critique",
    "heuristic": r"(?:subject\s+)?heuristics?",
}
_IF_THEN = re.compile(r"\bif\b.+?,?\s*\bthen\b.+", re.IGNORECASE | re.DOTALL)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)(?!\.\d)")


def _split_sections(text: str) -> dict[str, list[str]]:
    """Map section name -> the bodies found (a body runs until the next recognised header)."""
    marks = []
    for name, pat in _SECTIONS.items():
        for m in re.finditer(_HEADER.format(names=pat), text, re.IGNORECASE | re.MULTILINE):
            marks.append((m.start(), m.end(), name))
    marks.sort()
    out: dict[str, list[str]] = {}
    for i, (start, end, name) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        out.setdefault(name, []).append(text[end:stop].strip())
    return out


def _heuristic_lines(bodies: list[str]) -> list[str]:
    """One heuristic per non-empty line (bullets and numbering stripped)."""
    rules = []
    for body in bodies:
        for line in body.splitlines():
            line = re.sub(r"^[\s*\-•\d.)]+", "", line).strip().strip("*").strip()
            if line:
                rules.append(line)
    return rules


def parse_diagnosis(text: str) -> ParsedAnalysis:
    """The diagnose half: bifurcation step s* and critique C (reject: missing_bifurcation/_critique)."""
    sections = _split_sections(text)
    res = ParsedAnalysis()
    bif = sections.get("bifurcation", [])
    if bif:
        m = re.search(r"-?\d+", bif[0])
        res.bifurcation_step = int(m.group()) if m else None
    crit = [c for c in sections.get("critique", []) if c]
    res.critique = "\n".join(crit) if crit else None
    if res.bifurcation_step is None:
        res.reject_reason = "missing_bifurcation"
    elif not res.critique:
        res.reject_reason = "missing_critique"
    return res


def parse_heuristics(text: str, *, gold_answer: str | None = None, question: str | None = None,
                     max_heuristics: int = 3) -> tuple[list[str], str | None]:
    """The abstract half: If/Then heuristics H, or the reason none can be kept.

    Reject reasons: missing_heuristic, heuristic_not_if_then, heuristic_leaks_answer (states the
    gold answer), heuristic_has_problem_numbers (copies numbers of this problem: heuristics must be
    abstract, as the paper's prompt demands).
    """
    heuristics = _heuristic_lines(_split_sections(text).get("heuristic", []))
    if not heuristics:
        return [], "missing_heuristic"
    rules = [h for h in heuristics if _IF_THEN.search(h)]
    if not rules:
        return [], "heuristic_not_if_then"
    problem_numbers = set(_NUMBER.findall(question or ""))
    gold = (gold_answer or "").strip()
    for h in rules:
        nums = set(_NUMBER.findall(h))
        if gold and (gold in nums or (not _NUMBER.fullmatch(gold) and gold in h)):
            return [], "heuristic_leaks_answer"
        if nums & problem_numbers:
            return [], "heuristic_has_problem_numbers"
    return rules[:max_heuristics], None


def parse_analysis(text: str, *, gold_answer: str | None = None, question: str | None = None,
                   max_heuristics: int = 3) -> ParsedAnalysis:
    """M = (s*, C, H) from one generation, or the first reason it cannot be used."""
    res = parse_diagnosis(text)
    if not res.ok:
        return res
    res.heuristics, res.reject_reason = parse_heuristics(
        text, gold_answer=gold_answer, question=question, max_heuristics=max_heuristics)
    return res


def render_experience(heuristics: Sequence[str]) -> str:
    """The meta-experience as it is put in context for the replay (the validation prompt)."""
    return " ".join(h.strip() for h in heuristics)


# -------------------------------------------------------------------------------------- acceptance


def accept(replay_rewards: Sequence[float], min_correct: int) -> bool:
    """Paper rule: kept only if the replay with M in context solves the problem (default 1 of 1)."""
    return sum(1 for r in replay_rewards if r > 0) >= min_correct


def retention_ratio(accepted: int, candidates: int) -> float:
    """Accepted / candidate meta-experiences (paper: ~0.2-0.4 at 4B, up to ~0.75 at 14B)."""
    return accepted / candidates if candidates else 0.0
