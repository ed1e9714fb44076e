"""Tests for mel_core.algorithm.rewards: synthetic rewards, math-verify in worker processes, MATH-500 and Math-Verify's cases.

The data come from the repository's own ``data/`` folder (copies of the offline data set, see data/SOURCES.md).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from mel_core import config as C
from mel_core.algorithm.rewards import pool as verify_pool
from mel_core.algorithm.rewards.boxed import last_boxed_answer
from mel_core.algorithm.rewards.math_answers import compare, compare_batch, verify_math, verify_math_batch
from mel_core.algorithm.rewards.synthetic import extract_synthetic_answer, extract_synthetic_text, verify_synthetic
from mel_core.algorithm.rewards.verdicts import Verdict, normalize_gold
from mel_core.algorithm.rewards.verifier import Verifier, reward_kind_for_source, verify_batch

DATA = Path(__file__).resolve().parent.parent / "data"

# ----------------------------------------------------------------------------------------------- synthetic


def test_synthetic_correct():
    text = "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14\nAnswer: 14"
    assert verify_synthetic(text, 14) == Verdict(1.0, "14", "correct")
    assert verify_synthetic(text, "14") == Verdict(1.0, "14", "correct")
    assert verify_synthetic(text, 14.0) == Verdict(1.0, "14", "correct")


def test_synthetic_wrong():
    assert verify_synthetic("3 + 4 = 8\nAnswer: 8", 7) == Verdict(0.0, "8", "wrong_answer")


@pytest.mark.parametrize("text", [
    "", None, "3 + 4 = 7", "Answer:", "Answer: seven", "Answer: 7.5", "Answer: 7 8", "answer: 7", "The Answer: 7",
    "Answer: 7\nAnswer: x",  # the LAST Answer line decides, even when it is unusable
])
def test_synthetic_no_answer(text):
    v = verify_synthetic(text, 7)
    assert v == Verdict(0.0, None, "no_answer")
    assert extract_synthetic_answer(text) is None


def test_synthetic_last_answer_line_wins():
    assert extract_synthetic_answer("Answer: 3\nwait, recheck\nAnswer: 5") == "5"
    assert verify_synthetic("Answer: 3\nAnswer: 5", 5).reward == 1.0
    assert verify_synthetic("Answer: 5\nAnswer: 3", 5) == Verdict(0.0, "3", "wrong_answer")


def test_synthetic_negative_and_spacing():
    assert extract_synthetic_answer("Answer: -12") == "-12"
    assert extract_synthetic_answer("  Answer:   -12   \n") == "-12"
    assert extract_synthetic_answer("Answer:-3\r\n") == "-3"
    assert extract_synthetic_answer("Answer: 007") == "7"
    assert extract_synthetic_answer("Answer: -0") == "0"
    assert verify_synthetic("1 - 13 = -12\nAnswer: -12", -12) == Verdict(1.0, "-12", "correct")
    assert verify_synthetic("Answer: 12", -12) == Verdict(0.0, "12", "wrong_answer")
    assert verify_synthetic("Answer: -12", "-12") == Verdict(1.0, "-12", "correct")


def test_synthetic_bad_gold_is_an_error_verdict_not_an_exception():
    assert verify_synthetic("Answer: 3", None).reason == "error: TypeError"
    v = verify_synthetic("Answer: 3", "  ")
    assert v.reward == 0.0 and v.reason.startswith("error: ") and v.extracted == "3"


def test_synthetic_answers_that_are_not_integers_match_exactly():
    # The rules world answers with digit words: the last Answer line's stripped content must equal the gold.
    text = "1 inc five jump seven\n2 neg seven mirror two\nAnswer: two"
    assert verify_synthetic(text, "two") == Verdict(1.0, "two", "correct")
    assert verify_synthetic(text, " two ") == Verdict(1.0, "two", "correct")
    assert verify_synthetic("Answer:   two  \n", "two") == Verdict(1.0, "two", "correct")
    assert verify_synthetic(text, "seven") == Verdict(0.0, "two", "wrong_answer")
    assert verify_synthetic("Answer: Two", "two") == Verdict(0.0, "Two", "wrong_answer")  # case counts
    assert verify_synthetic("Answer: two.", "two") == Verdict(0.0, "two.", "wrong_answer")
    assert verify_synthetic("Answer: 3", "three") == Verdict(0.0, "3", "wrong_answer")
    assert verify_synthetic("Answer: two\nAnswer: six", "two") == Verdict(0.0, "six", "wrong_answer")  # last wins
    for no_answer in ["", None, "1 inc five jump seven", "Answer:", "Answer:   \n", "answer: two"]:
        assert verify_synthetic(no_answer, "two") == Verdict(0.0, None, "no_answer")
    assert extract_synthetic_text("Answer: two\nAnswer:  six ") == "six"
    # Integer golds stay integer matches in canonical form: a word is no answer to them.
    assert verify_synthetic("Answer: 007", "7") == Verdict(1.0, "7", "correct")
    assert verify_synthetic("Answer: seven", 7) == Verdict(0.0, None, "no_answer")
    assert verify_synthetic("Answer: 7.0", "7.0") == Verdict(0.0, None, "no_answer")  # 7.0 is the integer 7
    assert verify_synthetic("Answer: 7.5", "7.5") == Verdict(1.0, "7.5", "correct")  # not an integer: exact


def test_verify_batch_synthetic_runs_inline():
    verify_pool.shutdown_pool()
    vs = verify_batch("synthetic", ["Answer: 1", "Answer: 2", "nothing"], [1, "3", 0], timeout_s=1)
    assert [v.reason for v in vs] == ["correct", "wrong_answer", "no_answer"]
    assert verify_pool._POOL is None  # no worker pool involved


def test_verify_batch_validates_arguments():
    with pytest.raises(ValueError):
        verify_batch("code", ["x"], ["1"])
    with pytest.raises(ValueError):
        verify_batch("synthetic", ["x", "y"], ["1"])
    with pytest.raises(ValueError):
        verify_batch("math", ["x"], ["1"], timeout_s=0)
    with pytest.raises(ValueError, match="extraction"):
        verify_batch("math", ["x"], ["1"], extraction="first_box")
    with pytest.raises(ValueError, match="truncated_reward"):
        verify_batch("math", ["x"], ["1"], truncated_reward="half")
    with pytest.raises(ValueError, match="finish_reasons"):
        verify_batch("synthetic", ["x", "y"], ["1", "2"], finish_reasons=["stop"])
    assert verify_batch("math", [], []) == []


def test_reward_kind_for_source():
    assert reward_kind_for_source("synthetic") == "synthetic"
    assert reward_kind_for_source(" Synthetic ") == "synthetic"
    assert reward_kind_for_source("data/math500/test.jsonl") == "math"
    assert reward_kind_for_source("data/gsm8k/test.jsonl") == "math"


# ----------------------------------------------------------------------------------------------- gold answers


def test_normalize_gold_scalars():
    assert normalize_gold(27) == "27"
    assert normalize_gold(-3) == "-3"
    assert normalize_gold(27.0) == "27"
    assert normalize_gold(0.5) == "0.5"
    assert normalize_gold("  \\frac{1}{2} ") == "\\frac{1}{2}"
    assert normalize_gold("(1,2)") == "(1,2)"  # commas survive outside GSM8K rationales
    for bad in (None, True, float("nan"), float("inf"), [1]):
        with pytest.raises((TypeError, ValueError)):
            normalize_gold(bad)


def test_normalize_gold_gsm8k():
    assert normalize_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert normalize_gold("... #### 1,000") == "1000"
    assert normalize_gold("#### -1,234,567") == "-1234567"
    assert normalize_gold("a #### 1 b #### 42 ") == "42"


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_normalize_gold_on_shipped_datasets():
    gsm = [normalize_gold(r["answer"]) for r in _jsonl(DATA / "gsm8k" / "test.jsonl")]
    assert len(gsm) == 1319 and all(re.fullmatch(r"-?\d+", g) for g in gsm)
    assert any("," in r["answer"].rsplit("####", 1)[1] for r in _jsonl(DATA / "gsm8k" / "test.jsonl"))
    amc = [normalize_gold(r["answer"]) for r in _jsonl(DATA / "amc23" / "test.jsonl")]
    assert amc[0] == "27" and all("." not in a for a in amc if float(a).is_integer())
    assert [normalize_gold(r["answer"]) for r in _jsonl(DATA / "aime25" / "test.jsonl")][:1] == [
        str(_jsonl(DATA / "aime25" / "test.jsonl")[0]["answer"])]
    assert all(re.fullmatch(r"\d+", normalize_gold(r["answer"])) for r in _jsonl(DATA / "aime24" / "test.jsonl"))


def test_shipped_data_matches_sources_md():
    table = re.findall(r"\| (\w+) \| `([^`]+)` \| ([\d,]+) \| [\d,]+ \| `([0-9a-f]{64})` \|",
                       (DATA / "SOURCES.md").read_text(encoding="utf-8"))
    assert len(table) == 7
    for _name, rel, rows, sha in table:
        raw = (DATA / rel).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == sha, rel
        assert raw.count(b"\n") == int(rows.replace(",", "")), rel
    lic = (DATA / "LICENSE-Apache-2.0.txt").read_text(encoding="utf-8")
    assert "Apache License" in lic and "Version 2.0, January 2004" in lic and "END OF TERMS AND CONDITIONS" in lic


# ----------------------------------------------------------------------------------------------- math

# (model text, gold, expected reason under the default extraction, boxed_last)
MATH_CASES = [
    (r"We need $4x = 3$, so $x = \frac{3}{4}$. Therefore the answer is $\boxed{\frac{3}{4}}$.", r"\frac34", "correct"),
    (r"Dividing, $3 \div 4 = 0.75$. The answer is $\boxed{0.75}$.", r"\frac{3}{4}", "correct"),
    (r"Simplify: $\sqrt{12} = \sqrt{4\cdot 3} = 2\sqrt{3}$, so $\boxed{2\sqrt{3}}$.", r"\sqrt{12}", "correct"),
    (r"Thus $\boxed{\frac{\sqrt{2}}{2}}$", r"\frac{1}{\sqrt{2}}", "correct"),
    (r"The side is $\boxed{\sqrt{3}}$.", r"2\sqrt{3}", "wrong_answer"),
    (r"Adding up, $2+3 = 5$. The answer is $\boxed{5}$.", "6", "wrong_answer"),
    (r"The intersection point is $\boxed{(1, 2)}$.", "(1,2)", "correct"),
    (r"Expanding gives $\boxed{x^2+2x+1}$.", "(x+1)^2", "correct"),
    ("Janet has 16 - 3 - 4 = 9 eggs, sold at $2 each: 9 * 2 = 18.\nThe final answer is 18.", "18", "no_answer"),
    (r"The angle is $\boxed{\pi/2}$ radians.", r"\frac{\pi}{2}", "correct"),
    (r"So $y = \boxed{-\frac{1}{2}}$.", "-0.5", "correct"),
    (r"Hence the probability is $\boxed{\dfrac{5}{9}}$.", r"\frac59", "correct"),
    (r"Hence the probability is $\boxed{\frac{5}{8}}$.", r"\frac59", "wrong_answer"),
    (r"The correct option is $\boxed{\text{(B)}}$.", r"\text{(B)}", "correct"),
    (r"The interval is $\boxed{(2, 5]}$.", "[2,5)", "wrong_answer"),
    (r"The sum is $\boxed{1{,}000}$.", "1000", "correct"),
    (r"First I thought $\boxed{4}$ but rechecking, the answer is $\boxed{5}$.", "5", "correct"),
    (r"So $x = \boxed{\frac{1}{2}}$.", "0.5", "correct"),
    (r"The set is $\boxed{\{1, 2\}}$.", r"\{1,2\}", "correct"),
    ("Since 40+2=42 and then", "42", "no_answer"),  # cut off: no box, no answer
    (r"Either $\boxed{4}$ and $\boxed{5}$", "5", "correct"),  # the last box counts
    (r"Either $\boxed{4}$ and $\boxed{5}$", "4", "wrong_answer"),
    (r"I am not sure how to solve this problem.", "3", "no_answer"),
    ("", "3", "no_answer"),
]


def _math_inputs():
    return [c[0] for c in MATH_CASES], [c[1] for c in MATH_CASES]


@pytest.fixture(scope="module")
def main_thread_verdicts():
    texts, golds = _math_inputs()
    return verify_math_batch(texts, golds, timeout_s=20)


def test_math_realistic_outputs(main_thread_verdicts):
    got = [(v.reason, v.reward) for v in main_thread_verdicts]
    want = [(reason, 1.0 if reason == "correct" else 0.0) for *_, reason in MATH_CASES]
    assert got == want
    assert main_thread_verdicts[0].extracted == r"\frac{3}{4}"
    assert main_thread_verdicts[5].extracted == "5"
    assert main_thread_verdicts[-1].extracted is None


@pytest.mark.parametrize("text, content", [
    (r"so $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),  # nested braces
    (r"$\boxed{\{1,2\}}$", r"\{1,2\}"),  # escaped braces do not nest
    (r"$\boxed{\left\{ x \right\}}$", r"\left\{ x \right\}"),
    (r"$\boxed{4}$, no: $\boxed{5}$", "5"),  # the last box
    (r"\fbox{7}", "7"),
    (r"\boxed {  7 } ", "7"),
    (r"the answer is $\boxed 5$.", "5"),  # brace-less argument
    (r"the answer is \boxed 12.", "12"),
    ("$\\boxed{\\frac{1}\n{2}}$", "\\frac{1}\n{2}"),
    (r"$\boxed{\boxed{3}}$", "3"),
])
def test_last_boxed_answer(text, content):
    assert last_boxed_answer(text) == content


@pytest.mark.parametrize("text", [
    None, "", "The answer is 5.", r"\boxed{}", r"\boxed{ }", r"\boxed", r"\boxedanswer{5}",
    r"$\boxed{4}$, no wait, $\boxed{\frac{5}{",  # cut off inside the last box: the earlier box does not count
])
def test_last_boxed_answer_none(text):
    assert last_boxed_answer(text) is None


def _math_verify_in_process(text: str, gold: str) -> tuple[float, str | None, str]:
    """What math-verify itself says in this (main) thread, with its default extraction: the reference for
    extraction=math_verify."""
    from math_verify import parse, verify

    g = parse("$" + gold + "$", parsing_timeout=None)
    p = parse(text, parsing_timeout=None)
    if not p:
        return 0.0, None, "no_answer"
    extracted = p[-1] if isinstance(p[-1], str) else str(p[0])
    ok = verify(g, p, timeout_seconds=None)
    return (1.0, extracted, "correct") if ok else (0.0, extracted, "wrong_answer")


def test_math_verify_extraction_mirrors_math_verify():
    texts, golds = _math_inputs()
    got = verify_math_batch(texts, golds, timeout_s=20, extraction="math_verify")
    want = [Verdict(*_math_verify_in_process(t, g)) for t, g in zip(texts, golds)]
    assert got == want
    # where the two extractions differ, by design
    by_text = {(t, g): v.reason for t, g, v in zip(texts, golds, got)}
    assert by_text[("Since 40+2=42 and then", "42")] == "correct"  # math-verify falls back to the last number
    assert by_text[(MATH_CASES[8][0], "18")] == "correct"  # "The final answer is 18." without a box
    assert by_text[(r"Either $\boxed{4}$ and $\boxed{5}$", "5")] == "wrong_answer"  # two boxes: the set {4, 5}
    assert by_text[(r"Either $\boxed{4}$ and $\boxed{5}$", "4")] == "wrong_answer"


def test_truncated_rollouts():
    boxed = r"so the answer is $\boxed{5}$"
    texts, golds, reasons = [boxed, boxed, "Answer: 5", boxed], ["5", "5", "5", "5"], ["length", "stop", "length", None]
    zero = Verifier("math", truncated_reward="zero", timeout_s=20)
    assert [v.reason for v in zero.verify(texts, golds, reasons)] == ["truncated", "correct", "truncated", "correct"]
    assert zero.verify(texts[:1], golds[:1], ["length"]) == [Verdict(0.0, None, "truncated")]
    assert [v.reason for v in zero.verify(texts, golds)] == ["correct", "correct", "no_answer", "correct"]  # None: all finished
    keep = Verifier("math", truncated_reward="verify", timeout_s=20)
    assert [v.reason for v in keep.verify(texts, golds, reasons)] == ["correct", "correct", "no_answer", "correct"]
    syn = Verifier("synthetic", truncated_reward="zero")
    assert [v.reason for v in syn.verify(["Answer: 5", "Answer: 5"], [5, 5], ["length", "stop"])] == ["truncated", "correct"]
    assert [v.reward for v in Verifier("synthetic", truncated_reward="verify").verify(
        ["Answer: 5"], [5], ["length"])] == [1.0]


def test_verifier_from_config_and_identity():
    from importlib.metadata import version

    cfg = C.load("configs/tiny.yaml", ["data.source=data/math500/test.jsonl"])
    v = Verifier.from_config(cfg.verify, "math")
    assert (v.kind, v.extraction, v.truncated_reward, v.timeout_s) == ("math", "boxed_last", "zero", 5.0)
    ident = v.identity
    assert ident["kind"] == "math" and ident["extraction"] == "boxed_last" and ident["truncated_reward"] == "zero"
    assert ident["timeout_s"] == 5.0 and ident["packages"]["math-verify"] == version("math-verify") == "0.9.0"
    assert json.loads(json.dumps(ident)) == ident
    assert re.fullmatch(r"[0-9a-f]{16}", v.identity_hash)
    # stable: a new object with the same settings (and a fresh process) gives the same hash
    assert Verifier("math", "boxed_last", "zero", 5).identity_hash == v.identity_hash
    import subprocess
    import sys
    code = "from mel_core.algorithm.rewards import Verifier; print(Verifier('math').identity_hash)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == v.identity_hash
    # every setting changes it
    others = [Verifier("synthetic"), Verifier("math", extraction="math_verify"),
              Verifier("math", truncated_reward="verify"), Verifier("math", timeout_s=10)]
    assert len({v.identity_hash} | {o.identity_hash for o in others}) == 5
    # the synthetic task ignores what it does not use
    syn = Verifier("synthetic")
    assert syn.identity["packages"] == {} and syn.identity["timeout_s"] is None
    assert Verifier("synthetic", extraction="math_verify", timeout_s=9).identity_hash == syn.identity_hash
    assert Verifier("synthetic", truncated_reward="verify").identity_hash != syn.identity_hash


@pytest.mark.parametrize("override, key", [
    ("verify.extraction=first_box", "verify.extraction"),
    ("verify.truncated_reward=half", "verify.truncated_reward"),
    ("verify.timeout_s=0", "verify.timeout_s"),
])
def test_config_rejects_unknown_verify_settings(override, key):
    with pytest.raises(C.ConfigError, match=re.escape(f"'{key}'")):
        C.load("configs/tiny.yaml", [override])


def test_verify_math_single_and_gold_types():
    assert verify_math(r"The answer is $\boxed{27}$.", 27.0, timeout_s=20) == Verdict(1.0, "27", "correct")
    assert verify_math(r"... so $\boxed{18}$", "She makes $18.\n#### 18", timeout_s=20).reward == 1.0
    assert verify_math("... so #### 18", "#### 18", timeout_s=20, extraction="math_verify").reward == 1.0
    assert verify_batch("math", [r"$\boxed{2}$"], ["2"], 20)[0].reason == "correct"
    v = verify_math(r"$\boxed{2}$", None, timeout_s=20)
    assert v.reward == 0.0 and v.reason == "error: TypeError"
    v = verify_math(None, "2", timeout_s=20)
    assert v == Verdict(0.0, None, "no_answer")


def test_math_verify_itself_refuses_threads():
    """The premise: math-verify's own timeouts (signal.alarm) raise outside the main thread."""
    from math_verify import parse

    errors = []

    def body():
        try:
            parse(r"$\boxed{1}$")
        except ValueError as e:
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert errors and "thread" in str(errors[0])


