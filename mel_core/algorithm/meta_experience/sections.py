"""Finding the sections of an analysis: thinking removed, runaway text cut, headers by title, then by number or
position (docs/PARSER.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

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
    # the paper (Appendix C): "Failure Resolution Path & Error Pattern Recognition", fields "Failure Point" and
    # "Latent Cognitive Pattern" — titles too: under the section's title they stay in it, alone they title it
    "failure": (r"failure[ \t]+(?:points?|analysis|modes?|resolution(?:[ \t]+path)?|path)|resolution[ \t]+path"
                r"|latent[ \t]+cognitive[ \t]+patterns?"
                r"|error[ \t]+(?:analysis|diagnosis|point|patterns?(?:[ \t]+recognition)?)"
                r"|root[ \t]+causes?(?:[ \t]+analysis)?|point[ \t]+of[ \t]+divergence|divergence[ \t]+point"
                r"|(?:what|where)[ \t]+(?:[\w'’]+[ \t]+){0,3}went[ \t]+wrong"),
    # the paper: "Analysis of Success Factors" (fields Reasoning Pivot, Robustness Factor, Reason for Effectiveness)
    "success_factors": (r"(?:(?:key|critical)[ \t]+)?success[ \t]+(?:factors?|analysis)"
                        r"|analysis[ \t]+of[ \t]+(?:the[ \t]+)?(?:key[ \t]+)?success(?:[ \t]+factors?)?"
                        r"|what[ \t]+(?:[\w'’]+[ \t]+){0,3}(?:went|did)[ \t]+right"
                        r"|why[ \t]+(?:[\w'’]+[ \t]+){0,3}(?:succeeded|worked)"),
    # the paper: "First-Person Reflective Summary" (fields Review, Insight, Action)
    "reflection": (r"(?:first[ \t-]*person[ \t]+|self[ \t-]*|personal[ \t]+)?"
                   r"(?:reflective[ \t]+summary|reflections?)|first[ \t-]*person[ \t]+summary"),
    # the paper: "Subject Heuristics (Internalized Experience)"
    "heuristic": (r"(?:(?:subject(?:[ \t-]+(?:specific|level))?|general|abstract|internali[sz]ed)[ \t]+)?"
                  r"heuristics?(?:[ \t]+rules?)?"
                  r"|general[ \t]+rules|transferable[ \t]+rules|lessons[ \t]+learned|key[ \t]+lessons"
                  r"|meta[ \t-]*experiences?|internali[sz]ed[ \t]+(?:experiences?|lessons?)"),
}
_COMPACT = ("bifurcation", "critique", "heuristic")
_DIAGNOSIS = ("failure", "success_factors", "reflection")

# One header line: optional quote / heading / bullet / bold / numbering markup (_MARKUP), the section title, a short
# remainder ("& Latent Cognitive Pattern", " (s*)"), then a colon (inline content may follow), the end of
# the line, or — after a closed bold title — inline content.
_EMOJI = r"(?:[\u2190-\u2bff\U0001f000-\U0001faff\ufe0f\u200d]+[ \t]*)?"  # "### 🔍 1. Failure Point"
_MARKUP = (
    r"^(?P<indent>[ \t]*)(?P<quote>(?:>[ \t]*)*)(?P<hash>\#{{1,6}}[ \t]*)?{emoji}(?P<bullet>[-*•+][ \t]+)?"
    r"(?P<bold1>(?:\*\*|__)[ \t]*)?{emoji}"
    r"(?P<num>(?:(?:section|part)[ \t]*(?P<part>\d+|[ivx]{{1,4}})[ \t]*[:.)\-–—]?[ \t]*)?"
    r"(?:\(?(?P<ordinal>\d{{1,2}}|[ivx]{{1,4}}|[a-d])(?:[.):]|[ \t]+[-–—])[ \t]*)?)"
    r"(?P<bold2>(?:\*\*|__)[ \t]*)?{emoji}")
_HEADER = _MARKUP + (
    r"(?P<name>{names})\b"
    r"(?P<rest>(?:[^:：\n.!?*\#]|\*(?!\*)){{0,60}}?)[ \t]*(?P<punct>[:：.])?[ \t]*(?P<bold3>\*\*|__)?[ \t]*"
    r"(?:(?P<colon>[:：])[ \t]*(?:\*\*|__)?|(?P<eol>\#*[ \t]*$)|(?(bold3)(?=\S)|(?!)))")
_HEADERS = {name: re.compile(_HEADER.format(names=pat, emoji=_EMOJI), re.IGNORECASE | re.MULTILINE)
            for name, pat in _NAMES.items()}
# A header line whatever its title ("## 2. The Turning Point"): the same markup, then a short title alone on
# its line. What number and position mapping may assign a section to when no title of _NAMES matched it.
_ANY_HEADER = re.compile((_MARKUP + r"(?P<title>[^\s:：*\#][^\n:：*\#]{{0,59}}?)[ \t]*[:：]?[ \t]*"
                                    r"(?P<bold3>\*\*|__)?[ \t]*[:：]?[ \t]*\#*[ \t]*$").format(emoji=_EMOJI),
                         re.IGNORECASE | re.MULTILINE)
# The paper's sections in its order: a header numbered k (1..4) is the k-th.
_SLOTS = ("failure", "success_factors", "reflection", "heuristic")
_ROMAN = {"i": 1, "ii": 2, "iii": 3, "iv": 4}
# A line that opens a rule: a heuristics section, not a document title ("# Meta-Experience Analysis").
_RULE_LINE = re.compile(r"^[ \t]*(?:[-*•+][ \t]+|\(?\d{1,2}[.)][ \t]+)?(?:\*\*|__)?(?:If|When|Whenever)\b",
                        re.MULTILINE)
_RULE_OPENER = re.compile(r"[ \t]*(?:\*\*|__|\*)?[ \t]*(?:If|When|Whenever|Before)\b")


class _Style(NamedTuple):
    """How a header line is marked up. A document's section headers share one style; its sub-labels
    ("- **Review:**", "1. Failure Point:") usually have another."""
    indented: bool
    quote: str      # ">" marks
    heading: str    # "##"
    bullet: bool
    bold: bool      # a closed bold title
    numbering: str  # the number's form, not the number: "N.", "(N)", "sectionN:"


@dataclass(frozen=True)
class _Mark:
    start: int  # start of the header line
    end: int    # end of the header (the body starts here, possibly on the same line)
    name: str   # the section it opens; "" for an untitled header not (yet) assigned one
    style: _Style | None = None
    number: int | None = None  # its number ("## 2.", "Section II:", "(3)"), if any


@dataclass(frozen=True)
class Section:
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


def _style(m: re.Match) -> _Style:
    """The markup of a header matched by _HEADER or _ANY_HEADER."""
    num, at = m.group("num") or "", m.start("num")
    for group in ("ordinal", "part"):  # right to left, so the earlier offsets stay valid
        if m.group(group):
            num = num[:m.start(group) - at] + "N" + num[m.end(group) - at:]
    return _Style(indented=bool(m.group("indent")), quote=re.sub(r"\s", "", m.group("quote")),
                  heading=(m.group("hash") or "").strip(), bullet=bool(m.group("bullet")),
                  bold=bool((m.group("bold1") or m.group("bold2")) and m.group("bold3")),
                  numbering=re.sub(r"\s", "", num.lower()))


def _number(m: re.Match) -> int | None:
    n = (m.group("part") or m.group("ordinal") or "").lower()
    return int(n) if n.isdigit() else _ROMAN.get(n)  # a letter ("b)") is not a section number


def _marks(text: str, names: Sequence[str]) -> list[_Mark]:
    found = sorted((_Mark(m.start(), m.end(), name, _style(m), _number(m)) for name in names
                    for m in _HEADERS[name].finditer(text) if _is_header(m)), key=lambda k: (k.start, k.end))
    kept: list[_Mark] = []
    for mark in found:  # a line opens at most one section
        if not kept or mark.start >= kept[-1].end:
            kept.append(mark)
    return kept


def _untitled(text: str) -> list[_Mark]:
    """Header lines no title of _NAMES matches: alone on their line, marked up as a heading, a closed bold
    title or numbered, and not ending like a sentence — never a line of prose."""
    titled = {m.start for m in _marks(text, tuple(_NAMES))}
    out = []
    for m in _ANY_HEADER.finditer(text):
        style = _style(m)
        marked_up = style.heading or style.bold or style.numbering
        if marked_up and m.start() not in titled and m.group("title").rstrip()[-1] not in ".!?,;":
            out.append(_Mark(m.start(), m.end(), "", style, _number(m)))
    return out


def _by_number(marks: Sequence[_Mark], untitled: Sequence[_Mark]) -> list[_Mark]:
    """Sections found by their number: where the titled headers of one style number at least two sections as
    the paper does (1 failure .. 4 heuristics), an untitled header of that style numbered k, for a section k
    not found, after every such header numbered below k and before every one above, opens section k."""
    found, out = {m.name for m in marks}, []
    for style in {m.style for m in marks if m.number}:
        numbered = [m for m in marks if m.style == style and m.number]
        if len({m.name for m in numbered}) < 2 or any(m.number != _SLOTS.index(m.name) + 1 for m in numbered):
            continue
        for k, name in enumerate(_SLOTS, start=1):
            fits = [u for u in untitled if u.style == style and u.number == k
                    and all((m.start < u.start) == (m.number < k) for m in numbered)]
            if name not in found and len(fits) == 1:
                out.append(replace(fits[0], name=name))
                found.add(name)
    return out


def _by_position(marks: Sequence[_Mark], untitled: Sequence[_Mark]) -> list[_Mark]:
    """The one section not found, by position: exactly four headers of one style, three titling three different
    sections and one untitled, in the paper's order once the untitled one is given the missing section."""
    missing = [name for name in _SLOTS if name not in {m.name for m in marks}]
    if len(missing) != 1:
        return []
    for style in {m.style for m in marks}:
        titled = [m for m in marks if m.style == style]
        others = [replace(u, name=missing[0]) for u in untitled if u.style == style]
        four = sorted(titled + others, key=lambda m: m.start)
        if len(titled) == 3 and len(others) == 1 and tuple(m.name for m in four) == _SLOTS:
            return others
    return []


