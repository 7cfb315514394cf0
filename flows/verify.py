"""The `verify-checkpoint` flow: prove a quantized checkpoint complete, exact and loadable."""

from __future__ import annotations

from typing import Annotated

from prefect import State, flow
from prefect.states import Failed
from pydantic import Field

from tasks.errors import PtqflowError
from tasks.verify import verify_task


@flow(name="verify-checkpoint")
def verify_checkpoint(
    source: Annotated[str, Field(description="the checkpoint QUANTIZED was made from")],
    quantized: Annotated[str, Field(description="folder, Hub repo id or fsspec URL")],
    report_dir: Annotated[
        str | None, Field(description="default: QUANTIZED/.ptqflow/verify when local")
    ] = None,
    max_workers: Annotated[int, Field(ge=1, description="shards checked at once")] = 1,
    device: Annotated[str | None, Field(description="where to re-quantize: cpu, cuda:0")] = None,
    load: Annotated[bool, Field(description="also compare logits with transformers")] = False,
    revision: Annotated[str | None, Field(description="Hub SOURCE: branch, tag, commit")] = None,
    cache_dir: Annotated[str | None, Field(description="where remote shards go")] = None,
) -> dict | State:
    """Check QUANTIZED against SOURCE; the report is written and attached as artifacts.

    The run fails, naming every failing tensor, when anything is incomplete, not
    byte-exact, outside the scheme's error range or not laid out as vLLM loads it.
    """
    result = verify_task(
        source, quantized, report_dir=report_dir, max_workers=max_workers, device=device,
        cache_dir=cache_dir, revision=revision, load=load, fail=False,
    )  # fmt: skip
    if not result["ok"]:
        # a Failed state, not an exception: the run fails without a traceback in its logs
        return Failed(message=result["message"], data=result)
    return result


def run_verify(**params) -> dict:
    """Run the flow; a failed verification raises PtqflowError with its message."""
    state = verify_checkpoint(**params, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    if not result["ok"]:
        raise PtqflowError(result["message"])
    return result
