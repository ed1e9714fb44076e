"""How text becomes token ids, in one place for the engines, the trainer and the warm start.

A prompt is encoded exactly as a causal LM expects a document to start: with the tokenizer's special
tokens (BOS for tokenizers that add one, e.g. Llama's; nothing for Qwen's or the tiny model's). A
completion is the model's own continuation and is never given special tokens. Sampler and trainer must
agree on this to the token: the update computes log-probs of the completion given *the same* prompt ids
the engine generated from (tests/test_tokens.py checks it with a BOS-adding tokenizer).
"""

from __future__ import annotations

from typing import Sequence


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, special tokens included as the tokenizer adds them to a document's start."""
    if not texts:
        return []
    # verbose=False: a prompt longer than the tokenizer's nominal max length is the caller's to judge
    # (Runtime.usable_problems names it); the tokenizer's own warning would be a stray line on stderr.
    return tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]


def encode_completions(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of continuation text (no special tokens: it follows a prompt)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def left_pad(ids: Sequence[Sequence[int]], pad_id: int):
    """[B, L] input ids and attention mask, left-padded (generation appends on the right)."""
    import torch

    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)  # [B, L]
    attention = torch.zeros((len(ids), width), dtype=torch.long)  # [B, L]
    for i, x in enumerate(ids):
        if x:
            input_ids[i, width - len(x):] = torch.tensor(list(x), dtype=torch.long)
            attention[i, width - len(x):] = 1
    return input_ids, attention
