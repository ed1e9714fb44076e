"""Generation with vLLM, behind the same interface as the HF engine (mel_core/model/engines/base.py).

vLLM is an optional dependency: it is imported here, lazily, when an engine is built (``model.engine:
vllm``); the project installs and tests without it. On a machine without a GPU, ``make test-vllm``
builds a separate environment with vLLM's CPU build and runs ``tests/test_vllm_engine.py`` there.

The engine runs beside the trainable policy, not on it: both stay resident (no sleep mode), the policy
trains in-process with transformers, and the engine is moved to each new version:

- full fine-tuning, after an update: :meth:`VLLMEngine.update_weights` takes the trained module's
  parameters as (name, tensor) pairs — no checkpoint is read; float32 master weights come rounded to the
  engine's dtype, model.dtype (:meth:`mel_core.model.policy.Policy.named_weights`) — and vLLM's in-place reload
  (``reload_weights(weights_iterator=...)`` on the worker, the model's own ``load_weights``) copies them
  into its model, through ``LLM.collective_rpc`` with a function that runs on the worker, as TRL's
  colocate mode does. That needs the worker in this process: the engine is built with vLLM's V1
  multiprocessing off (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). A tied lm_head (SmolLM2, Qwen3-4B) follows
  the embedding: the reload writes the shared tensor in place, but on CPU each layer's matmul runs on a
  weight prepacked when it was processed, and a tied lm_head is not reloaded (it has no weight of its
  own in the checkpoint), so every layer that shares a parameter with another is processed again.
  The prefix cache is dropped: its KV blocks were computed by the old weights;
- full fine-tuning, a process that starts mid-campaign (resume) or moves back to an older version:
  :meth:`VLLMEngine.load_version` reloads the weights in place from the checkpoint directory;
- LoRA: the engine serves the base model, and every adapter checkpoint becomes a new
  ``LoRARequest`` (new name and id, so vLLM loads it instead of reusing a cached adapter); the base
  checkpoint (no adapter) is served with no request.

What the pipeline sees is what the HF engine returns: prompts are tokenized and completions decoded
with the policy's own tokenizer (vLLM's tokenizer is never initialised, so prompt ids are the ids the
update trains on), the stop token ends ``token_ids`` when generation stopped on it (the update learns
to stop), and the model's generation_config sampling defaults (repetition penalties, top_k) are
ignored, as the log-probs of the update do not include them.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from mel_core.model.engines.base import Completion, Request, SamplingParams
from mel_core.tokens import encode_prompts

# vLLM's INFO lines (one per stage of engine start, per request batch) would bury the campaign's
# per-step output; a user who wants them sets VLLM_LOGGING_LEVEL themselves.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# Sequence seeds stay below 2**63: vLLM hands each to a torch.Generator.
_SEED_MODULUS = 2**62


class _NoChatTemplateWarmup(logging.Filter):
    """vLLM 0.32 warms up chat-template rendering at start even with skip_tokenizer_init, fails for want of
    a tokenizer and logs the traceback as a warning. Prompts reach the engine already rendered and
    tokenized, so nothing is lost: the record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


_CHAT_TEMPLATE_WARMUP_FILTER = _NoChatTemplateWarmup()


