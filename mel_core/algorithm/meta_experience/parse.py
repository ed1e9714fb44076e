"""M = (s*, C, H) from a generation, the text M* that is trained on, and its rendering for the replay.

Pure functions over strings; docs/PARSER.md says which layouts, titles, rule forms and leaks they accept.
"""


from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from mel_core.algorithm.meta_experience.leaks import STRUCTURAL_NUMBERS, numbers_in, rule_problem
from mel_core.algorithm.meta_experience.rules import heuristic_items, is_rule, name_and_rule
from mel_core.algorithm.meta_experience.sections import Section, diagnosis_part, find_sections, joined_section, prepare
from mel_core.algorithm.meta_experience.step_index import find_bifurcation_step
from mel_core.vocabulary import REPLAY_CONTEXTS

# The parts of M a trained token can belong to (ParsedAnalysis.spans): s* ("bifurcation"), C ("critique"), H
# ("heuristics"), and "other" (text before the first header, the eos). The update logs nll_<part>.
PARTS = ("other", "bifurcation", "critique", "heuristics")
_PART_OF = {"bifurcation": "bifurcation", "failure": "bifurcation", "critique": "critique",
            "success_factors": "critique", "reflection": "critique", "heuristic": "heuristics"}


@dataclass
class ParsedAnalysis:
    layout: str | None = None            # "compact" or "paper"
    bifurcation_step: int | None = None  # the step index s* names, if any
    bifurcation: str | None = None       # s* as written: failure section (paper), bifurcation line (compact)
    critique: str | None = None          # C: the diagnosis text (paper: the three diagnosis sections joined)
    failure: str | None = None           # paper: Failure Resolution Path & Error Pattern Recognition
    success_factors: str | None = None   # paper: Analysis of Success Factors
    reflection: str | None = None        # paper: First-Person Reflective Summary
    heuristics: list[str] = field(default_factory=list)              # H: the kept rules
    heuristic_names: list[str | None] = field(default_factory=list)  # their "[Pattern Name]", if any
    target_text: str | None = None       # M*: the trained text (docs/PARSER.md); None when rejected
    reject_reason: str | None = None     # None = parsed completely
    # Which part of M each stretch of target_text is: (part, start, end) character spans in target_text, part
    # one of PARTS. The update logs the NLL of each part (nll_bifurcation, nll_critique, nll_heuristics).
    spans: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reject_reason is None


# ------------------------------------------------------------------------------------------ parsing


def _diagnose(text: str, layout: str, sections: Sequence[Section], res: ParsedAnalysis) -> None:
    """Fill s* and C into `res`, and the diagnosis reject reason if any."""
    res.bifurcation_step = find_bifurcation_step(text, layout, sections)
    if layout == "compact":
        res.bifurcation = joined_section(text, sections, "bifurcation")
        res.critique = joined_section(text, sections, "critique")
        if res.bifurcation_step is None:
            res.reject_reason = "missing_bifurcation"
        elif not res.critique:
            res.reject_reason = "missing_critique"
        return
    res.failure = res.bifurcation = joined_section(text, sections, "failure")
    res.success_factors = joined_section(text, sections, "success_factors")
    res.reflection = joined_section(text, sections, "reflection")
    parts = [p for p in (res.failure, res.success_factors, res.reflection) if p]
    res.critique = "\n\n".join(parts) if parts else None
    for part, reason in ((res.failure, "missing_failure_point"), (res.success_factors, "missing_success_factors"),
                         (res.reflection, "missing_reflection")):
        if not part:
            res.reject_reason = reason
            return


def _abstract(text: str, sections: Sequence[Section], res: ParsedAnalysis, gold_answer: str | None,
              question: str | None, max_heuristics: int) -> int | None:
    """Fill H into `res` (or its reject reason); returns where the last kept rule ends in `text`."""
    items = heuristic_items(text, sections)
    if not items:
        res.reject_reason = "missing_heuristic"
        return None
    rules = [(name, rule, it.end) for it in items for name, rule in [name_and_rule(it.text)] if is_rule(rule)]
    if not rules:
        res.reject_reason = "heuristic_not_if_then"
        return None
    kept = rules[:max_heuristics]
    problem_numbers = numbers_in(question or "") - STRUCTURAL_NUMBERS
    gold = (gold_answer or "").strip()
    for name, rule, _ in kept:
        reason = rule_problem(f"{name or ''} {rule}", gold, problem_numbers)
        if reason:
            res.reject_reason = reason
            return None
    res.heuristics = [rule for _, rule, _ in kept]
    res.heuristic_names = [name for name, _, _ in kept]
    return kept[-1][2]


