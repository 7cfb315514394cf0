"""What verify finds, as typed records, and the thresholds it judges by."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from storage.errors import PtqflowError
from tasks.core.records import Plan, Read

__all__ = [
    "MIN_LOGITS_COSINE",
    "ZERO_BLOCK_FLOOR",
    "Integrity",
    "TensorResult",
    "Verification",
    "VerifyFailed",
    "VerifyResult",
]

# A scale block that dequantizes to all zeros is flagged only when its source
# absmax is above this fraction of the tensor's: NVFP4's fp8 block scales
# underflow to zero, legitimately, below about 2e-6 of it.
ZERO_BLOCK_FLOOR = 1e-4
# --load: smallest logits cosine accepted when every scheme has 4 bits or more.
# Measured on the random tiny test models: 0.966-0.978 for 4-bit schemes,
# 0.996-0.9998 for 8-bit ones (real models do better); 2-bit gives about 0.5.
MIN_LOGITS_COSINE = 0.9


@dataclass
class TensorResult:
    """One output weight (a source tensor, or one expert of a 3-D one) and what verify found."""

    name: str
    shard: str  # planned output shard
    status: str  # quantized, ignored (targeted but ignored) or copied
    group: str | None
    shape: tuple[int, ...]
    bytes_in: int
    bytes_out: int
    limit: float | None = None  # largest relative error accepted
    rel_error: float | None = None
    problems: list[str] = field(default_factory=list)
    prefix: str = ""  # its compressed tensors' names are this + their key (Weight.output)
    skip: tuple[str, ...] = ()  # compressed tensors its loader cannot load, left out

    @property
    def snr_db(self) -> float | None:
        if self.rel_error is None:
            return None
        return math.inf if self.rel_error == 0 else -20 * math.log10(self.rel_error)


@dataclass
class Verification:
    source: str
    quantized: str
    tensors: list[TensorResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # those not about one source weight
    notes: list[str] = field(default_factory=list)  # worth reading, not failures
    formats: dict[str, str] = field(default_factory=dict)  # config group -> format
    size_in: int = 0  # bytes of source tensors
    size_out: int = 0  # bytes of tensors in QUANTIZED
    logits: dict | None = None

    def failures(self) -> list[str]:
        return self.problems + [p for t in self.tensors for p in t.problems]

    @property
    def ok(self) -> bool:
        return not self.failures()


@dataclass(frozen=True)
class VerifyResult:
    """What the verify flow returns: the failure message (None when verify passed),
    counts of weights by status, sizes, the worst weights and where the report is."""

    ok: bool
    message: str | None
    source: str
    quantized: str
    counts: dict[str, int]  # quantized, ignored, copied
    shards: int
    size_in: int
    size_out: int
    problems: int
    worst: tuple[TensorResult, ...]  # the 5 quantized weights worst against their limit
    logits: dict | None
    report: str
    plot: str
    by_group: dict[str, TensorResult] = field(default_factory=dict)  # each group's worst


class VerifyFailed(PtqflowError):
    """A verification that found problems, as the verify flow's Failed state carries it:
    Prefect raises a failed run's data when its result is asked for (a deployment's engine
    always asks), so the data is this error, and `result` holds the whole VerifyResult."""

    def __init__(self, result: VerifyResult):
        super().__init__(result.message)
        self.result = result

    def __reduce__(self):
        return (VerifyFailed, (self.result,))


@dataclass
class Integrity:
    """What the data checks need from `check_integrity`."""

    plan: Plan
    schemes: dict  # config group -> QuantizationScheme
    stored: dict[str, Read]  # output tensor laid out as planned -> where QUANTIZED holds it
    results: dict[str, TensorResult]
    verification: Verification