def test_math_from_a_thread(main_thread_verdicts):
    texts, golds = _math_inputs()
    out: list = []
    t = threading.Thread(target=lambda: out.append(verify_math_batch(texts, golds, timeout_s=20)))
    t.start()
    t.join(120)
    assert out and out[0] == main_thread_verdicts


def test_math_from_a_thread_pool(main_thread_verdicts):
    texts, golds = _math_inputs()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        # four concurrent batches (they take turns on the pool) and single items interleaved
        batches = [ex.submit(verify_math_batch, texts, golds, 20) for _ in range(4)]
        singles = [ex.submit(verify_math, t, g, 20) for t, g in zip(texts, golds)]
        assert all(f.result(timeout=120) == main_thread_verdicts for f in batches)
        assert [f.result(timeout=120) for f in singles] == main_thread_verdicts
        assert ex.submit(verify_batch, "math", texts, golds, 20).result(timeout=120) == main_thread_verdicts


def test_timeout_via_test_hook_then_next_items_still_verify():
    pool = verify_pool.shared_pool()
    killed = pool.stats["killed_timeout"]
    texts = [r"$\boxed{1}$", r"$\boxed{2}$", r"$\boxed{3}$"]
    t0 = time.monotonic()
    vs = verify_math_batch(texts, ["1", "2", "4"], timeout_s=1.0, _test_delay_s=[0, 30, 0])
    assert time.monotonic() - t0 < 15
    assert vs == [Verdict(1.0, "1", "correct"), Verdict(0.0, None, "timeout"), Verdict(0.0, "3", "wrong_answer")]
    assert pool.stats["killed_timeout"] == killed + 1
    assert verify_math(r"$\boxed{\frac{1}{2}}$", "0.5", timeout_s=20) == Verdict(1.0, r"\frac{1}{2}", "correct")


