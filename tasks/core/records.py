"""Typed records that travel between stages (and processes) instead of tensors.

A `PlanRequest` is what a run plans from. The plan says what every output
shard holds: a `Read` names the exact byte range of a source tensor, so a
quantize task needs no header parsing and can read a fused partner from any
source shard. A `Manifest` says what a finished shard is; a `Summary` what a
run did.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from storage.safetensors import TensorSpec

__all__ = [
    "ROTATION_KEY",
    "Manifest",
    "Plan",
    "PlanRequest",
    "Read",
    "Report",
    "ResidualRotation",
    "Rotation",
    "ShardPlan",
    "SourceFormat",
    "Summary",
    "Unit",
    "View",
    "Weight",
]

ROTATION_KEY = "ptqflow_rotation"  # config.json: how the residual stream was rotated


@dataclass(frozen=True)
class PlanRequest:
    """What a quantize run plans from: plan_checkpoint's arguments, one record that the CLI
    and the flow build alike from the flow's parameters, so the plan the CLI makes for its
    checks is the one the flow takes (tasks/plan.py `planned`).

    `config` is a resolved QuantizationConfig; `rotate` "none" or a rotation's kind.
    """

    source: str
    config: Any
    include_other_weights: bool = False
    revision: str | None = None
    source_format: str | None = None
    keep_source_quantization: bool = False
    source_settings: dict | None = None
    rotate: str | None = None

    @property
    def options(self) -> dict[str, Any]:
        """plan_checkpoint's keyword arguments (all but source and config)."""
        return {f.name: getattr(self, f.name) for f in fields(self)[2:]}

    def key(self) -> str:
        """The request as JSON: equal requests, equal keys."""
        every = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps(every, default=lambda c: c.model_dump(mode="json"), sort_keys=True)


@dataclass(frozen=True)
class Read:
    """A tensor (or a row range of a 3-D expert tensor) in a source file."""

    file: str
    tensor: str
    start: int  # absolute byte offsets in `file`
    stop: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class View:
    """A weight cut from the matrix its Read holds: columns `start:stop`, transposed when
    the source stores inputs first (tasks/core/layouts.py)."""

    start: int
    stop: int
    transpose: bool = False


@dataclass(frozen=True)
class Rotation:
    """How a weight is rotated (tasks/core/rotate.py): `side` "in" (W·diag(norm)·Q), "out"
    (Qᵀ·W) or "ones" (a norm folded into the linears it feeds); Q of `size`, built from
    `block`-wide Hadamard blocks and the signs of `seed`."""

    side: str
    size: int
    block: int
    seed: int = 0


@dataclass(frozen=True)
class ResidualRotation:
    """How a plan rotates the residual stream (tasks/core/rotate.py): `kind` with Hadamard
    blocks of `block` and the signs of `seed`; `untied`: a tied lm_head got a weight of its
    own. config.json records it for verify (`write_into`)."""

    kind: str
    block: int
    seed: int = 0
    untied: bool = False

    @property
    def callout(self) -> str:
        """What the plan's report says of it."""
        return (
            f"the residual stream is rotated ({self.kind}, blocks of {self.block}): norms are "
            "folded into the weights they feed and set to 1"
            + (", and the tied lm_head is untied" * self.untied)
        )

    def write_into(self, model_config: dict) -> None:
        """Record the rotation in a config.json mapping, as the rotated checkpoint's."""
        model_config[ROTATION_KEY] = asdict(self)
        if self.untied:
            model_config["tie_word_embeddings"] = False


