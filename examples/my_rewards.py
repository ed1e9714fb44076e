"""Two reward plug-ins, as README "Reward plug-ins" uses them: ``verify.reward=examples.my_rewards:answer_line``.

A plug-in is ``function(completion, problem) -> float in [0, 1] | bool``; ``problem`` is a dict with ``problem_id``,
``question``, ``answer`` (the gold) and ``row`` (the data row as the file holds it, nested fields included). It runs
in mel's verification worker processes, each call with its own deadline (verify.timeout_s); an exception scores 0
with reason ``error: <type>``, a value that is not a reward 0 with reason ``rejected: ...``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile

ANSWER_LINE = re.compile(r"^Answer:\s*(.+?)\s*$", re.MULTILINE)
CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


def answer_line(completion: str, problem: dict) -> bool:
    """Exact match of the completion's last ``Answer:`` line with a field of the data row: ``expected`` when the
    row has it (a JSON field of your own), else the gold answer mel read (data.answer_field)."""
    found = ANSWER_LINE.findall(completion)
    expected = problem["row"].get("expected", problem["answer"])
    return bool(found) and found[-1] == str(expected)


def unit_tests(completion: str, problem: dict) -> float:
    """The fraction of the row's ``tests`` (Python assert statements) that the completion's last code block passes,
    each run in a fresh interpreter with a 2-second limit (the worker's own deadline bounds the whole call)."""
    blocks = CODE_BLOCK.findall(completion)
    tests = problem["row"].get("tests") or []
    if not blocks or not tests:
        return 0.0
    passed = 0
    for test in tests:
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=True) as f:
            f.write(blocks[-1] + "\n" + test + "\n")
            f.flush()
            try:
                passed += subprocess.run([sys.executable, f.name], capture_output=True, timeout=2,
                                         check=False).returncode == 0
            except subprocess.TimeoutExpired:
                pass
    return passed / len(tests)
