import json
import random
import re

import pytest

from mel_core.config import DataConfig, SyntheticConfig
from mel_core.problems import sources as D
from mel_core.problems.worlds import arithmetic as A

# ------------------------------------------------------------------------------------ solving


@pytest.mark.parametrize("question, lines", [
    ("12+7*3-5", ["7*3=21", "12+21=33", "33-5=28", "Answer: 28"]),
    ("5-12", ["5-12=-7", "Answer: -7"]),
    ("5-12+3", ["5-12=-7", "-7+3=-4", "Answer: -4"]),
    ("2*3*4+1", ["2*3=6", "6*4=24", "24+1=25", "Answer: 25"]),
    ("2+3*4*5", ["3*4=12", "12*5=60", "2+60=62", "Answer: 62"]),
    ("2*3+4*5", ["2*3=6", "4*5=20", "6+20=26", "Answer: 26"]),
    ("9", ["Answer: 9"]),
])
def test_solution_lines(question, lines):
    assert A.solution_lines(question) == lines
    assert A.evaluate(question) == int(lines[-1].split()[-1]) == eval(question)
    assert A.format_solution(lines) == "\n".join(lines)


def test_bad_question_rejected():
    with pytest.raises(ValueError):
        A.solution_lines("3/4")


def test_every_problem_answer_matches_python():
    for p in A.synthetic_problems(SyntheticConfig(train_size=300, eval_size=50), "train"):
        assert p.answer == str(eval(p.question))
        assert A.solution_lines(p.question)[-1] == f"Answer: {p.answer}"


# ------------------------------------------------------------------------------------- splits


def test_splits_deterministic_disjoint_and_shaped():
    cfg = SyntheticConfig(min_ops=1, max_ops=3, max_number=20, operators="+-*", train_size=500, eval_size=100, seed=7)
    train, again = A.synthetic_problems(cfg, "train"), A.synthetic_problems(cfg, "train")
    held_out = A.synthetic_problems(cfg, "eval")
    assert train == again
    assert len(train) == 500 and len(held_out) == 100
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert len({p.question for p in train}) == 500
    assert [p.problem_id for p in held_out[:2]] == ["synthetic:eval:0", "synthetic:eval:1"]
    for p in train + held_out:
        numbers, ops = A.parse_question(p.question)
        assert 1 <= len(ops) <= 3 and all(1 <= n <= 20 for n in numbers) and p.source == "synthetic"
    # The eval split does not move when the train split grows (a fixed partition of the question space).
    bigger = SyntheticConfig(min_ops=1, max_ops=3, max_number=20, train_size=900, eval_size=100, seed=7)
    assert A.synthetic_problems(bigger, "eval") == held_out
    assert A.synthetic_problems(SyntheticConfig(seed=8, train_size=50, eval_size=10), "eval") != \
        A.synthetic_problems(SyntheticConfig(seed=7, train_size=50, eval_size=10), "eval")


def test_too_small_question_space_is_a_data_error():
    with pytest.raises(D.DataError, match="lower the split size"):
        A.synthetic_problems(SyntheticConfig(min_ops=1, max_ops=1, max_number=2, operators="+", train_size=50), "train")


# ------------------------------------------------------------------------------- error model


QUESTIONS = ["12+7*3-5", "28+15", "23-7", "3-8*2", "4*7-5", "2*3+4*5", "18+17*2", "16-19+17", "25-17*3+9"]


@pytest.mark.parametrize("error_type", sorted(A.ERROR_TYPES))
def test_injected_errors_are_consistent_and_classified(error_type):
    rng = random.Random(0)
    problems = [p.question for p in A.synthetic_problems(SyntheticConfig(train_size=400, eval_size=10), "train")]
    applied = 0
    for q in QUESTIONS + problems:
        injected = A.inject_error(q, error_type, rng)
        if injected is None:
            continue
        applied += 1
        wrong, k = injected
        right = A.solution_lines(q)
        assert wrong[-1].startswith("Answer: ") and wrong[-1] != right[-1]
        assert wrong[:k - 1] == right[:k - 1] and wrong[k - 1] != right[k - 1]
        assert A.first_difference(wrong, right) == k
        assert A.classify_error(wrong[k - 1], right[k - 1]) == error_type
        _assert_consistent(wrong)
    assert applied >= 20, f"{error_type} should recur across problems"


