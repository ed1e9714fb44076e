"""The retrospective context C_retro = [I, x, y+, y-] made to fit the window without losing its head.

The analysis prompt holds the instruction, the question and two whole solutions; with long solutions it can
exceed ``model.max_seq_len`` less the analysis budget. Cutting it from the left (what a tokenizer's
truncation does) would drop the instruction and the question first, and the NLL would then condition on
something other than C_retro. Instead (``experience.long_context``):

- ``shorten`` [C]: cut each solution from its middle, keeping its beginning (where the reasoning starts)
  and its end (where the answer is), with a visible marker ``[... N tokens omitted ...]``; the longer
  solution gives up more. If a solution would have to shrink below ``MIN_KEPT_TOKENS`` (or half of itself,
  if shorter), the pair is skipped.
- ``skip``: a pair whose context does not fit is not analysed (reason ``context_too_long``).

The instruction and the question are never cut. Both outcomes are counted per step
(``retro_shortened``, ``retro_skipped``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mel_core.tokens import encode_completions

MARKER = "\n[... {n} tokens omitted ...]\n"
MIN_KEPT_TOKENS = 32  # of each solution (or half of it, if shorter), beginning and end together


@dataclass(frozen=True)
class Fitted:
    prompt: str | None  # the model input, None when the pair is skipped
    shortened: bool


def _cut_middle(tokenizer, text: str, keep: int) -> str:
    """`text` with its middle tokens replaced by the marker, keeping `keep` tokens (head and tail)."""
    ids = encode_completions(tokenizer, [text])[0]
    if keep >= len(ids):
        return text
    head, tail = keep // 2, keep - keep // 2
    left = tokenizer.decode(ids[:head])
    right = tokenizer.decode(ids[len(ids) - tail:]) if tail else ""
    return f"{left}{MARKER.format(n=len(ids) - keep)}{right}"


def fit(render: Callable[[str, str], str], incorrect: str, correct: str, budget: int, tokenizer,
        count: Callable[[str], int], mode: str = "shorten") -> Fitted:
    """The prompt `render(incorrect, correct)` within `budget` tokens (`count` measures a model input).

    `render` builds the whole model input from the two solutions (instruction, question and any fixed part
    such as a two_pass diagnosis included), so only the solutions are ever shortened.
    """
    prompt = render(incorrect, correct)
    excess = count(prompt) - budget
    if excess <= 0:
        return Fitted(prompt, False)
    if mode == "skip":
        return Fitted(None, False)
    lengths = [len(encode_completions(tokenizer, [t])[0]) for t in (incorrect, correct)]
    marker = len(encode_completions(tokenizer, [MARKER.format(n=10 ** 5)])[0])
    floor = [min(MIN_KEPT_TOKENS, n // 2) for n in lengths]
    for attempt in range(6):  # re-measure: the marker and the token boundaries move the count a little
        cut = excess + 2 * marker + 2 * attempt
        # the longer solution gives up more: both end at the same length where possible
        keep = _keep_lengths(lengths, sum(lengths) - cut)
        if any(k < f for k, f in zip(keep, floor)):
            return Fitted(None, False)
        shortened = (_cut_middle(tokenizer, incorrect, keep[0]), _cut_middle(tokenizer, correct, keep[1]))
        prompt = render(*shortened)
        if count(prompt) <= budget:
            return Fitted(prompt, True)
    return Fitted(None, False)


def _keep_lengths(lengths: list[int], total: int) -> list[int]:
    """Tokens each solution keeps when together they keep `total`: equal shares, a short one keeps all."""
    if total <= 0:
        return [0 for _ in lengths]
    a, b = lengths
    share = total // 2
    if a <= share:
        return [a, total - a]
    if b <= share:
        return [total - b, b]
    return [share, total - share]