def test_timeout_on_a_pathological_answer_from_a_thread():
    """A real hang: sympy expanding (x+1)^100000 against an integer gold takes minutes."""
    texts = [r"So the answer is $\boxed{(x+1)^{100000}}$.", r"$\boxed{7}$"]

    def run():
        return verify_math_batch(texts, ["5", "7"], timeout_s=1.5)

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        vs = ex.submit(run).result(timeout=60)
    assert vs == [Verdict(0.0, None, "timeout"), Verdict(1.0, "7", "correct")]
    assert verify_math(r"$\boxed{7}$", "7", timeout_s=20).reason == "correct"


def test_worker_killed_while_idle_is_replaced():
    verify_math(r"$\boxed{1}$", "1", timeout_s=20)
    pids = verify_pool.shared_pool().worker_pids()
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    # at once (pebble has not noticed yet and takes the batch) and again once it has (it declared the pool broken)
    assert verify_math(r"$\boxed{3}$", "3", timeout_s=20) == Verdict(1.0, "3", "correct")
    for pid in verify_pool.shared_pool().worker_pids():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert verify_math_batch([r"$\boxed{1}$", r"$\boxed{2}$"], ["1", "2"], 20) == [
        Verdict(1.0, "1", "correct"), Verdict(1.0, "2", "correct")]
    assert not set(pids) & set(verify_pool.shared_pool().worker_pids())


