"""Thin Prefect wrappers over mel_core: the stage tasks (one factory), the warm start, evaluation, and the
generation chunks Ray workers run."""
