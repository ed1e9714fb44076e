"""Meta-experience: contrastive pairing, parsing M = (s*, C, H), and the acceptance rule.

Pure functions over plain data; the stages in ``mel_core.stages`` feed them records from the store.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
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
#
# Two layouts are recognised, detected from the section headers present:
#
# - compact (the tiny model, configs/prompts/tiny): "Bifurcation: step N" / "Critique: ..." /
#   "Heuristic: If ..., then ...". Mandatory: bifurcation (a step number), critique, >= 1 heuristic.
# - paper (configs/prompts/paper): the four sections of the paper's analysis prompt — Failure Point &
#   Latent Cognitive Pattern (which names the bifurcation step), Success Factors, First-Person Reflective
#   Summary, Subject Heuristics. Chosen as soon as any of the first three headers appears; then all four
#   are mandatory and the bifurcation step must be stated (in the failure section, or anywhere as an
#   explicit "Bifurcation step: N" / "diverges at step N"). The critique C is the three diagnosis
#   sections joined; each is also kept on its own.
#
# Headers may be written as markdown headings (# .. ######), bold (**Subject Heuristics:**), numbered
# (1. / 4) / (2) / IV.), with or without a trailing colon, and with prose before and after. A
# ``<think>...</think>`` preamble is ignored; an unclosed one is rejected (unfinished_thinking).
#
# Reject reasons (the first that applies):
#   unfinished_thinking                        generation ended inside <think>
#   compact: missing_bifurcation, missing_critique
#   paper:   missing_failure_point, missing_bifurcation, missing_success_factors, missing_reflection
#   both:    missing_heuristic, heuristic_not_if_then, heuristic_leaks_answer, heuristic_has_problem_numbers


@dataclass
class ParsedAnalysis:
    bifurcation_step: int | None = None
    critique: str | None = None          # C: the combined diagnosis text (both layouts)
    heuristics: list[str] = field(default_factory=list)
    reject_reason: str | None = None     # None = parsed completely
    layout: str | None = None            # "compact" or "paper"
    failure: str | None = None           # paper: Failure Point & Latent Cognitive Pattern
    success_factors: str | None = None   # paper: Success Factors
    reflection: str | None = None        # paper: First-Person Reflective Summary

    @property
    def ok(self) -> bool:
        return self.reject_reason is None


_NAMES = {
    "bifurcation": r"bifurcation(?:[ \t]+(?:point|step))?",
    "critique": r"critique",
    "failure": r"failure[ \t]+(?:points?|analysis)",
    "success_factors": r"success[ \t]+factors?",
    "reflection": r"(?:first[ \t-]*person[ \t]+)?(?:reflective[ \t]+summary|reflections?)",
    "heuristic": r"(?:subject(?:[ \t-]+specific)?[ \t]+)?heuristics?",
}
_COMPACT = ("bifurcation", "critique", "heuristic")
_PAPER = ("failure", "success_factors", "reflection", "heuristic")
_PAPER_ONLY = ("failure", "success_factors", "reflection")

# One header line: optional quote / heading / bullet / bold / numbering markup, the section name, a short
# remainder ("& Latent Cognitive Pattern", " (s*)"), closing bold, then a colon (inline content may
# follow) or the end of the line. A line without a colon counts only if it carries markup or is the bare
# name, so prose such as "Success factors were solid" is not taken for a header.
_HEADER = (
    r"^[ \t]*(?:>[ \t]*)*(?P<hash>\#{{1,6}}[ \t]*)?(?:[-*•+][ \t]+)?(?P<bold1>(?:\*\*|__)[ \t]*)?"
    r"(?P<num>(?:(?:section|part)[ \t]*\d+[ \t]*[:.)\-–—]?[ \t]*)?"
    r"(?:\(?(?:\d{{1,2}}|[ivx]{{1,4}}|[a-d])[.):][ \t]*)?)"
    r"(?P<bold2>(?:\*\*|__)[ \t]*)?"
    r"(?P<name>{names})\b"
    r"(?P<rest>[^:：\n.!?*\#]{{0,60}}?)[ \t]*(?P<bold3>\*\*|__)?[ \t]*"
    r"(?:(?P<colon>[:：])[ \t]*(?:\*\*|__)?|\#*[ \t]*$)")
_HEADERS = {name: re.compile(_HEADER.format(names=pat), re.IGNORECASE | re.MULTILINE)
            for name, pat in _NAMES.items()}


@dataclass
class _Section:
    name: str
    span: str   # header line and body (where a stated step number is looked for)
    body: str   # text after the header, up to the next recognised header


def _strip_thinking(text: str) -> tuple[str, bool]:
    """The analysis is what follows the last ``</think>``; an unclosed ``<think>`` means the
    generation ended while still thinking. Returns (text, finished)."""
    low = text.lower()
    end = low.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):], True
    start = low.find("<think>")
    if start >= 0:
        return text[:start], False
    return text, True


def _clean_body(body: str) -> str:
    """Section text without surrounding blank lines, stray bold marks or horizontal rules."""
    lines = [ln for ln in body.splitlines() if not re.fullmatch(r"[ \t]*(?:[-*_=]{3,}|\*\*|__)[ \t]*", ln)]
    return "\n".join(lines).strip()


def _find_sections(text: str, names: Sequence[str]) -> list[_Section]:
    marks = []
    for name in names:
        for m in _HEADERS[name].finditer(text):
            markup = any((m.group(g) or "").strip() for g in ("hash", "bold1", "num", "bold2", "bold3"))
            if not m.group("colon") and not markup and m.group("rest").strip():
                continue
            marks.append((m.start(), m.end(), name))
    marks.sort()
    kept: list[tuple[int, int, str]] = []
    for mark in marks:  # a line opens at most one section
        if not kept or mark[0] >= kept[-1][1]:
            kept.append(mark)
    out = []
    for i, (start, end, name) in enumerate(kept):
        stop = kept[i + 1][0] if i + 1 < len(kept) else len(text)
        out.append(_Section(name, text[start:stop], _clean_body(text[end:stop])))
    return out


def _sections(text: str) -> tuple[str, dict[str, list[_Section]]]:
    """(layout, section name -> sections found). The layout decides which headers split the text: in
    the paper layout a "Bifurcation step: 3" line stays inside the failure section."""
    layout = "paper" if _find_sections(text, _PAPER_ONLY) else "compact"
    out: dict[str, list[_Section]] = {}
    for s in _find_sections(text, _PAPER if layout == "paper" else _COMPACT):
        out.setdefault(s.name, []).append(s)
    return layout, out


def diagnosis_part(text: str) -> str:
    """The diagnosis (s*, C) of a generation: its text up to the first heuristics header, thinking removed.

    two_pass conditions the abstract call on this, and trains on it, so heuristics the model wrote
    unasked in the first call are neither shown to the second nor learned from the first.
    """
    text, _ = _strip_thinking(text or "")
    layout, secs = _sections(text)
    heuristics = secs.get("heuristic")
    if heuristics:
        text = text[:text.index(heuristics[0].span)]
    return text.strip()


def _joined(sections: list[_Section]) -> str | None:
    bodies = [s.body for s in sections if s.body]
    return "\n\n".join(bodies) if bodies else None


_WORD_NUMBERS = {w: i for i, w in enumerate(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split(), start=1)}
_ORDINALS = {w: i for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split(), start=1)}
_NUMWORD = "|".join(sorted(_WORD_NUMBERS, key=len, reverse=True))
_ORDWORD = "|".join(sorted(_ORDINALS, key=len, reverse=True))
# "Step 3", "step #3", "Step: **3**", "step three", "the 3rd step", "the third (algebra) step"
_STEP = (rf"(?:\bstep\b[ \t*_]*(?:\#|no\.?|number)?[ \t*_]*[:=\-–]?[ \t*_]*(?P<d1>\d+)\b"
         rf"|\bstep[ \t]+(?P<w1>{_NUMWORD})\b"
         rf"|\b(?P<d2>\d+)(?:st|nd|rd|th)[ \t]+(?:[\w()-]+[ \t]+)?step\b"
         rf"|\b(?P<w2>{_ORDWORD})[ \t]+(?:[\w()-]+[ \t]+)?step\b)")
_STEP_RE = re.compile(_STEP, re.IGNORECASE)
# An explicit statement: "Bifurcation step: 3", "Bifurcation: 3", "the reasoning first diverges at Step 4".
_EXPLICIT_RE = re.compile(
    rf"(?:bifurcation|diverg\w*)[^\n]{{0,80}}?{_STEP}"
    rf"|bifurcation(?:[ \t]+(?:point|step))?[ \t*_]*[:=\-–][ \t*_]*(?P<d3>\d+)\b",
    re.IGNORECASE)


def _step_value(m: re.Match) -> int:
    g = m.groupdict()
    for key in ("d1", "d2", "d3"):
        if g.get(key):
            return int(g[key])
    if g.get("w1"):
        return _WORD_NUMBERS[g["w1"].lower()]
    return _ORDINALS[g["w2"].lower()]


def _bifurcation_step(text: str, layout: str, secs: dict[str, list[_Section]]) -> int | None:
    """s*: an explicit bifurcation/divergence statement in its home section (failure section in the
    paper layout, the bifurcation line in the compact one), else anywhere; then the first step named in
    the home section (a numeral before a word: "step 3" over "the first step"); in the compact layout
    lastly the first integer of the bifurcation line."""
    home = secs.get("failure" if layout == "paper" else "bifurcation", [])
    for span in [s.span for s in home] + [text]:
        m = _EXPLICIT_RE.search(span)
        if m:
            return _step_value(m)
    mentions = [m for s in home for m in _STEP_RE.finditer(s.span)]
    digits = [m for m in mentions if m.group("d1") or m.group("d2")]
    if digits or mentions:  # "step 3" beats "the first step" mentioned earlier in passing
        return _step_value((digits or mentions)[0])
    if layout == "compact":
        for s in home:
            m = re.search(r"-?\d+", s.body)
            if m:
                return int(m.group())
    return None


def parse_diagnosis(text: str) -> ParsedAnalysis:
    """The diagnose half: bifurcation step s* and critique C, or the reason they cannot be read.

    Compact layout: rejects missing_bifurcation / missing_critique. Paper layout: missing_failure_point /
    missing_bifurcation / missing_success_factors / missing_reflection (see the notes above).
    """
    text, finished = _strip_thinking(text or "")
    layout, secs = _sections(text)
    res = ParsedAnalysis(layout=layout)
    if not finished:
        res.reject_reason = "unfinished_thinking"
        return res
    res.bifurcation_step = _bifurcation_step(text, layout, secs)
    if layout == "compact":
        res.critique = _joined(secs.get("critique", []))
        if res.bifurcation_step is None:
            res.reject_reason = "missing_bifurcation"
        elif not res.critique:
            res.reject_reason = "missing_critique"
        return res
    res.failure = _joined(secs.get("failure", []))
    res.success_factors = _joined(secs.get("success_factors", []))
    res.reflection = _joined(secs.get("reflection", []))
    parts = [p for p in (res.failure, res.success_factors, res.reflection) if p]
    res.critique = "\n\n".join(parts) if parts else None
    if not res.failure:
        res.reject_reason = "missing_failure_point"
    elif res.bifurcation_step is None:
        res.reject_reason = "missing_bifurcation"
    elif not res.success_factors:
        res.reject_reason = "missing_success_factors"
    elif not res.reflection:
        res.reject_reason = "missing_reflection"
    return res


# ------------------------------------------------------------------------------------- heuristics

_BULLET = re.compile(r"^[ \t]*(?:[-*•+▪◦‣][ \t]+|\(?\d{1,2}[.)][ \t]+|\(?[a-h][.)][ \t]+)")
_IF_THEN = re.compile(r"\bif\b.+?\bthen\b\W*\w", re.IGNORECASE | re.DOTALL)
_PLACEHOLDER = re.compile(r"\[(?:condition|action)\]", re.IGNORECASE)


def _clean_rule(item: str) -> str:
    """One heuristic as plain text: markup gone, whitespace collapsed, a leading label ("Rule 1:",
    "**Sign check:**") dropped when the rule itself follows it."""
    s = re.sub(r"\*\*|__|`", "", item)
    s = re.sub(r"(?<![\w*])\*(?=\w)|(?<=\w)\*(?![\w*])", "", s)  # *italic*, not a*b
    s = re.sub(r"\s+", " ", s).strip()
    m = re.match(r"^([^:]{1,60}?)\s*[:\-–—]\s+(?=if\b)", s, re.IGNORECASE)
    if m and not re.search(r"\bif\b", m.group(1), re.IGNORECASE):
        s = s[m.end():]
    return s.strip()


def _heuristic_items(bodies: list[str]) -> list[str]:
    """Items of the heuristics sections: a bulleted/numbered line, or a line starting with "If", opens
    an item; a following line continues it when indented or when the item's last line did not end a
    sentence (a rule wrapped over lines), else it opens an item too; a blank line ends an item.
    Other text (an intro, a closing remark) becomes items of its own, later dropped as not If/Then."""
    items: list[list[str]] = []
    for body in bodies:
        current: list[str] | None = None
        for line in body.splitlines():
            if not line.strip() or re.fullmatch(r"[ \t]*(?:[-*_=]{3,}|\#+.*)", line):
                current = None
                continue
            bullet = _BULLET.match(line)
            content = line[bullet.end():] if bullet else line.strip()
            starts_rule = re.match(r"^(?:\*\*|__|\*)?\s*if\b", content.strip(), re.IGNORECASE)
            ended = current is not None and re.search(r"[.!?](?:\*\*|__|\*)?\s*$", current[-1])
            wrapped = line[:1] in (" ", "\t") or not ended
            if bullet or starts_rule or current is None or not wrapped:
                current = [content]
                items.append(current)
            else:
                current.append(content)
    return [r for r in (_clean_rule(" ".join(it)) for it in items) if r]


# Numbers, for the abstraction rules. A heuristic may not copy the problem's numbers, but general rules
# often need small structural numbers ("divide by 2", "the last 1 or 2 digits", "powers of 10", "100%"):
# integers 0..10 and 100 are exempt, every other number of the question (multi-digit integers, decimals,
# numerators/denominators of 11+) counts as problem-specific. Numbers compare by magnitude (sign and
# thousands separators ignored, "28.0" == "28").
_STRUCTURAL_NUMBERS = frozenset({str(i) for i in range(11)} | {"100"})
_NUM = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")


def _plain(text: str, squeeze: bool = True) -> str:
    r"""LaTeX and unicode math to a plain, spaceless, lower-case form: \frac{3}{4} -> 3/4, \sqrt{2} -> sqrt(2)."""
    s = text.lower().replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("{,}", "").replace("−", "-").replace("√", "sqrt").replace("π", "\\pi")
    s = re.sub(r"\\(?:left|right|displaystyle)\b", "", s)
    s = re.sub(r"\\(?:text|mathrm|mathbf|textbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\boxed\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"\\[dt]?frac\s*(\d)(\d)", r"\1/\2", s)
    s = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", s)
    s = re.sub(r"sqrt\s*(\d+|[a-z])(?![\w(])", r"sqrt(\1)", s)
    s = re.sub(r"\^\{([^{}]*)\}", r"^\1", s)
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi")
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # 1,000 -> 1000
    return re.sub(r"\s+", "", s) if squeeze else s


def _canon(num: str) -> str:
    """28.0 -> 28, 007 -> 7, 0.50 -> 0.5."""
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    if "." in num:
        whole, frac = num.split(".", 1)
        return f"{whole.lstrip('0') or '0'}.{frac}"
    return num.lstrip("0") or "0"


def _numbers(text: str) -> set[str]:
    return {_canon(n) for n in _NUM.findall(_plain(text, squeeze=False))}


def _contains(haystack: str, needle: str) -> bool:
    """needle (spaceless) in haystack, spaces allowed between its characters ("3 / 4" holds 3/4), not as
    part of a longer number or word (3/4 is not in 13/45, "may" is not in "mayday")."""
    for m in re.finditer(r"\s*".join(map(re.escape, needle)), haystack):
        before = haystack[m.start() - 1] if m.start() else ""
        after = haystack[m.end()] if m.end() < len(haystack) else ""
        if needle[0].isdigit() and (before.isdigit() or before == "."):
            continue
        if needle[0].isalpha() and before.isalpha():
            continue
        if needle[-1].isdigit() and after.isdigit():
            continue
        if needle[-1].isalpha() and after.isalpha():
            continue
        return True
    return False


def _leaks_answer(rule: str, gold: str) -> bool:
    r"""The gold answer stated in a rule: as a number (magnitude), or for non-numeric answers as the
    answer's text in LaTeX or plain form (\frac{3}{4} or 3/4, 0.75 too). A structural gold answer (0..10,
    100) would match ordinary rules ("divide by 2"), so it counts only in an answer context ("answer 2",
    "result is 2", \boxed{2})."""
    g = _plain(gold)
    if not g:
        return False
    if re.fullmatch(r"-?\d+(?:\.\d+)?", g):
        key = _canon(g.lstrip("-"))
        if key not in _numbers(rule):
            return False
        if key not in _STRUCTURAL_NUMBERS:
            return True
        k = re.escape(key)
        ctx = rf"(?:answer|result|solution)s?\b\D{{0,25}}?(?<![\d.])-?{k}(?![\d])|\\boxed\{{\s*-?{k}\s*\}}"
        return re.search(ctx, rule, re.IGNORECASE) is not None
    plain_rule = _plain(rule, squeeze=False)
    forms = {g.lstrip("+"), g.lstrip("+-")}  # a rule giving -3/4 as 3/4 leaks it too
    frac = re.fullmatch(r"[+-]?(\d+)/(\d+)", g)
    if frac and int(frac.group(2)):
        value = Fraction(int(frac.group(1)), int(frac.group(2)))
        d = value.denominator
        while d % 2 == 0:
            d //= 2
        while d % 5 == 0:
            d //= 5
        if d == 1 and value.denominator != 1:
            forms.add(_canon(f"{float(value):.10f}"))
    for form in forms:
        if len(form) < 2 or (form.isalpha() and len(form) < 3):
            continue  # "B", "x", "no": too short to tell a leak from ordinary words
        if _contains(plain_rule, form) or (form.replace(".", "", 1).isdigit() and form in _numbers(rule)):
            return True
    return False


def parse_heuristics(text: str, *, gold_answer: str | None = None, question: str | None = None,
                     max_heuristics: int = 3) -> tuple[list[str], str | None]:
    """The abstract half: If/Then heuristics H, or the reason none can be kept.

    Only If/Then rules are kept (other bullet text of the section is dropped), at most `max_heuristics`.
    Reject reasons: unfinished_thinking, missing_heuristic, heuristic_not_if_then,
    heuristic_leaks_answer (a rule states the gold answer), heuristic_has_problem_numbers (a rule copies a
    non-structural number of this problem — see _STRUCTURAL_NUMBERS). The whole analysis is rejected
    when any rule breaks a rule, since its text is the NLL target.
    """
    text, finished = _strip_thinking(text or "")
    if not finished:
        return [], "unfinished_thinking"
    _, secs = _sections(text)
    items = _heuristic_items([s.body for s in secs.get("heuristic", [])])
    if not items:
        return [], "missing_heuristic"
    rules = [h for h in items if _IF_THEN.search(h) and not _PLACEHOLDER.search(h)]
    if not rules:
        return [], "heuristic_not_if_then"
    problem_numbers = _numbers(question or "") - _STRUCTURAL_NUMBERS
    gold = (gold_answer or "").strip()
    for h in rules:
        if gold and _leaks_answer(h, gold):
            return [], "heuristic_leaks_answer"
        if _numbers(h) & problem_numbers:
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
