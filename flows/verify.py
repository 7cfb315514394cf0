"""The `verify-checkpoint` flow: prove a quantized checkpoint complete, exact and loadable."""

from __future__ import annotations

from typing import Annotated

from prefect import State, flow
from prefect.states import Failed

from flows.options import VERIFY
from tasks.core.verify import VerifyFailed, VerifyResult
from tasks.verify import verify_task

described, DEFAULTS = VERIFY.described, VERIFY.defaults


@flow(name="verify-checkpoint")
@VERIFY.document
def verify_checkpoint(
    source: Annotated[str, described("source")],
    quantized: Annotated[str, described("quantized")],
    report_dir: Annotated[str | None, described("report_dir")] = DEFAULTS["report_dir"],
    max_workers: Annotated[int, described("max_workers")] = DEFAULTS["max_workers"],
    device: Annotated[str | None, described("device")] = DEFAULTS["device"],
    load: Annotated[bool, described("load")] = DEFAULTS["load"],
    revision: Annotated[str | None, described("revision")] = DEFAULTS["revision"],
    cache_dir: Annotated[str | None, described("cache_dir")] = DEFAULTS["cache_dir"],
) -> VerifyResult | State:
    """Check QUANTIZED against SOURCE; the report is written and attached as artifacts.

    The run fails, naming every failing tensor, when anything is incomplete, not
    byte-exact, outside the scheme's error range or not laid out as vLLM loads it.
    """
    result = verify_task(
        source,
        quantized,
        report_dir=report_dir,
        max_workers=max_workers,
        device=device,
        cache_dir=cache_dir,
        revision=revision,
        load=load,
        fail=False,
    )
    if not result.ok:
        # a Failed state, not a raise: the flow's own logs carry no traceback
        return Failed(message=result.message, data=VerifyFailed(result))
    return result


def run_verify(**params) -> VerifyResult:
    """Run the flow; a failed verification raises VerifyFailed (a PtqflowError) with its message."""
    return verify_checkpoint(**params, return_state=True).result()
