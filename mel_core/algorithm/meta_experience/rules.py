"""H: the items of a heuristics section and the rule forms an item must take (docs/PARSER.md, "Rule forms")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from mel_core.algorithm.meta_experience.sections import Section

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


def heuristic_items(text: str, sections: Sequence[Section]) -> list[_Item]:
    """Items of the heuristics sections (docs/PARSER.md, "H: rule forms")."""
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


def name_and_rule(item: str) -> tuple[str | None, str]:
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
    """An accepted rule form (docs/PARSER.md): If ... then ...; If|When|Whenever|Before ..., <directive>."""
    s = rule.strip()
    if not s or s.endswith(":") or _PLACEHOLDER.search(s):
        return False
    if _IF_THEN.match(s):
        return True
    if _CONDITION.match(s):  # "<condition>, <directive>": some comma must end the condition
        return any(_DIRECTIVE.match(s[m.end():].lstrip()) for m in re.finditer(r",|\bthen\b", s))
    return False


