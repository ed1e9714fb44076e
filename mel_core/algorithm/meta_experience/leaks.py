"""Whether a rule leaks its problem: the gold answer stated as a result, or a non-structural number of the question."""

from __future__ import annotations

import re
from fractions import Fraction

# ------------------------------------------------------------------------------------------- leaks

STRUCTURAL_NUMBERS = frozenset({str(i) for i in range(11)} | {"100"})
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


def numbers_in(text: str) -> set[str]:
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
    """The rule states `value` in an answer context (docs/PARSER.md, "Leak rule")."""
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
        structural = value.denominator == 1 and str(value.numerator) in STRUCTURAL_NUMBERS
        return _states_number(rule, value, structural)
    forms = {g.lstrip("+"), g.lstrip("+-")}
    plain_rule = _plain(rule, squeeze=False)
    return any(_contains(plain_rule, f) for f in forms
               if len(f) >= 2 and not (f.isalpha() and len(f) < 3))  # "B", "x", "no": too short to tell


def rule_problem(rule: str, gold: str, problem_numbers: set[str]) -> str | None:
    if gold and _leaks_answer(rule, gold):
        return "heuristic_leaks_answer"
    if numbers_in(rule) & problem_numbers:
        return "heuristic_has_problem_numbers"
    return None


