"""The `verify-checkpoint` flow: prove a quantized checkpoint complete, exact and loadable."""

from __future__ import annotations

from typing import Annotated

from prefect import State, flow
from prefect.states import Failed

from flows.options import VERIFY
from storage.errors import PtqflowError
from tasks.core.verify import VerifyResult
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
        # a Failed state, not an exception: the run fails without a traceback in its logs
        return Failed(message=result.message, data=result)
    return result


def run_verify(**params) -> VerifyResult:
    """Run the flow; a failed verification raises PtqflowError with its message."""
    state = verify_checkpoint(**params, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    if not result.ok:
        raise PtqflowError(result.message)
    return result
