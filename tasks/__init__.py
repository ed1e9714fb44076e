"""Thin Prefect wrappers, one per stage: resolve inputs by id, call mel_core, record results."""

from tasks.abstract import abstract_task
from tasks.diagnose import diagnose_task
from tasks.generation import generate_chunk_task
from tasks.pair import pair_task
from tasks.replay import replay_task
from tasks.sample import sample_task
from tasks.update import update_task
from tasks.verify import verify_task
from tasks.warm_start import warm_start_task

__all__ = ["warm_start_task", "sample_task", "verify_task", "pair_task", "diagnose_task", "abstract_task",
           "replay_task", "update_task", "generate_chunk_task"]
