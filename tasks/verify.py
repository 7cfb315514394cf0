"""The Prefect task around `tasks.core.verify`: verify, write the report, attach it to the run."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from storage.errors import PtqflowError
from storage.source import Folder
from tasks.core.verify import VerifyResult, default_report_dir, summary, verify, write_report
from tasks.core.verify.report import render_markdown, worst_rows


@task(name="verify", cache_policy=NO_CACHE)
def verify_task(
    source: str,
    quantized: str,
    report_dir: str | None = None,
    max_workers: int = 1,
    device: str | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    load: bool = False,
    fail: bool = True,
) -> VerifyResult:
    """Verify, write the report, attach it to the run; returns its `summary`.

    With `fail`, any problem raises a PtqflowError that names the failing
    tensors (and fails the run); else the summary says ok False.
    """
    logger = get_run_logger()

    def progress(done: int, total: int, shard: str) -> None:
        logger.info("[%d/%d] %s verified", done, total, shard)

    v = verify(
        source,
        quantized,
        revision=revision,
        max_workers=max_workers,
        device=device,
        cache_dir=cache_dir,
        load=load,
        progress=progress,
    )
    target = Path(report_dir) if report_dir else default_report_dir(Folder(v.quantized))
    paths = write_report(v, target)
    create_markdown_artifact(
        key="verify-report",
        markdown=render_markdown(v, f"Plot: `{paths['plot']}`"),
        description=f"verify {'passed' if v.ok else 'FAILED'}: {v.quantized}",
    )
    create_table_artifact(
        key="verify-tensors",
        table=worst_rows(v, 50),
        description="the 50 quantized weights with the largest error relative to their limit",
    )
    for note in v.notes:
        logger.warning(note)
    result = summary(v, paths)
    if v.ok:
        logger.info("verified: report in %s", paths["markdown"])
    elif fail:
        raise PtqflowError(result.message)
    else:
        logger.error(
            "verify FAILED, %d problem(s): report in %s", result.problems, paths["markdown"]
        )
    return result
