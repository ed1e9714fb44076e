"""Rewards: verifiable checks of a completion against its gold answer (the embedded worlds' ``Answer:`` line, math
answers with math-verify in worker processes with a per-item deadline), and the :class:`Verifier` the pipeline
calls. docs/DESIGN.md §2 ("Verify") says what each setting decides.
"""

from mel_core.algorithm.rewards.boxed import last_boxed_answer
from mel_core.algorithm.rewards.math_answers import compare, compare_batch, verify_math, verify_math_batch
from mel_core.algorithm.rewards.pool import shutdown_pool
from mel_core.algorithm.rewards.synthetic import extract_synthetic_answer, extract_synthetic_text, verify_synthetic
from mel_core.algorithm.rewards.verdicts import (
    CORRECT,
    DEFAULT_EXTRACTION,
    DEFAULT_TIMEOUT_S,
    DEFAULT_TRUNCATED_REWARD,
    LENGTH,
    NO_ANSWER,
    TIMEOUT,
    TRUNCATED,
    VERIFIER_VERSION,
    WRONG,
    GoldError,
    Verdict,
    normalize_gold,
)
from mel_core.algorithm.rewards.verifier import Verifier, reward_kind_for_source, verify_batch
from mel_core.vocabulary import EXTRACTIONS, REWARD_KINDS, TRUNCATED_REWARDS

__all__ = [
    "CORRECT", "DEFAULT_EXTRACTION", "DEFAULT_TIMEOUT_S", "DEFAULT_TRUNCATED_REWARD", "EXTRACTIONS", "GoldError",
    "LENGTH", "NO_ANSWER", "REWARD_KINDS", "TIMEOUT", "TRUNCATED", "TRUNCATED_REWARDS", "VERIFIER_VERSION", "WRONG",
    "Verdict", "Verifier", "compare", "compare_batch", "extract_synthetic_answer", "extract_synthetic_text",
    "last_boxed_answer", "normalize_gold", "reward_kind_for_source", "shutdown_pool", "verify_batch", "verify_math",
    "verify_math_batch", "verify_synthetic",
]