def test_worker_crash_mid_item_costs_that_item_only():
    pool = verify_pool.shared_pool()
    crashed = pool.stats["crashed"]
    out = pool.run([("math", (r"\boxed{1}", "1")), ("_test_crash", ()), ("math", (r"\boxed{2}", "3"))], 20)
    assert out == [("ok", (1.0, "1", "correct")), ("err", "error: WorkerCrashed"), ("ok", (0.0, "2", "wrong_answer"))]
    assert pool.stats["crashed"] == crashed + 1
    assert verify_math(r"$\boxed{7}$", "7", timeout_s=20).reason == "correct"


def test_memory_cap_fails_the_item_not_the_machine():
    """Workers run under RLIMIT_AS (MEL_VERIFY_MEMORY_MB, default 4096): a larger allocation is a MemoryError."""
    out = verify_pool.shared_pool().run([("_test_alloc", (8 << 30,)), ("_test_alloc", (1 << 20,))], 20)
    assert out == [("err", "error: MemoryError"), ("ok", 1 << 20)]


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_workers_are_spawned_not_forked():
    """No fork of this (threaded) process: each worker is a fresh interpreter running multiprocessing's spawn_main."""
    verify_math(r"$\boxed{1}$", "1", timeout_s=20)
    pids = verify_pool.shared_pool().worker_pids()
    assert pids
    for pid in pids:
        assert b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_shutdown_and_restart():
    verify_pool.shutdown_pool()
    assert verify_pool._POOL is None
    assert verify_math(r"$\boxed{3}$", "3", timeout_s=20).reward == 1.0


# ----------------------------------------------------------------------------------------------- reference data


def test_math500_reference_solutions_all_verify():
    """MATH-500's human solutions, scored as model outputs, all verify under the default extraction."""
    rows = _jsonl(DATA / "math500" / "test.jsonl")
    assert len(rows) == 500
    verify_math(r"$\boxed{1}$", "1", timeout_s=20)  # warm the pool so the timing is the verification itself
    t0 = time.perf_counter()
    vs = Verifier("math", timeout_s=20).verify([r["solution"] for r in rows], [r["answer"] for r in rows],
                                              ["stop"] * len(rows))
    elapsed = time.perf_counter() - t0
    print(f"\nMATH-500: 500 reference solutions verified in {elapsed:.2f} s "
          f"with {verify_pool.shared_pool().max_workers} worker(s)")
    bad = [(r["unique_id"], v) for r, v in zip(rows, vs) if v.reason != "correct"]
    assert not bad, bad[:5]


def test_math500_shuffled_golds_pass_only_where_identical():
    """Each human solution against another problem's gold answer (a fixed permutation) passes exactly where that
    answer is identical to its own: the same string once surrounding whitespace is stripped. (Other permutations
    can pair answers that differ as strings yet are equal to math-verify after its unit/currency stripping, e.g.
    ``\\$36`` and ``36^\\circ``; this one has none.)"""
    rows = _jsonl(DATA / "math500" / "test.jsonl")
    perm = list(range(len(rows)))
    random.Random(0).shuffle(perm)
    golds = [rows[j]["answer"] for j in perm]
    vs = Verifier("math", timeout_s=20).verify([r["solution"] for r in rows], golds)
    passed = [i for i, v in enumerate(vs) if v.reward == 1.0]
    identical = [i for i, r in enumerate(rows) if r["answer"].strip() == golds[i].strip()]
    assert passed == identical and len(identical) == 8  # 8 of 500 problems share their answer with their pair
    assert all(v.reason in ("correct", "wrong_answer") for v in vs)


