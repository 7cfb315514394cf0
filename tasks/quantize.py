"""Stage 3, quantize: write one output shard from its downloaded source files."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from tasks.core.records import Manifest, ShardPlan
from tasks.core.shard import write_shard


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(
    shard: ShardPlan,
    paths: dict[str, str],
    out_dir: str,
    config,
    device: str = "cpu",
    limit: str | None = None,
    key: str | None = None,
) -> Manifest:
    """Quantize one shard from downloaded `paths` with `config` (None copies, as reindex does).

    `limit` names the Prefect global concurrency limit of `device`, so shards on
    one GPU never compete for its memory, whichever process or machine runs them.
    `key` is recorded beside the shard before it gets its final name.
    """
    schemes = config.config_groups if config is not None else {}
    opener = lambda f: open(paths[f], "rb")  # noqa: E731
    with concurrency(limit, strict=True) if limit else nullcontext():
        return write_shard(shard, opener, Path(out_dir), schemes, device, claim=key)
