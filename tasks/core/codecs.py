"""Pre-quantized sources: which format they use, and their weights dequantized in memory.

DeepSeek-V3/Kimi-K2 publish FP8 blocks with `weight_scale_inv`, others
compressed-tensors or ModelOpt NVFP4 or AutoAWQ. A weight stored quantized is
read with the tensors it depends on (scales, shapes), dequantized to BF16 by
compressed-tensors' own converters and quantized to the target scheme in the
same pass, so no BF16 copy ever lands on disk.

The converters are used one weight at a time: which tensors a weight needs
comes from their `get_dependencies`, what it becomes from their `validate` on
meta tensors (for the plan), its values from `process` (in the quantize task).
Each format, its detection and its converters are registered in formats.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from storage.errors import PtqflowError
from tasks.core.formats import Format, by_quant_method, source_formats
from tasks.core.records import Read, SourceFormat, Weight

__all__ = [
    "ACTIVATION_LEAVES",
    "WEIGHT_QPARAM_LEAVES",
    "Codec",
    "decode_weights",
    "detect_format",
    "meta",
]

Tensors = dict[str, torch.Tensor]


def detect_format(
    model_config: dict,
    names: Iterable[str],
    override: str | None = None,
    side_configs: dict[str, dict] | None = None,
    settings: dict | None = None,
) -> SourceFormat | None:
    """The source's format from config.json's quantization_config, or `override`.

    `side_configs` are the source's formats' side files (formats.side_files) by
    name, for checkpoints that keep their quantization settings there (ModelOpt's
    hf_quant_config.json); `settings` replace the config's keys (a converter's
    own). None means the weights are stored as they are.
    """
    choices = source_formats()
    override = None if override in (None, "auto") else override
    if override is not None and override not in choices:
        raise PtqflowError(f"unknown --source-format {override!r}; use one of {', '.join(choices)}")
    qc = model_config.get("quantization_config")
    for fmt in Format.registered():
        if qc is None and fmt.side_file in (side_configs or {}):
            qc = fmt.from_side(side_configs[fmt.side_file])
    if override == "plain":
        return None
    if override is None:
        if qc is None:
            leaves = {n.rpartition(".")[2] for n in names}
            found = sorted(leaves & {f.marker for f in Format.registered()})
            if found:
                raise PtqflowError(
                    f"the source holds quantized tensors (*.{', *.'.join(found)}) but config.json "
                    "has no quantization_config; say how it is stored with --source-format "
                    f"({', '.join(choices[2:])})"
                )
            return None
        override = by_quant_method(qc.get("quant_method")).name
    fmt = Format.get(override)
    return SourceFormat(fmt.name, fmt.settle({**(qc or {}), **(settings or {})}))


class Codec:
    """compressed-tensors' converters for one source format, applied one weight at a time.

    `decode` turns the source tensors of a weight into BF16; `keep` into the
    compressed-tensors form of the source's own scheme (`keep_config`), for
    weights the target leaves unquantized but --keep-source-quantization-for-ignored keeps.
    Converters are built to target every module: which weights are quantized
    in the source is decided from the tensors present (see `decode_weights`).
    """

    def __init__(self, fmt: SourceFormat):
        self.fmt = fmt
        self.format = Format.get(fmt.name)
        converters = self.format.converters(fmt.config)
        self.decoders, self.keepers = converters.decoders, converters.keepers
        self.keep_config = converters.keep_config

    def group_of(self, module: str) -> str | None:
        """The source config group a module is in (compressed-tensors sources have several)."""
        return self.format.group_of(self.fmt.config, module)

    def dependencies(self, name: str) -> set[str]:
        """Every tensor the converters need besides `name` to convert it."""
        out: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            for conv in self.decoders:
                for dep in conv.get_dependencies(current) - out - {name}:
                    out.add(dep)
                    todo.append(dep)
        return out

    @staticmethod
    def _chain(converters, tensors: Tensors, meta: bool, keep: bool = False) -> Tensors:
        """`tensors` through `converters`; without their activation scales unless `keep`
        (a dequantized weight has no use for them, a kept one is served with them)."""
        for conv in converters:
            tensors = conv.validate(tensors) if meta else conv.process(tensors)
            if not keep:
                tensors = {
                    n: t
                    for n, t in tensors.items()
                    if n.rpartition(".")[2] not in ACTIVATION_LEAVES
                }
        return tensors

    def decode(self, tensors: Tensors) -> torch.Tensor:
        """The dequantized weight of one weight's source tensors."""
        (out,) = self._chain(self.decoders, dict(tensors), meta=False).values()
        return out

    def keep(self, tensors: Tensors) -> Tensors:
        """One weight's source tensors in compressed-tensors form."""
        return self._chain(self.keepers, dict(tensors), meta=False, keep=True)

    def plan(self, tensors: Tensors, keep: bool) -> Tensors:
        """What `decode` (or `keep`) gives for these meta tensors, without reading data."""
        converters = self.keepers if keep else self.decoders
        if not self.format.plans_on_meta:
            # e.g. AutoAWQ's validate gives names only and its process does not run on meta:
            # convert zeros of these shapes (the plan caches one result per shape).
            zeros = {n: torch.zeros(t.shape, dtype=t.dtype) for n, t in tensors.items()}
            out = self._chain(converters, zeros, meta=False, keep=keep)
            return {n: t.to("meta") for n, t in out.items()}
        return self._chain(converters, dict(tensors), meta=True, keep=keep)