def _spans(body: str, sections: Sequence[Section], target: str) -> list[tuple[str, int, int]]:
    """The parts of M covering `target` (= body.lstrip()[:len(target)]), in target coordinates."""
    shift = len(body) - len(body.lstrip())
    out, cursor = [], 0
    for s in sections:
        start, end = max(s.start - shift, 0), min(s.end - shift, len(target))
        if end <= start:
            continue
        if start > cursor:
            out.append(("other", cursor, start))
        part = _PART_OF.get(s.name, "other")
        if out and out[-1][0] == part and out[-1][2] == start:  # "Success Factors" then "Reflection": one C
            out[-1] = (part, out[-1][1], end)
        else:
            out.append((part, start, end))
        cursor = end
    if cursor < len(target):
        out.append(("other", cursor, len(target)))
    return out


def _parse(text: str, diagnosis: bool, heuristics: bool, **rules) -> ParsedAnalysis:
    """The parse every entry point shares: thinking and runaway text removed, sections found, then the
    diagnosis (s*, C) and/or the heuristics H read, each rejecting with the first reason that applies; the
    trained text ends after the last kept rule (or, for a diagnosis alone, at its heuristics header)."""
    body, finished = prepare(text)
    layout, sections = find_sections(body)
    res = ParsedAnalysis(layout=layout)
    if not finished:
        res.reject_reason = "unfinished_thinking"
        return res
    if diagnosis:
        _diagnose(body, layout, sections, res)
        if not res.ok:
            return res
        if not heuristics:
            res.target_text = diagnosis_part(text)
            res.spans = _spans(body, sections, res.target_text)
            return res
    end = _abstract(body, sections, res, rules.get("gold_answer"), rules.get("question"),
                    rules.get("max_heuristics", 3))
    if end is not None:
        res.target_text = body[:end].lstrip()
        res.spans = _spans(body, sections, res.target_text)
        if not diagnosis:  # an abstract generation is all heuristics, its preamble included
            res.spans = [(part if part != "other" else "heuristics", a, b) for part, a, b in res.spans]
    return res


def parse_diagnosis(text: str) -> ParsedAnalysis:
    """The diagnose half: s* and C; ``target_text`` = :func:`diagnosis_part` (the two_pass diagnosis target)."""
    return _parse(text, diagnosis=True, heuristics=False)


def parse_heuristics(text: str, *, gold_answer: str | None = None, question: str | None = None,
                     max_heuristics: int = 3) -> ParsedAnalysis:
    """The abstract half: H (``heuristics``, ``heuristic_names``), its ``target_text`` (the text up to the
    last kept rule: the two_pass abstract target), or the reason no rule can be kept."""
    return _parse(text, diagnosis=False, heuristics=True, gold_answer=gold_answer, question=question,
                  max_heuristics=max_heuristics)


def parse_analysis(text: str, *, gold_answer: str | None = None, question: str | None = None,
                   max_heuristics: int = 3) -> ParsedAnalysis:
    """M = (s*, C, H) from one generation and its trained text M* (``target_text``), or the first reason
    it cannot be used."""
    return _parse(text, diagnosis=True, heuristics=True, gold_answer=gold_answer, question=question,
                  max_heuristics=max_heuristics)


def combine(diagnosis: ParsedAnalysis, abstract: ParsedAnalysis) -> ParsedAnalysis:
    """two_pass: M from its two generations; ``target_text`` is both targets joined by a blank line (the
    text of M for a "full" replay context — each generation is still trained on its own target)."""
    reason = diagnosis.reject_reason or abstract.reject_reason
    target = None if reason else f"{diagnosis.target_text}\n\n{abstract.target_text}"
    return ParsedAnalysis(
        layout=diagnosis.layout, bifurcation_step=diagnosis.bifurcation_step, bifurcation=diagnosis.bifurcation,
        critique=diagnosis.critique, failure=diagnosis.failure, success_factors=diagnosis.success_factors,
        reflection=diagnosis.reflection, heuristics=list(abstract.heuristics),
        heuristic_names=list(abstract.heuristic_names), target_text=target, reject_reason=reason)


# ---------------------------------------------------------------------------------------- rendering


def render_heuristics(heuristics: Sequence[str]) -> str:
    """The kept rules as put in the replay (validation) prompt: joined by spaces."""
    return " ".join(h.strip() for h in heuristics)


def render_experience(m: ParsedAnalysis, context: str) -> str:
    """The meta-experience as put in the replay context: ``"full"`` is M* (s*, C and H as written, the
    paper's Eq. 6), ``"heuristics"`` the kept rules alone (:func:`render_heuristics`)."""
    if context == "heuristics":
        return render_heuristics(m.heuristics)
    if context == "full":
        if m.target_text is None:
            raise ValueError(f"no meta-experience text to render (rejected: {m.reject_reason})")
        return m.target_text
    raise ValueError(f"unknown replay context {context!r}; one of {', '.join(REPLAY_CONTEXTS)}")
