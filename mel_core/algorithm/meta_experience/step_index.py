"""s*: the step index a failure section names (an explicit statement first, then the first step named)."""

from __future__ import annotations

import re
from typing import Sequence

from mel_core.algorithm.meta_experience.sections import Section

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


def find_bifurcation_step(text: str, layout: str, sections: Sequence[Section]) -> int | None:
    """The step s* names (docs/PARSER.md): explicit statement in its home section, then anywhere; then
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


