"""The plan: small, serialisable descriptions of what every output shard holds.

Plans travel between tasks (and processes) instead of tensors. A `Read` names
the exact byte range of a source tensor, so a quantize task needs no header
parsing and can read a fused partner from any source shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.safetensors import TensorSpec


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
class Weight:
    """One output weight: `name` is its tensor name in the output (before compression)."""

    name: str
    read: Read

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]


@dataclass(frozen=True)
class Unit:
    """Weights processed together: a fused set sharing one global scale, or one tensor.

    `group` is the config group that quantizes them, or None to copy unchanged.
    """

    weights: tuple[Weight, ...]
    group: str | None


@dataclass
class ShardPlan:
    name: str
    units: list[Unit]
    specs: list[TensorSpec]

    @property
    def files(self) -> list[str]:
        """Source files this shard reads from."""
        return sorted({w.read.file for u in self.units for w in u.weights})

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this shard writes."""
        return sum(s.nbytes for s in self.specs)

    @property
    def bytes_in(self) -> int:
        """Bytes of source tensor data this shard reads."""
        return sum(w.read.stop - w.read.start for u in self.units for w in u.weights)


@dataclass
class Plan:
    source: str
    config: dict | None  # quantization_config for config.json; None copies config.json as is
    shards: list[ShardPlan]
    other_files: list[str]
    fingerprints: dict[str, str] = field(default_factory=dict)  # source file -> version

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {spec.name: s.name for s in self.shards for spec in s.specs}
