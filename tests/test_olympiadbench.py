"""OlympiadBench (data/olympiadbench/test.jsonl): its answers as the loader normalises them, and a reference check
like MATH-500's: every row's boxed answer verifies against its own gold, and not against a different one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mel_core import config as C
from mel_core.algorithm.rewards.math_answers import verify_math_batch
from mel_core.problems import sources as D
from mel_core.problems.problem import DataError
from mel_core.study import evaluation as ev

FILE = Path(__file__).resolve().parent.parent / "data" / "olympiadbench" / "test.jsonl"


@pytest.fixture(scope="module")
def shipped():
    """(raw row, loaded problem) pairs of the shipped file, read the way `mel eval` reads it."""
    rows = [json.loads(line) for line in FILE.read_text(encoding="utf-8").splitlines()]
    problems = ev.load_dataset(C.load("configs/tiny.yaml"), str(FILE)).problems
    assert len(rows) == len(problems) == 675
    return list(zip(rows, problems))


def _by_id(shipped, row_id: int) -> D.Problem:
    return next(p for r, p in shipped if r["id"] == row_id)


@pytest.mark.parametrize("raw, normalised", [
    ("$69$,$84$", "69,84"),                                         # several answers, one $...$ each
    ("$221,$8$", "221,8"),                                          # a stray $ inside (id 2349)
    ("$(-\\infty, 0) \\cup\\{1\\}$.", "(-\\infty, 0) \\cup\\{1\\}"),  # a full stop after the math (id 1970)
    (" $\\frac{1}{2}$ ", "\\frac{1}{2}"),
    ("$$x^2$$", "x^2"),
    ("1,3,5", "1,3,5"),                                             # bare answers are left alone
    ("\\$18.90", "\\$18.90"),                                       # an escaped $ is a dollar sign (MATH-500)
    ("She pays $2 each.\n#### 18", "She pays $2 each.\n#### 18"),   # GSM8K: a currency $ mid-text stays
])
def test_strip_math_mode(raw, normalised):
    assert D.strip_math_mode(raw) == normalised


def test_a_one_element_list_answer_is_that_answer(tmp_path):
    path = tmp_path / "olympiad" / "test.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Both roots?", "final_answer": ["$69$,$84$"], "is_multiple_answer": True},
        {"question": "Half?", "final_answer": ["\\frac{1}{2}"], "is_multiple_answer": False},
    ]) + "\n")
    # no data.* settings: the loader finds 'question' and 'final_answer' itself
    ds = ev.load_dataset(C.load("configs/tiny.yaml"), str(path))
    assert ds.name == "olympiad" and [p.question for p in ds.problems] == ["Both roots?", "Half?"]
    assert [p.answer for p in ds.problems] == ["69,84", "\\frac{1}{2}"]  # one-element lists unwrap
    # a list of several values is no answer the verifier could check: refused with its line, not turned into JSON text
    with path.open("a") as f:
        f.write(json.dumps({"question": "Odd list", "final_answer": ["1", "2"], "is_multiple_answer": True}) + "\n")
    with pytest.raises(DataError, match=r":3: field 'final_answer': a list of 2 values"):
        ev.load_dataset(C.load("configs/tiny.yaml"), str(path))


def test_shipped_quirky_rows_normalise(shipped):
    assert _by_id(shipped, 1606).answer == "2"                       # bare
    assert _by_id(shipped, 1664).answer == "69,84"                   # $69$,$84$
    assert _by_id(shipped, 2349).answer == "221,8"                   # stray $
    assert _by_id(shipped, 1970).answer == "(-\\infty, 0) \\cup\\{1\\}"
    assert _by_id(shipped, 2287).answer == "a=2, a=-6-4 \\sqrt{2}"
    assert not any("$" in p.answer for _, p in shipped)
    assert [p.problem_id for _, p in shipped[:2]] == ["olympiadbench:1", "olympiadbench:2"]
    assert all(p.question == r["question"] for r, p in shipped)


def test_multiple_answers_match_as_sets(shipped):
    """A model's \\boxed{a, b} against the shipped multiple-answer golds: any order, nothing missing or extra."""
    cases = [  # (row id, model text, expected reason)
        (1664, r"So $\boxed{69, 84}$.", "correct"), (1664, r"So $\boxed{84, 69}$.", "correct"),
        (1664, r"So $\boxed{69 \text{ and } 84}$.", "correct"), (1664, r"So $\boxed{69}$.", "wrong_answer"),
        (1664, r"So $\boxed{69, 84, 1}$.", "wrong_answer"),
        (2349, r"$m=221$, $n=8$: $\boxed{221, 8}$", "correct"), (2349, r"$\boxed{221}$", "wrong_answer"),
        (2287, r"$\boxed{a=-6-4\sqrt{2},\ a=2}$", "correct"),
        (1938, r"$\boxed{f(x)=x+1, f(x)=-1}$", "correct"), (1938, r"$\boxed{f(x)=x+1}$", "wrong_answer"),
        (1618, r"$\boxed{(4,5,7), (1,8,19), (2,7,13)}$", "correct"), (1618, r"$\boxed{(1,8,19)}$", "wrong_answer"),
    ]
    verdicts = verify_math_batch([t for _, t, _ in cases], [_by_id(shipped, i).answer for i, _, _ in cases],
                                 timeout_s=20)
    assert [v.reason for v in verdicts] == [r for *_, r in cases]


def test_olympiadbench_reference_answers_all_verify(shipped):
    golds = [p.answer for _, p in shipped]
    boxed = [f"The answer is $\\boxed{{{g}}}$." for g in golds]
    own = verify_math_batch(boxed, golds, timeout_s=20)
    bad = [(r["id"], p.answer, v.reason) for (r, p), v in zip(shipped, own) if v.reason != "correct"]
    assert not bad, bad
    # The check can fail: each boxed answer against the NEXT row's gold is right only where both golds are equal.
    shifted = verify_math_batch(boxed[1:] + boxed[:1], golds, timeout_s=20)
    accepted = [(golds[i], golds[(i + 1) % len(golds)]) for i, v in enumerate(shifted) if v.reward]
    assert len(accepted) == 4 and all(g == h for g, h in accepted), accepted
