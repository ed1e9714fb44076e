"""Batched sampling with transformers' `generate`, sharing the trainable model in-process.

On one host the engine and the trainer hold the *same* module: an optimizer step is visible to the
next generation with no copy, which is the in-place refresh. `load_version` is for a process that
starts mid-campaign (resume) and must first move the shared model to a saved checkpoint.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable, ContextManager, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from mel_core import progress
from mel_core.model.engines.base import Chunk, Completion, Request, SamplingParams, chunked, regroup
from mel_core.tokens import encode_prompts, left_pad


class HFEngine:
    def __init__(self, model, tokenizer, *, max_batch_sequences: int = 256,
                 loader: Callable[[str], None] | None = None, progress: bool = False,
                 stop_ids: Sequence[int] | None = None, compute: Callable[[], ContextManager] = contextlib.nullcontext):
        self.model = model
        # Where generate runs: the policy's compute dtype (Policy.compute), so rollouts are sampled from the
        # numerics the update's log-probs use; plain for a model held in the dtype it computes in.
        self.compute = compute
        self.tokenizer = tokenizer
        # What ends a completion (mel_core.tokens.stop_token_ids): eos, and a chat template's end of turn.
        self.stop_ids = list(stop_ids) if stop_ids else [tokenizer.eos_token_id]
        self.max_batch_sequences = max_batch_sequences
        self.version: str | None = None
        self._loader = loader  # moves the shared model to a checkpoint path (owned by the Policy)
        self.progress = progress

    def load_version(self, version: str, path: str) -> None:
        if version == self.version:
            return
        if self._loader is None:
            raise RuntimeError("this engine has no loader; construct it with loader=")
        self._loader(path)
        self.version = version

    def generate(self, prompts: Sequence[str], params: SamplingParams, desc: str = "") -> list[list[Completion]]:
        chunks = chunked(prompts, params.n, self.max_batch_sequences)
        if self.progress and len(chunks) > 1:
            chunks = progress.bar(chunks, desc=desc or "generate")  # drawn on a terminal only
        out = [c for chunk in chunks for c in self.generate_chunk(chunk, params)]
        return regroup(out, len(prompts), params.n)

    def generate_many(self, requests: Sequence[Request], desc: str = "") -> list[list[list[Completion]]]:
        """Several requests in shared chunks: every row is decoded to its chunk's longest `max_new_tokens` and then cut
        at its own — what stopping there would have produced, since decoding is left to right — and sampled at its own
        request's temperature (a per-row logits processor; 0 = greedy). Chunk i is seeded with the first request's
        seed + i. Requests with different top_p < 1 cannot share a nucleus cut: they run one after the other."""
        live = [(prompts, params) for prompts, params in requests if prompts]
        temperatures = {p.temperature for _, p in live}
        shareable = len({p.top_p for _, p in live}) == 1 and (len(temperatures) == 1 or live[0][1].top_p >= 1.0)
        if len(live) < 2 or not shareable or not self._cheaper_together(live):
            return [self.generate(prompts, params, desc=desc) for prompts, params in requests]
        rows = [(prompt, params.max_new_tokens, params.temperature) for prompts, params in requests
                for prompt in prompts for _ in range(params.n)]  # [sum P*n]
        first = live[0][1]
        out: list[Completion] = []
        starts = range(0, len(rows), self.max_batch_sequences)
        for index, start in enumerate(progress.bar(starts, desc=desc or "generate") if self.progress and len(starts) > 1
                                      else starts):
            part = rows[start:start + self.max_batch_sequences]
            params = replace(first, n=1, max_new_tokens=max(limit for _, limit, _ in part))
            own = [t for _, _, t in part] if len(temperatures) > 1 else None
            done = self.generate_chunk(Chunk(index, [prompt for prompt, _, _ in part]), params, row_temperatures=own)
            out += [self._cut(c, limit) for c, (_, limit, _) in zip(done, part)]
        results, at = [], 0
        for prompts, params in requests:
            size = len(prompts) * params.n
            results.append(regroup(out[at:at + size], len(prompts), params.n))
            at += size
        return results

    def _cheaper_together(self, requests: Sequence[Request]) -> bool:
        """Whether one padded batch costs less than a call per request. On a GPU HF decoding is bound by the host (a
        decoding step costs about the same for 16 rows or 136), so sharing saves the second call's decode loop: yes.
        On a CPU the cost is the padded tokens: every row is padded to the longest prompt and decoded to the longest
        limit, so a batch of short rollout prompts with a few long analysis prompts costs more together (measured:
        docs/BENCHMARKS.md, mel_overhead.py) — shared only when its padded tokens are no more than the calls'."""
        if self.model.device.type != "cpu":
            return True
        def padded(reqs) -> int:  # rows x (longest prompt + longest limit)
            lengths = [len(ids) for prompts, _ in reqs for ids in encode_prompts(self.tokenizer, list(prompts))]
            rows = sum(len(prompts) * params.n for prompts, params in reqs)
            return rows * (max(lengths) + max(params.max_new_tokens for _, params in reqs))
        return padded(requests) <= sum(padded([r]) for r in requests)

    def _cut(self, c: Completion, limit: int) -> Completion:
        """`c` as a generation limited to `limit` new tokens would have ended."""
        if len(c.token_ids) <= limit:
            return c
        ids = c.token_ids[:limit]
        return Completion(text=self.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids,
                          finish_reason="stop" if ids[-1] in set(self.stop_ids) else "length")

    @torch.no_grad()
    def generate_chunk(self, chunk: Chunk, params: SamplingParams,
                       row_temperatures: Sequence[float] | None = None) -> list[Completion]:
        """One chunk's completions, sampled with seed params.seed + chunk.index (with `row_temperatures`, each row
        at its own temperature instead of params.temperature; top_p is then 1)."""
        tok = self.tokenizer
        was_training = self.model.training
        self.model.eval()
        try:
            input_ids, attention = left_pad(encode_prompts(tok, chunk.prompts), tok.pad_token_id)  # [b, L_prompt]
            enc = {"input_ids": input_ids.to(self.model.device), "attention_mask": attention.to(self.model.device)}
            torch.manual_seed((int(params.seed) + chunk.index) % (2**63 - 1))
            kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=tok.pad_token_id,
                          eos_token_id=self.stop_ids)
            if row_temperatures is not None:
                kwargs.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, logits_processor=LogitsProcessorList(
                    [RowTemperature(torch.tensor(row_temperatures, dtype=torch.float32, device=self.model.device))]))
            elif params.temperature > 0:
                kwargs.update(do_sample=True, temperature=params.temperature, top_k=0, top_p=params.top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
            with self.compute():
                seqs = self.model.generate(**enc, **kwargs)  # [b, L_prompt + L_new]
        finally:
            self.model.train(was_training)
        stops = set(self.stop_ids)
        new = [_through_first(ids, stops) for ids in seqs[:, enc["input_ids"].shape[1]:].tolist()]
        texts = tok.batch_decode(new, skip_special_tokens=True)  # one call per chunk, not per completion
        return [Completion(text=text, token_ids=ids, finish_reason="stop" if ids and ids[-1] in stops else "length")
                for ids, text in zip(new, texts)]


class RowTemperature(LogitsProcessor):
    """Each row's logits divided by its own temperature; a row at 0 keeps only its argmax (greedy under sampling)."""

    def __init__(self, temperatures: torch.Tensor):  # [b]
        self.temperatures = temperatures

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores [b, V]
        greedy = self.temperatures <= 0  # [b]
        scaled = scores / self.temperatures.clamp(min=1e-6)[:, None]
        if greedy.any():
            top = scores.argmax(dim=-1, keepdim=True)  # [b, 1]
            only_top = torch.full_like(scores, float("-inf")).scatter(1, top, 0.0)
            scaled = torch.where(greedy[:, None], only_top, scaled)
        return scaled


def _through_first(ids: list[int], stops: set[int]) -> list[int]:
    """The ids up to and including the first stop token (kept: the update learns to stop); padding after it goes."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids
