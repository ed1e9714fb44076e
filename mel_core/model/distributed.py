"""The update stage across processes: FSDP2 (``torch.distributed.fsdp.fully_shard``), one process per GPU.

With ``optim.fsdp_processes: N > 1`` the update stage does not train in the flow's process: it writes
the step's batch (token ids, advantages, the accepted meta-experience) to a file and launches N
processes with ``torchrun --standalone``. Each process loads the input checkpoint (weights and
optimizer state), shards every decoder layer and the root module with ``fully_shard``, and runs
:meth:`Policy.train_step` on its share of each mini-batch's micro-batches (``policy.DataParallel``),
with the loss weights of the whole batch — so the step is the one a single process takes, to float
reduction order (``tests/test_distributed.py``). Rank 0 writes the new checkpoint (full weights in HF
format, the optimizer state in the single-process layout, the update's stats) into the temp
directory the flow process then renames into place, so resume and lineage see the same files either
way. The flow process's own policy then loads that checkpoint for generation.

We call ``fully_shard`` directly instead of accelerate's FSDP plugin, which wraps the same FSDP2 API:
the loss aggregation stays the one in ``Policy.train_step``. NCCL on GPUs (one per rank,
``LOCAL_RANK``), gloo on CPU (how the tests run it). LoRA is not sharded (its trainable part is small:
use one process).

Precision: the shards are the master weights (``model.master_dtype``); with bfloat16 compute over float32
master weights each module is sharded with ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``,
verl's mixed precision: the all-gathered parameters are bfloat16 for forward and backward, gradients are
reduce-scattered in float32 into float32 shards, and AdamW steps those. Autocast over float32 shards alone would
compute what one process computes, but it would all-gather float32 (twice the bytes) and keep its bfloat16 copy of
every weight it casts until the forward ends (autograd, without gradient checkpointing, until the backward): the
whole model's, unsharded, on every rank. So this step equals the single-process one to bfloat16 rounding (norm
weights, embeddings and the residual stream are bfloat16 here, float32 under one process's autocast; the same
direction for 99.9% of the weights in tests/test_distributed.py), and to float reduction order with float32 compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mel_core.errors import PermanentError
from mel_core.model.checkpoints import saved_update_stats

BATCH_FILE = "batch.pt"
CONFIG_FILE = "config.json"


class DistributedUpdateError(RuntimeError):
    """The torchrun group failed: its output's end is in the message."""


def launch(config: dict, checkpoint: str, rl, nll, out: Path, nproc: int, *, timeout_s: float | None = None) -> dict:
    """Train one step from `checkpoint` on `nproc` processes and write the new checkpoint into `out` (a temp
    directory the caller renames). Returns the update's stats."""
    out = Path(out)
    work = out.with_name(out.name + ".work")  # `out` is already this process's temp (files.temp_name): so is this
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"rl": dataclasses.asdict(rl), "nll": dataclasses.asdict(nll) if nll is not None else None},
               work / BATCH_FILE)
    (work / CONFIG_FILE).write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mel_core.model.distributed", "--work", str(work), "--checkpoint", str(checkpoint), "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        if "NonFiniteLoss" in tail:
            from mel_core.model.policy import NonFiniteLoss
            raise NonFiniteLoss(f"distributed update refused the step:\n{tail}")
        raise DistributedUpdateError(f"torchrun exited with {done.returncode}:\n{tail}")
    stats = saved_update_stats(out)
    if stats is None:
        raise DistributedUpdateError(f"the distributed update wrote no stats into {out}")
    shutil.rmtree(work, ignore_errors=True)
    return stats


# ---------------------------------------------------------------------------------- the ranks


def _plain_to_fqn(model, state: dict) -> dict:
    """A single-process AdamW state dict (params by index) keyed by parameter names instead."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in state["param_groups"]]
    return {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def _fqn_to_plain(model, state: dict) -> dict:
    index = {n: i for i, n in enumerate(n for n, p in model.named_parameters() if p.requires_grad)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in state["param_groups"]]
    return {"state": {index[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def _shard(model, compute_dtype: torch.dtype) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The all-gathered parameters in the compute dtype, gradients reduced in the shards' own (the master dtype).
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=next(model.parameters()).dtype)
    layers = getattr(getattr(model, "model", None), "layers", None)
    for layer in layers or []:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def rank_main(argv=None) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from mel_core import config as config_mod
    from mel_core.model.checkpoints import OPTIMIZER_FILE, write_checkpoint
    from mel_core.model.policy import DataParallel, NLLBatch, Policy, RLBatch, apply_optimizer_settings

    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    work, out = Path(a.work), Path(a.out)

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        cfg = config_mod.from_dict(json.loads((work / CONFIG_FILE).read_text()))
        cfg.model.device = f"cuda:{local_rank}" if cuda else "cpu"
        if cfg.run.torch_threads:
            torch.set_num_threads(cfg.run.torch_threads)
        compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        # its optimizer is built over the sharded parameters
        policy = Policy(cfg, a.checkpoint, prepare=lambda model: _shard(model, compute_dtype))
        optimizer_file = Path(a.checkpoint) / OPTIMIZER_FILE
        if optimizer_file.exists():  # the single-process layout, keyed by parameter name for the sharded model
            saved = _plain_to_fqn(policy.model, torch.load(optimizer_file, map_location="cpu", weights_only=True))
            set_optimizer_state_dict(policy.model, policy.optimizer, saved,
                                     options=StateDictOptions(full_state_dict=True))
            apply_optimizer_settings(cfg, policy.optimizer)

        batch = torch.load(work / BATCH_FILE, weights_only=False)
        rl = RLBatch(**batch["rl"])
        nll = NLLBatch(**batch["nll"]) if batch["nll"] is not None else None
        stats = policy.train_step(rl, nll, DataParallel(rank, world))

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(policy.model, options=full)
        optimizer = get_optimizer_state_dict(policy.model, policy.optimizer, options=full)  # rank 0's; others: {}
        if rank == 0:  # the checkpoint layout of one process (mel_core.model.checkpoints)
            write_checkpoint(out, policy.model, policy.tokenizer, _fqn_to_plain(policy.model, optimizer), stats,
                             state_dict=weights)
        dist.barrier()
    except PermanentError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank_main()
    # The step is done and written. Skip the interpreter's teardown: on CPU/gloo a rank sometimes aborts in it
    # ("terminate called without an active exception", about 1 launch in 30 here) after destroy_process_group.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
