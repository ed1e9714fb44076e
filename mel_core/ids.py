"""Ids, seeds and timestamps: what every record and every random stream is keyed by (a leaf).

Records carry deterministic ids from their content and position, so writing one twice is a no-op; seeds derive
from the run seed and the place they are used, so a step's sampling, pairing and replays are reproducible.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any


def make_id(prefix: str, *parts: Any) -> str:
    """Deterministic id from content and position: the same inputs always give the same id."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{prefix}_{h}"


def derive_seed(*parts: Any) -> int:
    """Independent, reproducible seeds per (run seed, step, stage, ...)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:6], "big")


def now() -> dt.datetime:
    """A naive UTC timestamp, as every TIMESTAMP column holds."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