class _NoExpectedReloadMisses(logging.Filter):
    """vLLM's in-place reload warns "<layer>: Failed to load weights" for every layer the weights did not cover and
    puts that layer's tensors back as they were. Two are expected on every reload: the rotary embedding (a cache
    computed at start, not a weight) and a tied lm_head (its weight is the embedding's, and
    :func:`_reload_in_place` processes it again). A weight really missing from an update still shows: vLLM also
    logs "Following weights were not loaded" for it."""

    EXPECTED = ("RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().endswith(self.EXPECTED)


_RELOAD_MISSES_FILTER = _NoExpectedReloadMisses()


def _reload_in_place(worker, weights: Iterable | None = None, path: str | None = None) -> None:
    """Runs on the vLLM worker (``LLM.collective_rpc``): its in-place reload from (name, tensor) pairs in the
    checkpoint's names, or from the checkpoint directory `path`; then every layer that shares a parameter with
    another processed again (on CPU that prepacks its matmul weight anew; on GPU it is a no-op for unquantized
    layers)."""
    from vllm.config import set_current_vllm_config

    if weights is not None:
        worker.reload_weights(weights_iterator=weights)
    else:
        worker.reload_weights(weights_path=path)
    model = worker.model_runner.get_model()
    owners: dict[int, list] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    with set_current_vllm_config(worker.vllm_config):
        for modules in owners.values():
            if len(modules) > 1:  # tied: the reload processed the layer that loaded it, not the others
                for module in modules:
                    method = getattr(module, "quant_method", None)
                    if method is not None:
                        method.process_weights_after_loading(module)


def _location(path: str | Path) -> str:
    """A local checkpoint as an absolute path (the same checkpoint compares equal however it was named);
    anything else (a hub name) as given."""
    return str(Path(path).resolve()) if Path(path).exists() else str(path)


def lora_rank_bound(r: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds adapters of rank `r`."""
    for bound in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if r <= bound:
            return bound
    raise ValueError(f"LoRA rank {r} is above vLLM's largest max_lora_rank (512)")


class VLLMEngine:
    """A vLLM ``LLM`` serving one policy version at a time.

    `path` is the checkpoint the engine starts from: the full model, or with `lora_rank` the base model
    the adapters apply to. `version` starts as None; the runtime calls :meth:`load_version` with the
    version it serves (a no-op reload when that is the checkpoint at `path`).
    """

    def __init__(self, path: str | Path, tokenizer, *, dtype: str = "float32", seed: int = 0,
                 lora_rank: int | None = None, kv_cache_gib: float = 0.0, progress: bool = False,
                 stop_ids: Sequence[int] | None = None, **llm_kwargs):
        # The worker in this process: update_weights hands it the trainer's tensors, which cannot cross to a
        # worker process. Read when the engine is built (vLLM caches its environment afterwards).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids) if stop_ids else [tokenizer.eos_token_id]  # eos and a template's end of turn
        self.progress = progress
        self.version: str | None = None
        self.lora = lora_rank is not None
        self._weights_path = _location(path)  # the full weights the engine holds now
        self._lora_request = None  # the adapter served now (LoRA mode); None = the base model
        self._lora_ids = 0
        self.last_refresh_s: float | None = None  # seconds the last update_weights / load_version reload took
        kwargs = dict(model=self._weights_path, dtype=dtype, seed=seed, skip_tokenizer_init=True,
                      generation_config="vllm", logprobs_mode="processed_logprobs")
        if current_platform.is_cpu():
            # No CUDA graphs to capture on CPU, and torch.compile of the model takes minutes on few cores.
            kwargs["enforce_eager"] = True
        if kv_cache_gib > 0:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if self.lora:
            # One adapter at a time: each version replaces the previous one.
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_bound(lora_rank), max_loras=1)
        kwargs.update(llm_kwargs)
        logging.getLogger("vllm.renderers.base").addFilter(_CHAT_TEMPLATE_WARMUP_FILTER)  # once: same object
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RELOAD_MISSES_FILTER)
        self.llm = LLM(**kwargs)
        if type(self.llm.llm_engine.engine_core).__name__ != "InprocClient":
            raise RuntimeError("vLLM started its engine in another process (VLLM_ENABLE_V1_MULTIPROCESSING was read "
                               "as 1 before this engine was built): update_weights needs it in this process")

    # ------------------------------------------------------------------------------ versions

    def update_weights(self, version: str, weights: Iterable) -> None:
        """Serve `weights` as `version` from now on: the trained module's parameters as (name, tensor) pairs in the
        checkpoint's names (:meth:`mel_core.model.policy.Policy.named_weights`), copied into vLLM's model in memory,
        tied parameters included. Full fine-tuning only: a LoRA engine serves adapter checkpoints (load_version)."""
        if self.lora:
            raise RuntimeError("a LoRA engine serves each version as an adapter checkpoint: use load_version")
        t0 = time.perf_counter()
        self.llm.collective_rpc(_reload_in_place, kwargs={"weights": weights})
        self.llm.reset_prefix_cache()  # cached KV blocks hold activations of the old weights
        self.last_refresh_s = time.perf_counter() - t0
        self._weights_path = None  # weights of no directory: a later load_version reloads whatever it names
        self.version = version

    def load_version(self, version: str, path: str) -> None:
        """Serve the policy saved at `path` from now on (a process that starts mid-campaign, or one moved to an older
        version): reload full weights from the directory in place, or switch the LoRA adapter."""
        if version == self.version:
            return
        path_ = _location(path)
        if self.lora:
            if (Path(path_) / "adapter_config.json").exists():
                from vllm.lora.request import LoRARequest
                self._lora_ids += 1
                self._lora_request = LoRARequest(lora_name=version, lora_int_id=self._lora_ids, lora_path=path_)
            else:  # the base checkpoint: adapters at their initialisation are the base model itself
                self._lora_request = None
        elif path_ != self._weights_path:
            t0 = time.perf_counter()
            self.llm.collective_rpc(_reload_in_place, kwargs={"path": path_})
            self.llm.reset_prefix_cache()  # cached KV blocks hold activations of the old weights
            self.last_refresh_s = time.perf_counter() - t0
            self._weights_path = path_
        self.version = version

    # ------------------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[str], params: SamplingParams, desc: str = "") -> list[list[Completion]]:
        """`params.n` completions per prompt, all prompts in one ``LLM.generate`` call; each token's log-prob
        too with `params.logprobs` (the update recomputes its own, so the stages do not ask: on a small model
        vLLM's per-token log-prob objects cost ~15% of its throughput).

        Sequence j of prompt i is drawn with seed ``params.seed + i*n + j`` (vLLM seeds a request's
        j-th sample with its seed + j): reproducible whatever else is in the batch, and no two
        sequences of a call share a random stream, even for identical prompts.
        """
        return self.generate_many([(prompts, params)], desc=desc)[0]

    def generate_many(self, requests: Sequence[Request], desc: str = "") -> list[list[list[Completion]]]:
        """Several generations, each with its own sampling parameters, in one ``LLM.generate`` call: vLLM schedules
        all their sequences together (orchestration.overlap). Each request is seeded as :meth:`generate` seeds it."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        tok = self.tokenizer
        stops = set(self.stop_ids)
        prompt_ids, vparams, shapes = [], [], []
        for prompts, params in requests:
            n = params.n
            greedy = params.temperature <= 0
            base_seed = int(params.seed) % _SEED_MODULUS
            # vLLM refuses n > 1 for greedy requests: one sequence, repeated n times (what sampling it n times gives).
            drawn = 1 if greedy else n
            prompt_ids += encode_prompts(tok, prompts)  # as the HF engine and the trainer encode them (mel_core.tokens)
            vparams += [VSamplingParams(
                n=drawn, temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
                top_k=0, max_tokens=params.max_new_tokens, seed=None if greedy else base_seed + i * n,
                stop_token_ids=list(self.stop_ids), logprobs=0 if params.logprobs else None, detokenize=False)
                for i in range(len(prompts))]
            shapes.append((len(prompts), n, drawn))
        if not prompt_ids:
            return [[] for _ in requests]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], vparams,
                                    lora_request=self._lora_request,
                                    use_tqdm=self.progress and sys.stderr.isatty())
        seqs = []  # [sum P][n]
        at = 0
        for num_prompts, n, drawn in shapes:
            seqs += [sorted(out.outputs, key=lambda c: c.index) * (n // drawn) for out in outputs[at:at + num_prompts]]
            at += num_prompts
        new = [list(c.token_ids) for group in seqs for c in group]
        texts = tok.batch_decode(new, skip_special_tokens=True)  # one call, as the HF engine decodes
        flat = []
        for c, ids, text in zip((c for group in seqs for c in group), new, texts):
            logprobs = [lp[t].logprob for t, lp in zip(ids, c.logprobs)] if c.logprobs is not None else None
            flat.append(Completion(text=text, token_ids=ids,
                                   finish_reason="stop" if ids and ids[-1] in stops else "length", logprobs=logprobs))
        results, at = [], 0
        for num_prompts, n, _ in shapes:
            results.append([flat[at + i * n:at + (i + 1) * n] for i in range(num_prompts)])
            at += num_prompts * n
        return results

    def close(self) -> None:
        """Stop vLLM's engine processes (they also stop when this process exits)."""
        self.llm.llm_engine.engine_core.shutdown()
