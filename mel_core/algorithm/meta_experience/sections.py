"""Finding the sections of an analysis: thinking removed, runaway text cut, headers by title (docs/PARSER.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

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


def prepare(text: str) -> tuple[str, bool]:
    """(the analysis: thinking removed, runaway text cut — a prefix of the text after thinking, finished)."""
    body, finished = _strip_thinking(text or "")
    return body[:_analysis_end(body)], finished


def find_sections(text: str) -> tuple[str, list[Section]]:
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