def test_math_verify_cases_reproduced():
    cases = _jsonl(DATA / "math_verify_tests" / "cases.jsonl")
    assert len(cases) == 269
    inputs = []
    for c in cases:
        if c["call"] == "compare_strings":
            inputs.append({"gold": c["gold"], "pred": c["pred"], "match_types": c["match_types"],
                           "float_rounding": c["precision"], "strict": c["strict"],
                           "allow_set_relation_comp": c["allow_set_relation_comp"]})
        else:
            assert c["call"] == "verify(parse(gold), parse(pred))"
            inputs.append({"gold": c["gold"], "pred": c["pred"], "match_types": None})
    got = compare_batch(inputs, timeout_s=20)
    wrong = [(c["test_name"], c["case_index"], c["expected"]) for c, g in zip(cases, got) if int(g) != c["expected"]]
    assert not wrong, wrong
    assert sum(got) == 231


def test_compare_single():
    assert compare("$1/3$", r"$\frac13 $", match_types=["latex"]) is True
    assert compare("2", "AZYUK2A", match_types=["expr"]) is False
    assert compare("$28\\%$", "28", match_types=["latex", "expr"]) is True
    assert compare("$n=1, 2, 3$", "$n=1, 2, 3$", match_types=None) is True


def test_module_import_is_light():
    """mel_core.algorithm.rewards imports only the standard library (pebble loads on first use, math_verify/sympy in the
    workers; no prefect)."""
    import subprocess
    import sys

    code = ("import sys, mel_core.algorithm.rewards; bad = [m for m in ('prefect', 'math_verify', 'sympy', 'torch', 'pebble') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
