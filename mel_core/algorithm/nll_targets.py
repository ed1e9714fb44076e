"""Which tokens of an NLL target carry loss (docs/DESIGN.md, "The algorithm", step 7).

Every token of M* by default (the paper). ``experience.nll_parts`` keeps the loss on some parts of M only, read
off the part label each target id was stored with (mel_core.tokens.encode_target, meta_experience.PARTS); and
``experience.mask_quoted_solution`` takes it off the critique's verbatim copies of a solution line, found in the
stored text when the update builds its batch. Pure functions: labels and text in, a 0/1 mask per id out.
"""

from __future__ import annotations

from collections.abc import Sequence

# experience.nll_parts -> the parts of M whose tokens carry loss (None: every token, titles and end token included)
SELECTED_PARTS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "heuristics": ("heuristics",),
    "critique+heuristics": ("critique", "heuristics"),
}
# A solution line shorter than this (stripped) is not looked for: a bare number or word ("So", "x=3") would match text
# the critique writes in its own words. Our choice.
QUOTE_MIN_CHARS = 6


def quotable_lines(solutions: Sequence[str], min_chars: int = QUOTE_MIN_CHARS) -> list[str]:
    """The distinct stripped lines of the solutions at least `min_chars` long, longest first."""
    lines = {line.strip() for text in solutions for line in (text or "").splitlines()}
    return sorted((line for line in lines if len(line) >= min_chars), key=lambda s: (-len(s), s))


def quoted_spans(text: str, lines: Sequence[str]) -> list[tuple[int, int]]:
    """The character spans of `text` that reproduce one of `lines` verbatim (every occurrence), overlaps merged."""
    found = []
    for line in lines:
        start = text.find(line)
        while start >= 0:
            found.append((start, start + len(line)))
            start = text.find(line, start + 1)
    merged: list[tuple[int, int]] = []
    for start, end in sorted(found):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def tokens_within(text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token (its character span in `text`), whether its non-blank characters lie inside one of `spans`:
    a byte-level token carries the blank before its word (" stay"), which is not what is quoted."""
    out = []
    for start, end in offsets:
        piece = text[start:end]
        lo = start + len(piece) - len(piece.lstrip())
        hi = end - (len(piece) - len(piece.rstrip()))
        if hi <= lo:  # a blank token: quoted when inside a quote
            lo, hi = start, end
        out.append(any(s <= lo and hi <= e for s, e in spans))
    return out


def loss_mask(parts: Sequence[int], part_names: Sequence[str], nll_parts: str,
              quoted: Sequence[bool] | None = None) -> list[int]:
    """1 for each target id that carries NLL loss, else 0: its part is one `nll_parts` selects, and it is not a
    critique token that `quoted` marks (one flag per id; None: nothing is quoted)."""
    selected = SELECTED_PARTS[nll_parts]
    out = []
    for i, p in enumerate(parts):
        name = part_names[p] if 0 <= p < len(part_names) else ""
        kept = selected is None or name in selected
        copied = quoted is not None and i < len(quoted) and quoted[i] and name == "critique"
        out.append(int(kept and not copied))
    return out