# Per-activation and KV-cache scales of a quantized source: meaningless once its
# weights are re-quantized with another scheme, so they are not written.
ACTIVATION_LEAVES = frozenset(
    f"{kind}_{p}" for kind in ("input", "output") for p in ("scale", "global_scale", "zero_point")
) | {"k_scale", "v_scale"}
# Weight-side tensors of a quantized source: each belongs to a quantized weight.
WEIGHT_QPARAM_LEAVES = frozenset().union(*(f.leaves for f in Format.registered()))


def meta(reads: Iterable[Read]) -> Tensors:
    """Meta tensors standing for the source tensors `reads`."""
    from storage.safetensors import DTYPES

    return {r.tensor: torch.empty(r.shape, dtype=DTYPES[r.dtype], device="meta") for r in reads}


def decode_weights(
    per_file: dict[str, list[Weight]], codec: Codec
) -> tuple[dict[str, list[Weight]], list[Weight], list[str]]:
    """Per source file, its weights with every quantized one replaced by what it decodes to.

    Returns (per_file, dropped, problems): `dropped` holds the activation and
    KV-cache scales left out, `problems` the tensors that cannot be decoded.
    """
    from dataclasses import replace

    from storage.safetensors import DTYPE_NAMES

    by_name = {w.name: w for ws in per_file.values() for w in ws}
    deps = {n: d for n in by_name if (d := codec.dependencies(n) & by_name.keys())}
    consumed = set().union(*deps.values())
    cache: dict[tuple, tuple | str] = {}
    out, dropped, problems = {}, [], []
    for file, weights in per_file.items():
        kept = []
        for w in weights:
            leaf = w.name.rpartition(".")[2]
            if w.name in consumed:
                continue
            if w.name not in deps:
                if leaf in ACTIVATION_LEAVES:
                    dropped.append(w)
                elif leaf in WEIGHT_QPARAM_LEAVES:
                    problems.append(
                        f"{w.name} belongs to no quantized weight of the source "
                        f"({codec.fmt.name}); is a tensor missing?"
                    )
                else:
                    kept.append(w)
                continue
            reads = tuple(by_name[d].read for d in sorted(deps[w.name]))
            module = w.name.rpartition(".")[0]
            key = (codec.group_of(module),) + tuple(
                (r.tensor.rpartition(".")[2], r.dtype, r.shape) for r in (w.read, *reads)
            )
            if key not in cache:
                try:
                    (name, t), *more = codec.plan(meta((w.read, *reads)), keep=False).items()
                    if more:
                        raise ValueError(f"decodes to {len(more) + 1} tensors")
                    cache[key] = (name.rpartition(".")[2], DTYPE_NAMES[t.dtype], tuple(t.shape))
                except (ValueError, KeyError, RuntimeError, TypeError) as e:
                    cache[key] = str(e) or type(e).__name__
            result = cache[key]
            if isinstance(result, str):
                problems.append(f"{w.name} cannot be dequantized as {codec.fmt.name}: {result}")
                continue
            out_leaf, dtype, shape = result
            kept.append(replace(w, name=f"{module}.{out_leaf}", deps=reads, decoded=(dtype, shape)))
        out[file] = kept
    return out, dropped, problems