def _is_rule_name(text: str, mark: _Mark, marks: Sequence[_Mark]) -> bool:
    """A diagnosis title after a heuristics header, with a rule on its line, is that rule's name ("- **Root
    Cause Check**: If ..."), not a new section."""
    return (mark.name in _DIAGNOSIS and any(m.name == "heuristic" and m.start < mark.start for m in marks)
            and _RULE_OPENER.match(text, mark.end) is not None)


def _is_document_title(text: str, mark: _Mark, marks: Sequence[_Mark]) -> bool:
    """A heuristics title before the first diagnosis section is the document's title ("# Meta-Experience
    Analysis") unless it is marked up like that section's header and its body opens a rule (heuristics first)."""
    first = next((m for m in marks if m.name in _DIAGNOSIS), None)
    if first is None or mark.start > first.start:
        return False
    stop = next(m.start for m in marks if m.start > mark.start)
    return mark.style != first.style or not _RULE_LINE.search(text[mark.end:stop])


def _analysis_end(text: str) -> int:
    """Where the analysis ends: the first new-prompt line or special token after the first header."""
    marks = _marks(text, tuple(_NAMES))
    first = marks[0].end if marks else 0
    m = _END_OF_ANALYSIS.search(text, first)
    return m.start() if m else len(text)


def prepare(text: str) -> tuple[str, bool]:
    """(the analysis: thinking removed, runaway text cut — a prefix of the text after thinking, finished)."""
    body, finished = _strip_thinking(text or "")
    return body[:_analysis_end(body)], finished


