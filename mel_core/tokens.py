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
    """Token ids of each prompt, special tokens included as the tokenizer adds them to a document's start — unless
    the text already begins with the BOS token (a prompt rendered inside a chat template that writes it), which
    would otherwise be doubled."""
    if not texts:
        return []
    # verbose=False: a prompt longer than the tokenizer's nominal max length is the caller's to judge
    # (Runtime.usable_problems names it); the tokenizer's own warning would be a stray line on stderr.
    bos = tokenizer.bos_token
    framed = [bool(bos) and t.startswith(bos) for t in texts]
    if not any(framed):
        return tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    return [tokenizer(t, add_special_tokens=not f, verbose=False)["input_ids"] for t, f in zip(texts, framed)]


def encode_completions(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of continuation text (no special tokens: it follows a prompt)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the tokenizer's chat template closes an assistant turn with (<|im_end|>, <|eot_id|>, ...),
    read off the template itself; None without a template or when it closes with plain text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MEL_END_OF_TURN_PROBE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # a template that refuses this conversation: no end-of-turn token to read
        return None
    after = text[text.find(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False, verbose=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                                                 if getattr(t, "special", False)}
    return next((i for i in ids if i in special), None)


def stop_token_ids(tokenizer, chat: bool) -> list[int]:
    """What ends a completion: eos, and with a chat template its end-of-turn token. The first is what a completion
    keeps as its last id (the update learns to stop)."""
    ids = []
    turn = end_of_turn_id(tokenizer) if chat else None
    for i in (turn, tokenizer.eos_token_id):
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def encode_target(tokenizer, text: str, spans: Sequence[tuple[str, int, int]], parts: Sequence[str],
                  end_id: int | None = None):
    """An NLL target: the ids of `text` (a completion) and the token that ends a completion (`end_id`: the chat
    template's end of turn when prompts are framed by it; else the tokenizer's eos), and for each id the index in
    `parts` of the part of the text its first character lies in (`spans`: (part, start, end) character spans;
    the end token and uncovered text are part 0). Offsets come from the fast tokenizer; a slow one encodes span by
    span."""
    eos = tokenizer.eos_token_id if end_id is None else end_id
    index = {p: i for i, p in enumerate(parts)}
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        where = [0] * len(text)
        for part, start, end in spans:
            where[start:end] = [index.get(part, 0)] * (end - start)
        labels = [where[start] if start < len(where) else 0 for start, _ in offsets]
    except NotImplementedError:  # no offsets: encode each span on its own
        ids, labels = [], []
        for part, start, end in spans:
            piece = encode_completions(tokenizer, [text[start:end]])[0]
            ids += piece
            labels += [index.get(part, 0)] * len(piece)
    return ids + [eos], labels + [0]


def token_offsets(tokenizer, text: str, ids: Sequence[int]) -> list[tuple[int, int]]:
    """The character span in `text` of each of `ids`, `ids` being `text` encoded as a completion (an NLL target
    without its end token): the fast tokenizer's offsets when it encodes `text` to exactly `ids`; else (a slow
    tokenizer, or ids encoded span by span) the lengths of the decoded growing prefixes."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if list(enc["input_ids"]) == list(ids):
            return [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    except NotImplementedError:
        pass
    ends = [len(tokenizer.decode(list(ids[:i + 1]))) for i in range(len(ids))]
    return list(zip([0] + ends[:-1], ends))


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
