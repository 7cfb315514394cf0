"""The per-shard tasks on Dask workers (a real LocalCluster of worker processes)."""

from __future__ import annotations

import pytest

from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint
from tests.helpers import IGNORE, concurrency_limits, files, quantize_folder

pytestmark = pytest.mark.slow  # Prefect servers, workers, subprocesses


def test_dask_local_cluster_output_is_byte_identical(tmp_path, prefect_server):
    from flows.quantize import run_quantize

    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=4)
    with concurrency_limits() as seen:
        result = run_quantize(
            source=str(src),
            destination=str(tmp_path / "out"),
            scheme="NVFP4A16",
            ignore=IGNORE,
            device="cpu",
            max_workers=2,
            task_runner="dask",
        )
    assert result.quantized == 4
    # worker processes share one Prefect global limit: the CPU's, max_workers slots
    (name,) = seen
    assert name.endswith("-cpu") and seen[name][0] == 2 and 1 <= seen[name][1] <= 2, seen
    quantize_folder(src, tmp_path / "want", resolve_config("NVFP4A16", ignore=IGNORE))
    assert files(tmp_path / "out") == files(tmp_path / "want")
