"""Verify a quantized checkpoint against its source: complete, exact, accurate, loadable.

One job per module:

* `integrity`: `check_integrity` reads headers only, and checks each quantized
  layer's tensors against what vLLM's loader creates (`layout`).
* `exact`: `check_exactness` compares re-quantized source weights with the stored
  bytes; `check_shard` runs it, and `accuracy`'s `check_accuracy`, on one shard.
* `accuracy`: `check_accuracy` dequantizes the stored tensors with compressed-tensors
  and compares them with the source weight.
* `logits`: `compare_logits` (optional) loads both checkpoints with transformers.
* `report`: `write_report` writes report.md, tensors.csv and errors.png.

`verify` runs them shard by shard, shards in parallel, with one unit (a weight
or an NVFP4 fused set) in memory per shard at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from storage.errors import PtqflowError
from storage.source import open_source
from tasks.core.devices import check_devices
from tasks.core.records import ShardPlan
from tasks.core.verify.accuracy import check_accuracy, error_limit
from tasks.core.verify.exact import check_exactness, check_shard
from tasks.core.verify.files import LocalFiles
from tasks.core.verify.integrity import check_integrity, open_quantized
from tasks.core.verify.layout import vllm_layout
from tasks.core.verify.logits import compare_logits, model_files
from tasks.core.verify.records import (
    Integrity,
    TensorResult,
    Verification,
    VerifyFailed,
    VerifyResult,
)
from tasks.core.verify.report import (
    default_report_dir,
    failure_message,
    render_markdown,
    summary,
    write_report,
)

__all__ = [
    "Integrity",
    "TensorResult",
    "Verification",
    "VerifyFailed",
    "VerifyResult",
    "check_accuracy",
    "check_exactness",
    "check_integrity",
    "check_shard",
    "compare_logits",
    "default_report_dir",
    "error_limit",
    "failure_message",
    "open_quantized",
    "render_markdown",
    "summary",
    "verify",
    "vllm_layout",
    "write_report",
]


def verify(
    source: str,
    quantized: str,
    *,
    revision: str | None = None,
    max_workers: int = 1,
    device: str | None = None,
    cache_dir: str | None = None,
    load: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Verification:
    """Check QUANTIZED against SOURCE; `progress(done, total, shard)` after each shard.

    Raises PtqflowError only when nothing can be checked (no SOURCE, no valid
    quantization_config); every other finding is in the Verification.

    Example:

        from pathlib import Path

        from tasks.core.verify import verify, write_report

        v = verify("./Llama-3-8B", "./Llama-3-8B-W4A16", max_workers=4)
        paths = write_report(v, Path("./verify-report"))
        print("passed" if v.ok else "\n".join(v.failures()), paths["markdown"])
    """
    src = open_source(source, revision)
    out = open_quantized(quantized)
    integrity = check_integrity(src, out)
    v = integrity.verification
    device = check_devices(device)[0]
    local = LocalFiles(cache_dir)
    shards = integrity.plan.shards

    def one(shard: ShardPlan) -> None:
        stored = integrity.stored
        qfiles = {stored[s.name].file for s in shard.specs if s.name in stored}
        check_shard(
            shard,
            integrity,
            {f: local.path(src, f) for f in shard.files},
            {f: local.path(out, f) for f in qfiles},
            device,
        )

    with ThreadPoolExecutor(max(1, max_workers)) as pool:
        futures = {pool.submit(one, s): s for s in shards}
        for done, future in enumerate(as_completed(futures), 1):
            try:
                future.result()
            except (OSError, PtqflowError) as e:
                v.problems.append(f"{futures[future].name}: could not be checked ({e})")
            if progress is not None:
                progress(done, len(shards), futures[future].name)
    if load:
        bits = min(s.weights.num_bits for s in integrity.schemes.values())
        with tempfile.TemporaryDirectory(prefix="ptqflow-verify-") as scratch:
            dirs = [
                local.folder(f, model_files(f), Path(scratch) / name)
                for f, name in ((src, "source"), (out, "quantized"))
            ]
            v.logits, problems = compare_logits(*dirs, bits)
        v.problems += problems
    return v
