"""Reward plug-ins: ``verify.reward: module:function``, a Python callable ``function(completion, problem)`` that
returns a reward in [0, 1] or a bool, run in the verification worker pool with the per-item deadline.

``problem`` is a dict: ``problem_id``, ``question``, ``answer`` (the gold, as the store holds it) and ``row`` (the
data row the problem was read from, nested fields included; {} for the embedded worlds). docs/REWARDS.md has
examples. The parent resolves the module (on the Python path, else under the working directory, as ``python -m``
would) and hashes its source file: the hash is part of the verifier's identity, so an edited plug-in is another
verifier (a new reward version under ``mel rescore``). Workers import the module from the directory it was found
under (a spawned worker does not inherit the parent's changes to ``sys.path``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import math
import numbers
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mel_core.algorithm.rewards.verdicts import CORRECT, WRONG
from mel_core.config import ConfigError

PARTIAL = "partial"  # a plug-in's reward strictly between 0 and 1
REJECTED = "rejected"  # the prefix of the reason of a value that is not a reward

_SPEC = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<function>[A-Za-z_]\w*)$")


def is_plugin_spec(value: str) -> bool:
    """Whether ``value`` reads as ``module:function`` (``my_rewards:exact``, ``pkg.sub:check``)."""
    return bool(_SPEC.match(value.strip()))


@dataclass(frozen=True)
class Plugin:
    """A resolved plug-in: where its module is and what its source is (the identity's part)."""
    spec: str  # module:function as configured
    module: str
    function: str
    search_dir: str  # the sys.path entry the module is found under
    source_sha256: str  # of the module's source file


def _find(module: str) -> tuple[Any, str]:
    """The module's import spec and the sys.path entry it is found under, searching the Python path, then the working
    directory (as ``python -m`` has it; the ``mel`` entry point does not). Files only, and never what this process has
    imported already under that name (importlib's ``find_spec`` would answer with that)."""
    parts = module.split(".")
    entries = [os.path.abspath(e or os.getcwd()) for e in sys.path] + [os.getcwd()]
    spec = importlib.machinery.PathFinder.find_spec(parts[0], entries)
    entry = None
    if spec is not None and (spec.submodule_search_locations or spec.origin):  # a package (namespace too), a file
        top = next(iter(spec.submodule_search_locations)) if spec.submodule_search_locations else spec.origin
        entry = os.path.dirname(top)
    for part in parts[1:]:
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        spec = importlib.machinery.PathFinder.find_spec(part, locations) if locations else None
    if spec is None or entry is None or not spec.origin or not os.path.isfile(spec.origin):
        raise ConfigError(f"verify.reward: no module {module!r} on the Python path or under {os.getcwd()}")
    return spec, entry


class _on_path:
    """``sys.path`` with one entry in front for the duration (removed after, when it was not there before)."""

    def __init__(self, entry: str | None):
        self.entry, self.added = entry, False

    def __enter__(self):
        if self.entry is not None and self.entry not in sys.path:
            sys.path.insert(0, self.entry)
            self.added = True

    def __exit__(self, *exc):
        if self.added and self.entry in sys.path:
            sys.path.remove(self.entry)


def load_function(module: str, function: str, search_dir: str) -> Callable:
    """The plug-in's callable: its module imported from ``search_dir`` (put in front of the path for the import
    only). A module of that name imported from elsewhere before is imported again from here."""
    loaded = sys.modules.get(module)
    if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", None) or "/").startswith(
            os.path.join(search_dir, "")):
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
    with _on_path(search_dir):
        fn = getattr(importlib.import_module(module), function, None)
    if not callable(fn):
        raise ConfigError(f"verify.reward: module {module!r} has no function {function!r}")
    return fn


def resolve(spec: str) -> Plugin:
    """``module:function`` -> :class:`Plugin`; ConfigError (one line, naming verify.reward) for a spec that is not
    one, a module that is not found or does not import, or a name that is not a function of it."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise ConfigError(f"verify.reward: {spec!r} is not auto, math, synthetic or module:function")
    module, function = m["module"], m["function"]
    found, search_dir = _find(module)
    try:
        load_function(module, function, search_dir)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 (the plug-in's own import failed, with any error: say how, in one line)
        raise ConfigError(f"verify.reward: importing {module!r} failed: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]}") from None
    with open(found.origin, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return Plugin(spec.strip(), module, function, search_dir, digest)


def judge(value: Any) -> tuple[float, str]:
    """A plug-in's return value as (reward, reason): True/False -> 1/0; a finite number in [0, 1] -> itself
    (reason correct at 1, wrong_answer at 0, partial between); anything else -> 0 with a ``rejected: ...`` reason
    saying what came back (never trained on as a reward it is not)."""
    if isinstance(value, bool):
        return (1.0, CORRECT) if value else (0.0, WRONG)
    if isinstance(value, numbers.Real):
        r = float(value)
        if math.isfinite(r) and 0.0 <= r <= 1.0:
            return r, CORRECT if r == 1.0 else WRONG if r == 0.0 else PARTIAL
        return 0.0, f"{REJECTED}: returned {r!r}, outside [0, 1]"
    return 0.0, f"{REJECTED}: returned a {type(value).__name__}, not a number in [0, 1] or a bool"


def problem_record(problem: Any, gold: Any) -> dict:
    """What a plug-in is given as the problem: from a :class:`mel_core.problems.problem.Problem`, or a store row
    (``problem_id``, ``question``, ``row_json``), with ``gold`` as its answer; None gives ``{"answer": gold}`` and
    empty fields."""
    import json

    if problem is None:
        return {"problem_id": None, "question": None, "answer": gold, "row": {}}
    if isinstance(problem, dict):
        row = problem.get("row_json")
        return {"problem_id": problem.get("problem_id"), "question": problem.get("question"), "answer": gold,
                "row": json.loads(row) if row else {}}
    return {"problem_id": problem.problem_id, "question": problem.question, "answer": gold, "row": dict(problem.row)}
