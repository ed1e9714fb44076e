"""Where a math answer is read under ``boxed_last``: the content of the last ``\\boxed{}`` / ``\\fbox{}``."""

from __future__ import annotations

import re

# ------------------------------------------------------------------------------------------- boxed answers
# Runs in the parent: plain string scanning, so texts without a boxed answer never reach a worker.

# \boxed or \fbox as a whole command name (not the start of a longer one such as \boxedtext).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# The argument of a brace-less \boxed 5: one run of characters up to whitespace, a math delimiter or a brace.
_BARE_ARGUMENT = re.compile(r"[^\s${}]+")


def _braced_group(text: str, open_pos: int) -> str | None:
    r"""The text inside the brace group opening at ``text[open_pos] == "{"``, or None if it never closes.

    Escaped characters (``\{``, ``\}``, ``\\``) are skipped as LaTeX does, so ``\{1,2\}`` nests nothing.
    """
    depth = 0
    i, n = open_pos, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
        i += 1
    return None


def last_boxed_answer(text: str | None) -> str | None:
    r"""The content of the LAST ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, stripped; None if there is none.

    Nested braces are balanced (``\boxed{\frac{1}{2}}`` -> ``\frac{1}{2}``); a brace-less ``\boxed 5`` gives the
    run of characters after it (``5``, trailing ``.,;:`` dropped). Only the last box counts, as in the MATH
    reference code (``last_boxed_only_string``): when it is unusable (never closed, as in a text cut off inside it,
    or empty) the text has no answer, even when an earlier box was complete.
    """
    if not isinstance(text, str):
        return None
    last = None
    for last in _BOX_COMMAND.finditer(text):
        pass
    if last is None:
        return None
    i = last.end()
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] == "{":
        content = _braced_group(text, i)
    else:
        m = _BARE_ARGUMENT.match(text, i)
        content = m.group(0).rstrip(".,;:") if m else None
    if content is None or not content.strip():
        return None
    return content.strip()


def as_boxed_text(content: str) -> str:
    """What math-verify parses for a ``boxed_last`` answer: the one box alone, so its boxed rule extracts it."""
    return "\\boxed{" + content + "}"


