"""Where a flow's generation runs: in its own process (``orchestration.runner: local``), or fanned out to Ray
workers (``ray``), each chunk a Prefect task on prefect-ray's RayTaskRunner.

The flow owns the runner for as long as it runs: joining a cluster costs seconds, so a campaign starts it once,
not per step, and shuts it down at its end. Within it the runtime generates with a ShardedEngine whose chunks
go to the workers (mel_core/model/engines/sharded.py).
"""

from __future__ import annotations

import contextlib
import os

from mel_core.step.runtime import Runtime


def _worker_env() -> dict:
    """What a worker process must share with the flow's: Prefect's home and API (so its task runs report to
    the same server — the temporary one of this process when no PREFECT_API_URL is set), telemetry off,
    quiet tokenizers."""
    from prefect.client.orchestration import get_client

    env = {k: v for k, v in os.environ.items()
           if k.startswith("PREFECT_") or k in ("DO_NOT_TRACK", "TOKENIZERS_PARALLELISM")}
    with get_client(sync_client=True) as client:
        env["PREFECT_API_URL"] = str(client.api_url).rstrip("/")
    return env


@contextlib.contextmanager
def generation_workers(rt: Runtime):
    """For the block: the runtime's generation on this config's runner (nothing to do for `local`, or when the
    runtime already generates elsewhere, e.g. an evaluation inside a campaign that started the workers)."""
    if rt.cfg.orchestration.runner == "local" or rt.has_given_engine:
        yield
        return
    from prefect_ray import RayTaskRunner

    from mel_core.model.engines.sharded import ShardedEngine
    from tasks.generation import ray_dispatch

    r = rt.cfg.orchestration.ray
    init = {"runtime_env": {"env_vars": _worker_env()}, "log_to_driver": False}
    if not r.address:
        # A local cluster of this process: its size, no dashboard, reachable from this machine only — so without
        # Ray's token auth, whose token Ray would write under the user's home.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        init.update(num_cpus=r.local_workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                    object_store_memory=256 * 2**20)
    with RayTaskRunner(address=r.address or None, init_kwargs=init) as runner:
        rt.use_engine(ShardedEngine(ray_dispatch(runner, rt.cfg), max_batch_sequences=rt.cfg.sampling.chunk_sequences,
                                    base_path=rt.base_checkpoint.path if rt.cfg.model.lora.enabled else None))
        try:
            yield
        finally:
            rt.drop_engine()