@dataclass(frozen=True)
class Weight:
    """One output weight: `name` is its tensor name in the output (before compression).

    A weight the source stores quantized is read from its main tensor `read` and
    the tensors it is decoded with (`deps`: scales, shapes). `decoded` is its
    dtype and shape once dequantized; None keeps it in the source's format.
    A rotated weight (`rotation`) reads the norm folded into it too (`norm`).
    One expert cut from a 3-D tensor is `view` of what `read` holds; its compressed
    tensors are named `out` + key where its loader names them so (gpt-oss's
    `experts.N.w13_weight_packed`), less the keys in `skip` it cannot load.
    """

    name: str
    read: Read
    deps: tuple[Read, ...] = ()
    decoded: tuple[str, tuple[int, ...]] | None = None
    rotation: Rotation | None = None
    norm: Read | None = None
    view: View | None = None
    out: str | None = None
    skip: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    def output(self, key: str) -> str:
        """The output name of one of its compressed tensors (`weight_packed`, ...)."""
        return f"{self.out}{key}" if self.out else f"{self.module}.{key}"

    @property
    def reads(self) -> tuple[Read, ...]:
        return (self.read, *self.deps, *((self.norm,) if self.norm else ()))

    @property
    def encoded(self) -> bool:
        """Stored quantized in the source."""
        return bool(self.deps)

    @property
    def dtype(self) -> str:
        return self.decoded[0] if self.decoded else self.read.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        if self.decoded:
            return self.decoded[1]
        if self.view:
            rows, cols = self.read.shape[0], self.view.stop - self.view.start
            return (cols, rows) if self.view.transpose else (rows, cols)
        return self.read.shape


@dataclass(frozen=True)
class Unit:
    """Weights processed together: a fused set sharing one global scale, or one tensor.

    `group` is the config group that quantizes them, or None to copy unchanged.
    """

    weights: tuple[Weight, ...]
    group: str | None


@dataclass(frozen=True)
class SourceFormat:
    """How a pre-quantized source stores its weights: `name` is a format registered in
    tasks/core/formats.py, `config` the source's quantization_config (settled by it)."""

    name: str
    config: dict


@dataclass
class ShardPlan:
    name: str
    units: list[Unit]
    specs: list[TensorSpec]
    source_format: SourceFormat | None = None  # None: the source is not quantized

    @property
    def files(self) -> list[str]:
        """Source files this shard reads from."""
        return sorted({r.file for u in self.units for w in u.weights for r in w.reads})

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this shard writes."""
        return sum(s.nbytes for s in self.specs)

    @property
    def bytes_in(self) -> int:
        """Bytes of source tensor data this shard reads."""
        return sum(r.stop - r.start for u in self.units for w in u.weights for r in w.reads)


@dataclass
class Plan:
    source: str
    config: dict | None  # quantization_config for config.json; None copies config.json as is
    shards: list[ShardPlan]
    other_files: list[str]
    fingerprints: dict[str, str] = field(default_factory=dict)  # source file -> version
    source_format: SourceFormat | None = None
    rotation: ResidualRotation | None = None
    source_size: int = 0  # bytes of the source's tensors

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {spec.name: s.name for s in self.shards for spec in s.specs}


@dataclass
class Report:
    """What a plan found, for `ptqflow plan` and for errors."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)  # ignore patterns that skip the problems
    suggestions: list[str] = field(default_factory=list)  # layers usually left unquantized
    callouts: list[str] = field(default_factory=list)  # warnings: what was not asked for
    notes: list[str] = field(default_factory=list)  # what was asked for, said once
    source_format: str = "plain"  # how the source stores its weights


@dataclass(frozen=True)
class Manifest:
    """One finished output shard: what was written, and how long each stage took.

    The quantize stage fills name, size, bytes_in, seconds and stages; the
    upload stage adds `digest` ("xxh3_128:HEX" for a local DEST, else
    "sha256:HEX") and `stamp` (DEST's cheap change marker: mtime or ETag),
    which a resumed run checks the file against; `cached` says the run found
    it done.
    """

    name: str
    size: int
    bytes_in: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    digest: str | None = None
    stamp: str | None = None
    cached: bool = False


@dataclass(frozen=True)
class Summary:
    """What a quantize run did, shard by shard."""

    destination: str
    shards: list[Manifest]
    total_size: int
    seconds: float
    verify: Any = None  # tasks.core.verify's VerifyResult, with --verify
    serve: str = ""  # the `vllm serve` line for the output

    @property
    def cached(self) -> int:
        return sum(m.cached for m in self.shards)

    @property
    def quantized(self) -> int:
        return len(self.shards) - self.cached
