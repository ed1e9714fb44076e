"""M = (s*, C, H): parsing model output into it, the text M* that is trained on, and its rendering for the replay.

Pure functions over strings; ``mel_core.stages`` calls them on the policy's generations. Pairing and the
acceptance rule live in ``mel_core.experience``.

Layouts
-------
The layout is detected from the section headers present (headers are matched at the start of a line):

- **compact** (the embedded tiny model, ``configs/prompts/tiny``; ``mel_core.worlds``' ``analysis_target``):
  ``Bifurcation: step N`` / ``Critique: ...`` / ``Heuristic: If ..., then ...``. Mandatory: the
  bifurcation line with a step number, a critique, at least one rule.
- **paper** (``configs/prompts/paper``, the paper's Appendix C): four sections, chosen as soon as a
  header of one of the first three appears; all four are then mandatory:

  ========================  ===================================================================
  section (field)           titles accepted (case-insensitive; a short remainder such as
                            "& Latent Cognitive Pattern" or "(s*)" may follow the title)
  ========================  ===================================================================
  failure point (s*)        Failure Point(s) / Failure Analysis / Failure Mode(s) / Latent
                            Cognitive Pattern / Error Analysis / Error Diagnosis / Error Point /
                            Root Cause (Analysis) / Point of Divergence / Divergence Point /
                            What|Where ... Went Wrong; and "Bifurcation (Point|Step)" when no other
                            failure title is present (otherwise such a line stays in the text)
  success factors           (Key|Critical) Success Factors / Success Analysis / What ... Went
                            Right / What ... Did Right / Why ... Succeeded|Worked
  reflection                First-Person Reflective Summary / Reflective Summary / (Self-|
                            Personal |First-Person )Reflection(s)
  heuristics (H)            (Subject|Subject-Specific|General|Abstract) Heuristics (Rules) /
                            General Rules / Transferable Rules / Lessons Learned / Key Lessons /
                            Meta-Experience(s)
  ========================  ===================================================================

  In the paper layout a heuristics title that comes before the first diagnosis section is a document
  title ("# Meta-Experience Analysis"), not the heuristics section.

A header may carry markdown heading marks (``#`` .. ``######``), a quote or bullet mark, bold
(``**Title**``, ``**Title:**``, ``**Title**:``, ``**Title** text``), numbering (``1.`` ``2)`` ``(3)``
``IV.`` ``Section 1:`` ``Part II -``), with or without a colon; content may follow on the header line.
A line without colon or markup is a header only when it is the bare title, so prose that begins with a
title's words ("Success factors were few.") is not one. A header repeating the title of the section it
is in ("**Failure point:** ..." under "## Failure Point & Latent Cognitive Pattern", a second
"Heuristic:" line) stays in that section. Text before the first header and the non-rule text of the
heuristics section are allowed.

Thinking and runaway text
-------------------------
A ``<think>...</think>`` preamble is dropped: the analysis is what follows the last ``</think>``; an
unclosed ``<think>`` means the generation ended while thinking (``unfinished_thinking``). After the first
section header, the analysis ends at the first line that starts a new prompt or turn — ``Problem:``,
``Question:``, ``Q:``, ``### Problem``, ``Human:`` / ``User:`` / ``Assistant:`` / ``System:`` — or at a
chat special token (``<|im_end|>``, ``<|endoftext|>``, ...): a base model that goes on to invent the next
problem does not get it parsed or trained on.

s*: the bifurcation point
-------------------------
In the paper layout s* is the failure section's prose (``bifurcation``); ``bifurcation_step`` is the
step index it states, or ``None`` — a missing index is not a reject reason there. The index is read, in
this order, from an explicit statement ("Bifurcation step: 3", "Bifurcation: 3", "first diverges at
step 4", "went wrong in step 2") in the failure section, then anywhere; then the first step named in
the failure section, a numeral before a word ("Step 3", "step #3", "line 4", "the 3rd step" before
"step three", "the third step", "the fourth line"). "Steps 1-3" (plural) names no step. The compact
layout keeps requiring its ``Bifurcation: step N`` line (its first integer is the fallback).

H: rule forms
-------------
The heuristics section is split into items: a bullet (``-`` ``*`` ``•`` ``+``), a number or letter
(``1.`` ``2)`` ``(3)`` ``a.`` ``iv.``) or a line that opens a rule (capitalised If/When/Whenever/Before,
possibly after a name) starts an item; a wrapped line continues it; a blank line, a heading or a
horizontal rule ends it. An item is a rule when, after an optional name prefix, it is one of:

- ``If <condition>, then <action>`` / ``If <condition> then <action>`` (any action);
- ``If|When|Whenever|Before <condition>, <directive>`` where the directive is "I/we/you <modal or
  present-tense verb> ..." ("I must verify", "I should", "I check"; not a past tense: "I used"),
  "always" / "never" / "first" / "do not" / "make sure", "it is essential|crucial|important|necessary
  to ...", an imperative from a fixed list of verbs (check, verify, compute, list, treat, be, ...), or
  any clause with must / should / need(s) to / has|have to / ought to (not "should have").
  Without "then", an "If" clause needs a directive so that an intro such as "If we compare the two
  attempts, several lessons emerge." is not taken for a rule.

The name prefix is ``[Pattern Name]:``, ``**Pattern Name**:`` / ``**Pattern Name.**`` / ``**Pattern
Name**`` or ``Pattern Name:`` / ``Pattern Name -`` (60 characters at most); it is removed from the rule
and recorded in ``heuristic_names`` (``None`` for none or a generic label such as "Rule 1",
"Heuristic 2"). Not rules (dropped): items ending in a colon (an intro line), placeholders
("If [condition], then [action]"), "When ..., <narration>" ("When I saw it, I used ..."), rules that do
not open with their condition ("Always check ... when ...") and other prose. At most ``max_heuristics``
rules are kept, in order; the rest are neither kept nor checked nor trained on.

Leak rule (each kept rule, with its name)
-----------------------------------------
- ``heuristic_leaks_answer`` — the rule states the gold answer:

  * a numeric gold answer (integer, decimal or fraction a/b; sign ignored; 3/4 = 0.75 = \\frac{3}{4};
    1,000 = 1000) counts only in an answer context: right after answer / result / solution (optionally
    followed by is, =, :, of, equals, should/must/will be), inside ``\\boxed{}``, or — unless it is a
    structural number (an integer 0..10, or 100) — right after =, ≈, is, are, equals, equal to, gives,
    yields, becomes, "to be", without the expression going on ("x = 12." and "the probability is 1/6"
    state 12 and 1/6; "12x + 1", "a year has 12 months", "check that 780 divides it" do not);
  * a non-numeric gold answer (an expression, a word; LaTeX or plain form) counts anywhere in the rule,
    as a whole token ("Monday" is not in "Mondays"); one letter or a two-letter word is too short to
    tell from ordinary text and never counts.
- ``heuristic_has_problem_numbers`` — the rule contains a number of the question other than a
  structural one (0..10 and 100 are exempt: "divide by 2", "powers of 10"); magnitudes compare
  (28.0 = 28).

The diagnosis sections are not checked: a critique has to talk about this problem.

M*: the trained text (``target_text``)
--------------------------------------
``parse_analysis``: the generation, thinking removed and leading whitespace dropped, up to the end of
the last *kept* rule — nothing after the heuristics section, no rule past ``max_heuristics``. It is
always ``text_after_thinking.lstrip()[:len(target_text)]``, so the caller can re-encode it as the NLL
target. For two_pass, ``parse_diagnosis`` gives the diagnosis generation up to its heuristics header (or
the end of the analysis, see above) and ``parse_heuristics`` the abstract generation up to its last kept
rule. ``target_text`` is ``None`` when the parse is rejected.

Replay context (``render_experience``)
--------------------------------------
``context="full"``: M itself, s*, C and H as the model wrote them (``target_text``) — what the paper's
Eq. 6 conditions on. Its critique usually names the problem's numbers and often the correct answer, so
a replay with it tests the experience less strictly. ``context="heuristics"``: the kept rules joined by
spaces (``render_heuristics``) — what the replay stage uses.

Reject reasons (``reject_reason``; the first that applies)
----------------------------------------------------------
``unfinished_thinking``; compact: ``missing_bifurcation``, ``missing_critique``; paper:
``missing_failure_point``, ``missing_success_factors``, ``missing_reflection``; both:
``missing_heuristic`` (no heuristics section, or an empty one), ``heuristic_not_if_then`` (no item of
the heuristics section is a rule in an accepted form), ``heuristic_leaks_answer``,
``heuristic_has_problem_numbers``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

REPLAY_CONTEXTS = ("full", "heuristics")
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
    failure: str | None = None           # paper: Failure Point & Latent Cognitive Pattern
    success_factors: str | None = None   # paper: Success Factors
    reflection: str | None = None        # paper: First-Person Reflective Summary
    heuristics: list[str] = field(default_factory=list)              # H: the kept rules
    heuristic_names: list[str | None] = field(default_factory=list)  # their "[Pattern Name]", if any
    target_text: str | None = None       # M*: the trained text (module docstring); None when rejected
    reject_reason: str | None = None     # None = parsed completely
    # Which part of M each stretch of target_text is: (part, start, end) character spans in target_text, part
    # one of PARTS. The update logs the NLL of each part (nll_bifurcation, nll_critique, nll_heuristics).
    spans: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reject_reason is None


# ------------------------------------------------------------------------------ thinking, runaway text


def _strip_thinking(text: str) -> tuple[str, bool]:
    """The analysis is what follows the last ``</think>``; an unclosed ``<think>`` means the generation
    ended while still thinking. Returns (text, finished)."""
    low = text.lower()
    end = low.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):], True
    start = low.find("<think>")
    if start >= 0:
        return text[:start], False
    return text, True


# A new prompt or turn: what a base model writes once its analysis is over.
_END_OF_ANALYSIS = re.compile(
    r"^[ \t]*(?:\#{1,6}[ \t]*)?(?:\*\*)?(?:problem|question|q)(?:[ \t]*\d+)?(?:\*\*)?[ \t]*(?:[:：]|$)"
    r"|^[ \t]*(?:human|user|assistant|system)[ \t]*[:：]"
    r"|<\|(?:im_end|im_start|endoftext|eot_id|end_of_text|end)\|>|</s>",
    re.IGNORECASE | re.MULTILINE)


# --------------------------------------------------------------------------------------- sections

_NAMES = {
    "bifurcation": r"bifurcation(?:[ \t]+(?:point|step))?",
    "critique": r"critique",
    "failure": (r"failure[ \t]+(?:points?|analysis|modes?)|latent[ \t]+cognitive[ \t]+patterns?"
                r"|error[ \t]+(?:analysis|diagnosis|point)|root[ \t]+causes?(?:[ \t]+analysis)?"
                r"|point[ \t]+of[ \t]+divergence|divergence[ \t]+point"
                r"|(?:what|where)[ \t]+(?:[\w'’]+[ \t]+){0,3}went[ \t]+wrong"),
    "success_factors": (r"(?:(?:key|critical)[ \t]+)?success[ \t]+(?:factors?|analysis)"
                        r"|what[ \t]+(?:[\w'’]+[ \t]+){0,3}(?:went|did)[ \t]+right"
                        r"|why[ \t]+(?:[\w'’]+[ \t]+){0,3}(?:succeeded|worked)"),
    "reflection": (r"(?:first[ \t-]*person[ \t]+|self[ \t-]*|personal[ \t]+)?"
                   r"(?:reflective[ \t]+summary|reflections?)"),
    "heuristic": (r"(?:(?:subject(?:[ \t-]+specific)?|general|abstract)[ \t]+)?heuristics?(?:[ \t]+rules?)?"
                  r"|general[ \t]+rules|transferable[ \t]+rules|lessons[ \t]+learned|key[ \t]+lessons"
                  r"|meta[ \t-]*experiences?"),
}
_COMPACT = ("bifurcation", "critique", "heuristic")
_DIAGNOSIS = ("failure", "success_factors", "reflection")

# One header line: optional quote / heading / bullet / bold / numbering markup, the section title, a short
# remainder ("& Latent Cognitive Pattern", " (s*)"), then a colon (inline content may follow), the end of
# the line, or — after a closed bold title — inline content.
_EMOJI = r"(?:[\u2190-\u2bff\U0001f000-\U0001faff\ufe0f\u200d]+[ \t]*)?"  # "### 🔍 1. Failure Point"
_HEADER = (
    r"^[ \t]*(?:>[ \t]*)*(?P<hash>\#{{1,6}}[ \t]*)?{emoji}(?:[-*•+][ \t]+)?(?P<bold1>(?:\*\*|__)[ \t]*)?{emoji}"
    r"(?P<num>(?:(?:section|part)[ \t]*(?:\d+|[ivx]{{1,4}})[ \t]*[:.)\-–—]?[ \t]*)?"
    r"(?:\(?(?:\d{{1,2}}|[ivx]{{1,4}}|[a-d])(?:[.):]|[ \t]+[-–—])[ \t]*)?)"
    r"(?P<bold2>(?:\*\*|__)[ \t]*)?{emoji}"
    r"(?P<name>{names})\b"
    r"(?P<rest>(?:[^:：\n.!?*\#]|\*(?!\*)){{0,60}}?)[ \t]*(?P<punct>[:：.])?[ \t]*(?P<bold3>\*\*|__)?[ \t]*"
    r"(?:(?P<colon>[:：])[ \t]*(?:\*\*|__)?|(?P<eol>\#*[ \t]*$)|(?(bold3)(?=\S)|(?!)))")
_HEADERS = {name: re.compile(_HEADER.format(names=pat, emoji=_EMOJI), re.IGNORECASE | re.MULTILINE)
            for name, pat in _NAMES.items()}


@dataclass(frozen=True)
class _Mark:
    start: int  # start of the header line
    end: int    # end of the header (the body starts here, possibly on the same line)
    name: str


@dataclass(frozen=True)
class _Section:
    name: str
    start: int       # header line
    body_start: int  # after the header
    end: int         # next section's header, or the end of the analysis


def _is_header(m: re.Match) -> bool:
    """A header has a colon, markup, or is the bare title; an inline-content header a closed bold title."""
    colon = m.group("colon") or (m.group("punct") or ".") in ":："
    markup = any((m.group(g) or "").strip() for g in ("hash", "bold1", "num", "bold2", "bold3"))
    if m.group("colon") is None and m.group("eol") is None:  # "**Title** text"
        return bool(m.group("bold1") or m.group("bold2"))
    return bool(colon or markup or not m.group("rest").strip())


def _marks(text: str, names: Sequence[str]) -> list[_Mark]:
    found = sorted((_Mark(m.start(), m.end(), name) for name in names
                    for m in _HEADERS[name].finditer(text) if _is_header(m)), key=lambda k: (k.start, k.end))
    kept: list[_Mark] = []
    for mark in found:  # a line opens at most one section
        if not kept or mark.start >= kept[-1].end:
            kept.append(mark)
    return kept


def _analysis_end(text: str) -> int:
    """Where the analysis ends: the first new-prompt line or special token after the first header."""
    marks = _marks(text, tuple(_NAMES))
    first = marks[0].end if marks else 0
    m = _END_OF_ANALYSIS.search(text, first)
    return m.start() if m else len(text)


def _prepare(text: str) -> tuple[str, bool]:
    """(the analysis: thinking removed, runaway text cut — a prefix of the text after thinking, finished)."""
    body, finished = _strip_thinking(text or "")
    return body[:_analysis_end(body)], finished


def _sections(text: str) -> tuple[str, list[_Section]]:
    """(layout, sections in text order). The layout decides which headers split the text: in the paper
    layout a "Bifurcation step: 3" line stays inside the failure section."""
    if not _marks(text, _DIAGNOSIS):
        layout, marks = "compact", _marks(text, _COMPACT)
    else:
        layout = "paper"
        marks = _marks(text, _DIAGNOSIS + ("heuristic",))
        if not any(m.name == "failure" for m in marks):  # "## Bifurcation Point" titles the failure section
            marks = [_Mark(m.start, m.end, "failure" if m.name == "bifurcation" else m.name)
                     for m in _marks(text, _DIAGNOSIS + ("heuristic", "bifurcation"))]
        first = next((m.start for m in marks if m.name in _DIAGNOSIS), 0)
        marks = [m for m in marks if m.name != "heuristic" or m.start > first]  # a title, not H
    merged: list[_Mark] = []
    for mark in marks:  # a header repeating the current section's title stays in its body
        if not merged or mark.name != merged[-1].name:
            merged.append(mark)
    sections = []
    for i, mark in enumerate(merged):
        stop = merged[i + 1].start if i + 1 < len(merged) else len(text)
        body_start = mark.end
        inline = re.match(r"[ \t]*(?:[—–]|-(?=[ \t]))[ \t]*(?=\S)", text[body_start:stop])
        if inline:  # "**Success Factors** — Attempt B ...": the dash is not content
            body_start += inline.end()
        sections.append(_Section(mark.name, mark.start, body_start, stop))
    return layout, sections


def _clean_body(body: str) -> str:
    """Section text without surrounding blank lines, stray bold marks or horizontal rules."""
    lines = [ln for ln in body.splitlines() if not re.fullmatch(r"[ \t]*(?:[-*_=]{3,}|\*\*|__)[ \t]*", ln)]
    return "\n".join(lines).strip()


def _joined(text: str, sections: Sequence[_Section], name: str) -> str | None:
    bodies = [b for b in (_clean_body(text[s.body_start:s.end]) for s in sections if s.name == name) if b]
    return "\n\n".join(bodies) if bodies else None


def diagnosis_part(text: str) -> str:
    """The diagnosis (s*, C) of a generation: thinking removed, up to its heuristics header or the end of
    the analysis, surrounding whitespace removed — a prefix of the text after thinking, lstripped.

    two_pass conditions the abstract call on this and trains on it, so heuristics the model wrote
    unasked in the first call are neither shown to the second nor learned from the first.
    """
    text, _ = _prepare(text)
    _, sections = _sections(text)
    heuristic = next((s for s in sections if s.name == "heuristic"), None)
    return (text[:heuristic.start] if heuristic else text).strip()


# ------------------------------------------------------------------------------- s*: the step index

_WORD_NUMBERS = {w: i for i, w in enumerate(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split(), start=1)}
_ORDINALS = {w: i for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split(), start=1)}
_NUMWORD = "|".join(sorted(_WORD_NUMBERS, key=len, reverse=True))
_ORDWORD = "|".join(sorted(_ORDINALS, key=len, reverse=True))
# "Step 3", "step #3", "Step: **3**", "line 4", "step three", "the 3rd step", "the third (algebra) line"
_STEP = (rf"(?:\b(?:step|line)\b[ \t*_]*(?:\#|no\.?|number)?[ \t*_]*[:=\-–]?[ \t*_(]*(?P<d1>\d+)\b"
         rf"|\b(?:step|line)[ \t]+(?P<w1>{_NUMWORD})\b"
         rf"|\b(?P<d2>\d+)(?:st|nd|rd|th)[ \t]+(?:[\w()-]+[ \t]+)?(?:step|line)\b"
         rf"|\b(?P<w2>{_ORDWORD})[ \t]+(?:[\w()-]+[ \t]+)?(?:step|line)\b)")
_STEP_RE = re.compile(_STEP, re.IGNORECASE)
# An explicit statement: "Bifurcation step: 3", "Bifurcation: 3", "first diverges at Step 4", "went wrong in step 2".
_EXPLICIT_RE = re.compile(
    rf"(?:bifurcation|diverg\w*|went[ \t]+wrong|goes[ \t]+wrong|first[ \t]+(?:error|mistake))[^\n]{{0,80}}?{_STEP}"
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


def _bifurcation_step(text: str, layout: str, sections: Sequence[_Section]) -> int | None:
    """The step s* names (module docstring): explicit statement in its home section, then anywhere; then
    the first step named in the home section, numerals first; compact: lastly the line's first integer."""
    home = [text[s.start:s.end] for s in sections if s.name == ("failure" if layout == "paper" else "bifurcation")]
    for span in home + [text]:
        m = _EXPLICIT_RE.search(span)
        if m:
            return _step_value(m)
    mentions = [m for span in home for m in _STEP_RE.finditer(span)]
    digits = [m for m in mentions if m.group("d1") or m.group("d2")]
    if digits or mentions:  # "step 3" beats "the first step" mentioned earlier in passing
        return _step_value((digits or mentions)[0])
    if layout == "compact":
        for s in sections:
            if s.name == "bifurcation":
                m = re.search(r"-?\d+", text[s.body_start:s.end])
                if m:
                    return int(m.group())
    return None