def find_sections(text: str) -> tuple[str, list[Section]]:
    """(layout, sections in text order). The layout decides which headers split the text: in the paper
    layout a "Bifurcation step: 3" line stays inside the failure section. Paper sections are found by title,
    then, for those still missing, by number and by position (docs/PARSER.md); their order is free."""
    if not _marks(text, _DIAGNOSIS):
        layout, marks = "compact", _marks(text, _COMPACT)
    else:
        layout = "paper"
        marks = _marks(text, _DIAGNOSIS + ("heuristic",))
        if not any(m.name == "failure" for m in marks):  # "## Bifurcation Point" titles the failure section
            marks = [replace(m, name="failure") if m.name == "bifurcation" else m
                     for m in _marks(text, _DIAGNOSIS + ("heuristic", "bifurcation"))]
        marks = [m for m in marks if m.name != "heuristic" or not _is_document_title(text, m, marks)]
        marks = [m for m in marks if not _is_rule_name(text, m, marks)]
        if not set(_SLOTS) <= {m.name for m in marks}:  # a section not found by its title: by number, by position
            untitled = _untitled(text)
            marks += _by_number(marks, untitled)
            marks = sorted(marks + _by_position(marks, untitled), key=lambda m: m.start)
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
        sections.append(Section(mark.name, mark.start, body_start, stop))
    return layout, sections


def _clean_body(body: str) -> str:
    """Section text without surrounding blank lines, stray bold marks or horizontal rules."""
    lines = [ln for ln in body.splitlines() if not re.fullmatch(r"[ \t]*(?:[-*_=]{3,}|\*\*|__)[ \t]*", ln)]
    return "\n".join(lines).strip()


def joined_section(text: str, sections: Sequence[Section], name: str) -> str | None:
    bodies = [b for b in (_clean_body(text[s.body_start:s.end]) for s in sections if s.name == name) if b]
    return "\n\n".join(bodies) if bodies else None


def diagnosis_part(text: str) -> str:
    """The diagnosis (s*, C) of a generation: thinking removed, up to its heuristics header or the end of
    the analysis, surrounding whitespace removed — a prefix of the text after thinking, lstripped.

    two_pass conditions the abstract call on this and trains on it, so heuristics the model wrote
    unasked in the first call are neither shown to the second nor learned from the first.
    """
    text, _ = prepare(text)
    _, sections = find_sections(text)
    heuristic = next((s for s in sections if s.name == "heuristic"), None)
    return (text[:heuristic.start] if heuristic else text).strip()