def _assert_consistent(lines):
    """Every step's arithmetic is right given its operands, and the answer is the last result."""
    results = []
    for line in lines[:-1]:
        m = re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", line)
        assert m, line
        results.append(int(m[4]))
    assert lines[-1] == f"Answer: {results[-1]}"


def test_inject_error_examples():
    rng = random.Random(0)
    assert A.inject_error("12+7*3-5", "order", rng) == (["12+7=19", "19*3=57", "57-5=52", "Answer: 52"], 1)
    assert A.inject_error("28+15", "carry", rng) == (["28+15=33", "Answer: 33"], 1)
    assert A.inject_error("23-7", "borrow", rng) == (["23-7=26", "Answer: 26"], 1)
    assert A.inject_error("3-8*2", "sign", rng) == (["8*2=16", "3-16=13", "Answer: 13"], 2)
    # Two steps reuse an earlier result here; the RNG picks which one is miscopied.
    assert A.inject_error("12+7*3-5", "copy", rng) in [(["7*3=21", "12+20=32", "32-5=27", "Answer: 27"], 2),
                                                        (["7*3=21", "12+21=33", "32-5=27", "Answer: 27"], 3)]
    # Not applicable: no * after a + or -, no carry, no earlier result to copy.
    assert A.inject_error("7*3+5", "order", rng) is None
    assert A.inject_error("21+5", "carry", rng) is None
    assert A.inject_error("21+5", "copy", rng) is None
    with pytest.raises(ValueError):
        A.inject_error("1+2", "typo", rng)


def test_world_classifies_a_whole_incorrect_solution_and_writes_the_oracle_analysis():
    world = A.WORLD
    wrong = ["7*3=21", "12+21=23", "23-5=18", "Answer: 18"]
    assert world.classify_error("12+7*3-5", wrong) == "carry"
    assert world.oracle_analysis("12+7*3-5", wrong) == A.analysis_target(wrong, A.solution_lines("12+7*3-5"), "carry")
    assert world.classify_error("12+7*3-5", A.solution_lines("12+7*3-5")) is None  # nothing wrong
    slip = ["7*3=21", "12+21=34", "34-5=29", "Answer: 29"]
    assert world.classify_error("12+7*3-5", slip) is None and world.oracle_analysis("12+7*3-5", slip) is None
    assert world.classify_error("12+7*3-5", ["7*3=21"]) is None  # stopped early
    assert world.taught_solution_lines(SyntheticConfig(), "12+7*3-5", random.Random(0)) == A.solution_lines("12+7*3-5")


def test_classify_error_unrecognised():
    assert A.classify_error("12+21=34", "12+21=33") is None  # off by one: no type of ours
    assert A.classify_error("Answer: 3", "Answer: 4") is None
    assert A.classify_error("7*3=21", "7*3=21") is None


def test_heuristics_are_digit_free_if_then_rules():
    assert len(A.ERROR_TYPES) >= 5
    for text in A.ERROR_TYPES.values():
        assert not re.search(r"\d", text)
        assert re.fullmatch(r"If [^,]+, then .+\.", text)


def test_analysis_target_format():
    target = A.analysis_target(["7*3=21", "12+21=23", "23-5=18", "Answer: 18"], A.solution_lines("12+7*3-5"), "carry")
    assert target == ("Bifurcation: step 2\n"
                      "Critique: 12+21=23 should be 12+21=33.\n"
                      "Heuristic: If an addition passes a ten, then carry one to the tens.")
    first, critique, heuristic = target.splitlines()
    assert re.fullmatch(r"Bifurcation: step \d+", first) and critique.startswith("Critique: ")
    assert not re.search(r"\d", heuristic)


# -------------------------------------------------------------------------------------- JSONL


def _write(tmp_path, rows, name="test.jsonl"):
    path = tmp_path / "bench" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_jsonl_ids_and_answers(tmp_path):
    path = _write(tmp_path, [{"problem": "What is 3*9?", "answer": 27.0},
                             {"problem": "Half of one?", "answer": 0.5},
                             "",
                             {"problem": "Name it", "answer": " \\frac{1}{2} "},
                             {"problem": "Count", "answer": 4}])
    problems = D.load_jsonl(path, "problem", "answer", "", "bench")
    assert [p.answer for p in problems] == ["27", "0.5", "\\frac{1}{2}", "4"]
    assert [p.problem_id for p in problems] == ["bench:1", "bench:2", "bench:4", "bench:5"]
    by_id = D.load_jsonl(_write(tmp_path, [{"id": 7, "q": "x", "a": "1"}], "rows.jsonl"), "q", "a", "id", "s")
    assert by_id[0].problem_id == "s:7"


