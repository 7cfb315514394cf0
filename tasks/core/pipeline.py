"""Quantize a checkpoint in this process, without Prefect: the pipeline as one plain function.

The quantize-checkpoint flow runs the same stages as Prefect tasks, and adds
what needs an orchestrator: cached results for resuming, retries, progress
artifacts, per-device concurrency limits and Dask workers. Tests and
benchmarks call this to exercise the stages without it.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from storage.dest import open_dest
from storage.source import Folder
from tasks.core.card import CardRequest
from tasks.core.finalize import finalize
from tasks.core.planner import plan_checkpoint
from tasks.core.records import Summary
from tasks.core.shard import write_shard
from tasks.core.transfer import cache_dir_for, download, upload

__all__ = [
    "quantize",
]

CARD = CardRequest()  # ptqflow's model card, its command made from the plan


def quantize(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    config,
    *,
    max_workers: int = 1,
    device: str = "cpu",
    overwrite: bool = False,
    cache_dir: str | None = None,
    card: CardRequest = CARD,
    **plan_options,
) -> Summary:
    """Plan SOURCE, write every output shard into DESTINATION, then the index, the model card
    (as `card` asks) and config.json.

    `config` is a resolved QuantizationConfig (tasks.core.schemes.resolve_config);
    `plan_options` are plan_checkpoint's. Up to `max_workers` shards are
    quantized at once, and each shard's upload (its hash) runs beside the next
    shards' quantization, as in the flow.

    Example, W4A16 with an MSE observer after a Hadamard rotation:

        from tasks.core.pipeline import quantize
        from tasks.core.schemes import resolve_config

        config = resolve_config("W4A16", ignore=["lm_head"], observer="memoryless_mse")
        summary = quantize("./Llama-3-8B", "./Llama-3-8B-W4A16", config, rotate="hadamard")
        print(summary.total_size, "bytes in", summary.destination)
    """
    started = time.monotonic()
    plan, _ = plan_checkpoint(str(source), config, **plan_options)
    dest = open_dest(str(destination))
    with dest.writing(plan.source, overwrite):
        folder = Folder(plan.source)
        cache = cache_dir_for(folder, cache_dir)

        def one(shard):
            paths = download(folder, shard.files, cache)
            opener = lambda f: open(paths[f], "rb")  # noqa: E731
            return write_shard(shard, opener, dest.staging, config.config_groups, device)

        with ThreadPoolExecutor(max_workers) as pool, ThreadPoolExecutor(1) as uploads:
            done = [uploads.submit(upload, m, dest) for m in pool.map(one, plan.shards)]
            manifests = [f.result() for f in done]
        finalize(plan, folder, dest, manifests, card)
    return Summary(dest.url, manifests, plan.total_size, round(time.monotonic() - started, 1))