# ------------------------------------------------------------------------------- H: items and rules

_OPENER = r"(?:if|when|whenever|before)\b"
_BULLET = re.compile(r"^[ \t]*(?:[-*•+▪◦‣][ \t]+|\(?\d{1,2}[.)][ \t]+|\(?[a-h][.)][ \t]+|\(?[ivx]{1,4}[.)][ \t]+)")
_NON_ITEM_LINE = re.compile(r"[ \t]*(?:[-*_=]{3,}|\#.*)[ \t]*")  # a rule or a heading ends an item
_SENTENCE_END = re.compile(r"[.!?:](?:\*\*|__|\*)?[ \t]*$")
# A name before the rule: "**Domain Guard**:", "**Domain Guard.**", "[Domain Guard]:", "Domain Guard -".
_BOLD_NAME = re.compile(rf"^(?:\*\*|__)(?P<name>[^*_\n]{{1,60}}?)[ \t]*[:.]?[ \t]*(?:\*\*|__)[ \t]*[:.\-–—]?[ \t]*(?={_OPENER})",
                        re.IGNORECASE)
_BRACKET_NAME = re.compile(rf"^\[(?P<name>[^\]\n]{{1,60}})\][ \t]*[:.\-–—]?[ \t]*(?={_OPENER})", re.IGNORECASE)
_PLAIN_NAME = re.compile(rf"^(?P<name>[^:\n]{{1,60}}?)[ \t]*[:\-–—][ \t]+(?={_OPENER})", re.IGNORECASE)
_GENERIC_LABEL = re.compile(r"(?:rule|heuristic|lesson|principle|h|r)[ \t]*#?[ \t]*\d*", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\[(?:condition|action)\]", re.IGNORECASE)
_IF_THEN = re.compile(r"^if\b.+?\bthen\b\W*\w", re.IGNORECASE | re.DOTALL)
_CONDITION = re.compile(rf"^{_OPENER}", re.IGNORECASE)
_IMPERATIVES = (
    "check verify confirm test ask consider compute calculate write list enumerate draw sketch set use apply treat "
    "split divide multiply factor simplify substitute expand rewrite convert count identify look find reread re-read "
    "recheck re-check rederive re-derive restate start begin avoid ensure remember keep plug solve define label track "
    "account include exclude separate isolate compare estimate evaluate examine reduce note assume prove try express "
    "take return double-check pause stop trace work translate recompute recount sanity-check distinguish determine "
    "analyze analyse map read question be think recall go watch beware prefer favor favour reconsider revisit plot "
    "graph handle interpret model organize organise break add subtract").split()
_PAST = ("was were had did got went saw made thought forgot knew felt took wrote missed ran began chose could would "
         "might").split()
# What may follow "<condition>," in a rule without "then": a first-person or second-person instruction (not
# narration in the past tense), an adverb of rule, "it is essential to", an imperative; or a modal anywhere.
_DIRECTIVE = re.compile(
    r"^(?:then[ \t]+)?(?:"
    rf"(?:I|we|you)[ \t]+(?:\w+ly[ \t]+)?(?!\w+ly\b)(?!(?:{'|'.join(_PAST)})\b)(?!\w+ed\b)"
    r"(?!(?:should|must|ought[ \t]+to)[ \t]+have\b)[a-z']+\b"
    r"|(?:always|never|first|do[ \t]+not|don't|make[ \t]+sure)\b"
    r"|it(?:[ \t]+is|'s|’s)[ \t]+(?:essential|crucial|important|necessary|vital|key|critical|best|wise|safer?)[ \t]+to\b"
    rf"|(?:\w+ly[ \t]+)?(?:{'|'.join(map(re.escape, _IMPERATIVES))})\b)"
    r"|.*\b(?:must|should|needs?[ \t]+to|ha(?:s|ve)[ \t]+to|ought[ \t]+to)\b(?![ \t]+have\b)",  # a modal anywhere
    re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class _Item:
    text: str  # its lines, bullet marks removed, joined with spaces
    end: int   # offset just past its last non-blank character in the analysis text


def _lines(text: str, start: int, stop: int):
    """(line start, line end without the newline) for each line of text[start:stop]."""
    pos = start
    while pos < stop:
        nl = text.find("\n", pos, stop)
        end = stop if nl < 0 else nl
        yield pos, end
        pos = end + 1


def _opens_rule(content: str) -> bool:
    """A line that begins a rule by itself: a capitalised opener, possibly after a name."""
    s = content.strip()
    for pat in (_BOLD_NAME, _BRACKET_NAME):
        m = pat.match(s)
        if m:
            s = s[m.end():]
            break
    return re.match(r"^(?:\*\*|__|\*)?[ \t]*(?:If|When|Whenever|Before)\b", s) is not None


def _heuristic_items(text: str, sections: Sequence[_Section]) -> list[_Item]:
    """Items of the heuristics sections (module docstring: "H: rule forms")."""
    items: list[tuple[list[str], int]] = []  # (the item's lines, where its last line ends)
    for s in sections:
        if s.name != "heuristic":
            continue
        item_open = False
        for a, b in _lines(text, s.body_start, s.end):
            line = text[a:b]
            if not line.strip() or _NON_ITEM_LINE.fullmatch(line):
                item_open = False  # a blank line, a heading or a horizontal rule ends an item
                continue
            inline = a == s.body_start  # content on the header line itself
            bullet = None if inline else _BULLET.match(line)
            content = line[bullet.end():] if bullet else line.strip()
            indented = not inline and line[0] in " \t"
            ended = item_open and _SENTENCE_END.search(items[-1][0][-1]) is not None
            if not item_open or bullet or _opens_rule(content) or (ended and not indented):
                items.append(([content], 0))
                item_open = True
            else:  # a rule wrapped over lines
                items[-1][0].append(content)
            items[-1] = (items[-1][0], a + len(line.rstrip()))
    return [_Item(" ".join(lines), end) for lines, end in items]


def _strip_markup(s: str) -> str:
    s = re.sub(r"\*\*|__|`", "", s)
    s = re.sub(r"(?<![\w*])\*(?=\w)|(?<=\w)\*(?![\w*])", "", s)  # *italic*, not a*b or "a * b"
    return re.sub(r"\s+", " ", s).strip()


def _name_and_rule(item: str) -> tuple[str | None, str]:
    """(pattern name or None, rule text without markup): "[Domain Guard]: If ..." -> ("Domain Guard", "If ...")."""
    s = item.strip()
    name = None
    for pat in (_BOLD_NAME, _BRACKET_NAME):
        m = pat.match(s)
        if m:
            name, s = m.group("name"), s[m.end():]
            break
    s = _strip_markup(s)
    if name is None and not re.match(_OPENER, s, re.IGNORECASE):
        m = _PLAIN_NAME.match(s)
        if m and not re.search(rf"\b{_OPENER}", m.group("name"), re.IGNORECASE):
            name, s = m.group("name"), s[m.end():]
    if name is not None:
        name = _strip_markup(name).strip(" []:.")
        if not name or _GENERIC_LABEL.fullmatch(name):
            name = None
    return name, s.strip()


def is_rule(rule: str) -> bool:
    """An accepted rule form (module docstring): If ... then ...; If|When|Whenever|Before ..., <directive>."""
    s = rule.strip()
    if not s or s.endswith(":") or _PLACEHOLDER.search(s):
        return False
    if _IF_THEN.match(s):
        return True
    if _CONDITION.match(s):  # "<condition>, <directive>": some comma must end the condition
        return any(_DIRECTIVE.match(s[m.end():].lstrip()) for m in re.finditer(r",|\bthen\b", s))
    return False


# ------------------------------------------------------------------------------------------- leaks

_STRUCTURAL_NUMBERS = frozenset({str(i) for i in range(11)} | {"100"})
_NUM = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")
# A number as a token of a plain text: an integer, a decimal or a fraction a/b (so 1/6 is not a 6).
_NUMBER_TOKEN = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:[ \t]*/[ \t]*\d+(?:\.\d+)?)?(?![\d.]\d|\d)")
_ANSWER_CUE = re.compile(
    r"\b(?:answers?|results?|solutions?)\b[ \t]*(?:[:=]|is|equals|of|(?:should|must|will|would)[ \t]+be|was)?"
    r"[ \t]*(?:exactly|just|simply)?[ \t]*\{?[ \t]*$", re.IGNORECASE)
_COPULA = re.compile(
    r"(?:=|≈|\bis|\bare|\bequals?|\bequal[ \t]+to|\bgives|\byields|\bbecomes|\bto[ \t]+be)[ \t]*"
    r"(?:exactly|about|approximately|just)?[ \t]*$", re.IGNORECASE)
_EXPRESSION_GOES_ON = re.compile(r"[a-z(]|[ \t]*(?:[-+*/^×·=<>]|\\(?:cdot|times|frac))")  # "42x", "42 + 1"


def _plain(text: str, squeeze: bool = True) -> str:
    r"""LaTeX and unicode math to a plain, lower-case form: \frac{3}{4} -> 3/4, \sqrt{2} -> sqrt(2),
    \boxed{x} -> "answer {x}" (the final-answer mark is an answer context)."""
    s = text.lower().replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("{,}", "").replace("−", "-").replace("√", "sqrt").replace("π", "\\pi")
    s = re.sub(r"\\(?:left|right|displaystyle)\b", "", s)
    s = re.sub(r"\\(?:text|mathrm|mathbf|textbf|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\boxed\s*\{", " answer {", s)
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


def _value(token: str) -> Fraction | None:
    """|value| of a number token or a plain gold answer ("-3/4", "0.75", "1000"), None if not a number."""
    m = re.fullmatch(r"[ \t]*[+-]?(\d+(?:\.\d+)?)(?:[ \t]*/[ \t]*(\d+(?:\.\d+)?))?[ \t]*", token)
    if not m:
        return None
    den = Fraction(m.group(2)) if m.group(2) else Fraction(1)
    return Fraction(m.group(1)) / den if den else None


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


def _states_number(rule: str, value: Fraction, structural: bool) -> bool:
    """The rule states `value` in an answer context (module docstring: leak rule)."""
    plain = _plain(rule, squeeze=False)
    for m in _NUMBER_TOKEN.finditer(plain):
        if _value(m.group().lstrip("-")) != value:
            continue
        before = plain[max(0, m.start() - 40):m.start()]
        if _ANSWER_CUE.search(before):
            return True
        if not structural and _COPULA.search(before) and not _EXPRESSION_GOES_ON.match(plain, m.end()):
            return True
    return False


def _leaks_answer(rule: str, gold: str) -> bool:
    g = _plain(gold)
    if not g:
        return False
    value = _value(g)
    if value is not None:
        structural = value.denominator == 1 and str(value.numerator) in _STRUCTURAL_NUMBERS
        return _states_number(rule, value, structural)
    forms = {g.lstrip("+"), g.lstrip("+-")}
    plain_rule = _plain(rule, squeeze=False)
    return any(_contains(plain_rule, f) for f in forms
               if len(f) >= 2 and not (f.isalpha() and len(f) < 3))  # "B", "x", "no": too short to tell


def _rule_problem(rule: str, gold: str, problem_numbers: set[str]) -> str | None:
    if gold and _leaks_answer(rule, gold):
        return "heuristic_leaks_answer"
    if _numbers(rule) & problem_numbers:
        return "heuristic_has_problem_numbers"
    return None


# ------------------------------------------------------------------------------------------ parsing


def _diagnose(text: str, layout: str, sections: Sequence[_Section], res: ParsedAnalysis) -> None:
    """Fill s* and C into `res`, and the diagnosis reject reason if any."""
    res.bifurcation_step = _bifurcation_step(text, layout, sections)
    if layout == "compact":
        res.bifurcation = _joined(text, sections, "bifurcation")
        res.critique = _joined(text, sections, "critique")
        if res.bifurcation_step is None:
            res.reject_reason = "missing_bifurcation"
        elif not res.critique:
            res.reject_reason = "missing_critique"
        return
    res.failure = res.bifurcation = _joined(text, sections, "failure")
    res.success_factors = _joined(text, sections, "success_factors")
    res.reflection = _joined(text, sections, "reflection")
    parts = [p for p in (res.failure, res.success_factors, res.reflection) if p]
    res.critique = "\n\n".join(parts) if parts else None
    for part, reason in ((res.failure, "missing_failure_point"), (res.success_factors, "missing_success_factors"),
                         (res.reflection, "missing_reflection")):
        if not part:
            res.reject_reason = reason
            return


def _abstract(text: str, sections: Sequence[_Section], res: ParsedAnalysis, gold_answer: str | None,
              question: str | None, max_heuristics: int) -> int | None:
    """Fill H into `res` (or its reject reason); returns where the last kept rule ends in `text`."""
    items = _heuristic_items(text, sections)
    if not items:
        res.reject_reason = "missing_heuristic"
        return None
    rules = [(name, rule, it.end) for it in items for name, rule in [_name_and_rule(it.text)] if is_rule(rule)]
    if not rules:
        res.reject_reason = "heuristic_not_if_then"
        return None
    kept = rules[:max_heuristics]
    problem_numbers = _numbers(question or "") - _STRUCTURAL_NUMBERS
    gold = (gold_answer or "").strip()
    for name, rule, _ in kept:
        reason = _rule_problem(f"{name or ''} {rule}", gold, problem_numbers)
        if reason:
            res.reject_reason = reason
            return None
    res.heuristics = [rule for _, rule, _ in kept]
    res.heuristic_names = [name for name, _, _ in kept]
    return kept[-1][2]


def _spans(body: str, sections: Sequence[_Section], target: str) -> list[tuple[str, int, int]]:
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
    body, finished = _prepare(text)
    layout, sections = _sections(body)
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