def test_load_jsonl_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.load_jsonl(tmp_path / "nope.jsonl", "problem", "answer", "", "x")
    bad_json = _write(tmp_path, [{"problem": "a", "answer": 1}, "{not json"])
    with pytest.raises(D.DataError, match=rf"{re.escape(str(bad_json))}:2"):
        D.load_jsonl(bad_json, "problem", "answer", "", "x")
    missing = _write(tmp_path, [{"problem": "a", "answer": 1}, {"problem": "b", "answer": 2}, {"problem": "c"}])
    with pytest.raises(D.DataError, match=r":3: missing field 'answer'"):
        D.load_jsonl(missing, "problem", "answer", "", "x")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(D.DataError, match="empty"):
        D.load_jsonl(empty, "problem", "answer", "", "x")
    assert issubclass(D.DataError, ValueError)


@pytest.mark.parametrize("raw, said", [
    ("NaN", "NaN is not an answer"), ("Infinity", "Infinity is not an answer"), ("-Infinity", "is not an answer"),
    ("true", "true is not an answer"), ("false", "false is not an answer"),
    ('{"x": 1, "y": 2}', '{"x": 1, "y": 2} is not an answer'), ("[1, 2]", "a list of 2 values"), ("[]", "a list of 0"),
    ("[true]", "true is not an answer"), ('""', '"" is empty'), ('"   "', "is empty"), ('"$ $"', "is empty"),
    ('"#### "', "is empty"),
])
def test_a_gold_answer_no_verifier_can_use_is_refused_naming_its_line(tmp_path, raw, said):
    """Python's json reads NaN, Infinity, true, objects and lists; each used to become a string ("nan", "True",
    '{"x": 1, ...}') that every rollout was scored against."""
    path = tmp_path / "gold.jsonl"
    path.write_text('{"problem": "What is 1+1?", "answer": 2}\n' + f'{{"problem": "And this?", "answer": {raw}}}\n')
    with pytest.raises(D.DataError) as e:
        D.load_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: field 'answer': ") and said in str(e.value), str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_gold_answers_the_verifier_reads_still_load(tmp_path):
    path = _write(tmp_path, [{"problem": "a", "answer": ["$\\frac{1}{2}$"]}, {"problem": "b", "answer": -3},
                             {"problem": "c", "answer": "... #### 1,000"}, {"problem": "d", "answer": 0}])
    assert [p.answer for p in D.load_jsonl(path)] == ["\\frac{1}{2}", "-3", "... #### 1,000", "0"]


def test_two_rows_with_one_id_are_refused_naming_both_lines(tmp_path):
    path = _write(tmp_path, [{"id": "a", "problem": "p", "answer": 1}, {"id": "b", "problem": "q", "answer": 2},
                             "", {"id": "a", "problem": "r", "answer": 3}])
    with pytest.raises(D.DataError) as e:
        D.load_jsonl(path, id_field="id", source="bench")
    assert str(e.value) == f"{path}: lines 1 and 4 have the same id 'bench:a'"
    # ids that read as the same id (an integral float and an int) are the same problem too
    same = _write(tmp_path, [{"id": 7, "problem": "p", "answer": 1}, {"id": 7.0, "problem": "q", "answer": 2}], "n.jsonl")
    with pytest.raises(D.DataError, match="lines 1 and 2 have the same id 'n:7'"):
        D.load_jsonl(same, id_field="id")


def test_load_problems_from_config(tmp_path):
    synthetic = D.load_problems(DataConfig(synthetic=SyntheticConfig(train_size=20, eval_size=5)), "eval")
    assert len(synthetic) == 5 and synthetic[0].problem_id == "synthetic:eval:0"
    path = _write(tmp_path, [{"question": "q1", "answer": 3.0}])
    problems = D.load_problems(DataConfig(source=str(path), question_field="question"))
    assert problems == [D.Problem("bench:1", "q1", "3", "bench", {"line": 1})]


def test_shipped_amc23_answers_normalise():
    problems = D.load_problems(DataConfig(source="data/amc23/test.jsonl"))
    assert len(problems) == 40 and problems[0].answer == "27" and problems[0].problem_id.startswith("amc23:")
    assert all(not p.answer.endswith(".0") for p in problems)
