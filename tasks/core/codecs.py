"""Pre-quantized sources: which format they use, and their weights dequantized in memory.

DeepSeek-V3/Kimi-K2 publish FP8 blocks with `weight_scale_inv`, others
compressed-tensors or ModelOpt NVFP4 or AutoAWQ. A weight stored quantized is
read with the tensors it depends on (scales, shapes), dequantized to BF16 by
compressed-tensors' own converters and quantized to the target scheme in the
same pass, so no BF16 copy ever lands on disk.

The converters are used one weight at a time: which tensors a weight needs
comes from their `get_dependencies`, what it becomes from their `validate` on
meta tensors (for the plan), its values from `process` (in the quantize task).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from storage.errors import PtqflowError
from tasks.core.records import Read, SourceFormat, Weight

Tensors = dict[str, torch.Tensor]

# --source-format values; "plain" reads every tensor as it is stored.
FORMATS = ("auto", "plain", "fp8-block", "compressed-tensors", "modelopt-nvfp4", "awq")
QUANT_METHODS = {
    "fp8": "fp8-block",
    "compressed-tensors": "compressed-tensors",
    "modelopt": "modelopt-nvfp4",
    "awq": "awq",
}
# Tensors that only a quantized model has; a source holding them must say how it is quantized.
QUANTIZED_LEAVES = ("weight_scale_inv", "weight_packed", "weight_scale_2", "qweight")


def detect_format(
    model_config: dict,
    names: Iterable[str],
    override: str | None = None,
    side_config: dict | None = None,
    settings: dict | None = None,
) -> SourceFormat | None:
    """The source's format from config.json's quantization_config, or `override`.

    `side_config` is ModelOpt's hf_quant_config.json, for checkpoints that keep
    their quantization settings there; `settings` replace the config's keys (a
    converter's own). None means the weights are stored as they are.
    """
    override = None if override in (None, "auto") else override
    if override is not None and override not in FORMATS:
        raise PtqflowError(f"unknown --source-format {override!r}; use one of {', '.join(FORMATS)}")
    qc = model_config.get("quantization_config")
    if qc is None and side_config and "quantization" in side_config:
        qc = {"quant_method": "modelopt", **side_config["quantization"]}
    if override == "plain":
        return None
    if override is None:
        if qc is None:
            leaves = {n.rpartition(".")[2] for n in names}
            found = sorted(leaves & set(QUANTIZED_LEAVES))
            if found:
                raise PtqflowError(
                    f"the source holds quantized tensors (*.{', *.'.join(found)}) but config.json "
                    "has no quantization_config; say how it is stored with --source-format "
                    f"({', '.join(FORMATS[2:])})"
                )
            return None
        method = qc.get("quant_method")
        override = QUANT_METHODS.get(method)
        if override is None:
            raise PtqflowError(
                f"the source is quantized with quant_method {method!r}, which ptqflow cannot "
                f"dequantize; supported: {', '.join(QUANT_METHODS)}. Dequantize it to BF16 "
                "first, or pass --source-format plain to copy its tensors as they are"
            )
    qc = {**(qc or {}), **(settings or {})}
    if override == "fp8-block" and qc.get("quant_method", "fp8") == "fp8":
        if "weight_block_size" not in qc and qc:
            raise PtqflowError(
                "the source is FP8 without weight_block_size (per-tensor FP8); only block FP8 "
                "(DeepSeek-V3/Kimi-K2 style, weight_scale_inv) can be dequantized"
            )
        qc.setdefault("weight_block_size", [128, 128])
    if override == "modelopt-nvfp4":
        algo = qc.get("quant_algo") or qc.get("quantization", {}).get("quant_algo")
        if algo not in (None, "NVFP4"):
            raise PtqflowError(f"ModelOpt {algo} sources are not supported; only NVFP4")
    if override == "compressed-tensors" and "config_groups" not in qc:
        raise PtqflowError("a compressed-tensors source needs config.json's quantization_config")
    return SourceFormat(override, qc)


def _ct_dequantizer(config: dict):
    """compressed-tensors' dequantizer for a quantization_config (it reads one from a folder)."""
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps({"quantization_config": config}))
        return CompressedTensorsDequantizer(d)


class Codec:
    """compressed-tensors' converters for one source format, applied one weight at a time.

    `decode` turns the source tensors of a weight into BF16; `keep` into the
    compressed-tensors form of the source's own scheme (`keep_config`), for
    weights the target leaves unquantized but --keep-source-quantization-for-ignored keeps.
    Converters are built to target every module: which weights are quantized
    in the source is decided from the tensors present (see `decode_weights`).
    """

    def __init__(self, fmt: SourceFormat):
        from compressed_tensors.entrypoints.convert import converters as c

        every = ("re:.*",)
        self.fmt = fmt
        if fmt.name == "fp8-block":
            block = tuple(fmt.config["weight_block_size"])
            self.decoders = [c.FP8BlockDequantizer(targets=every, weight_block_size=block)]
            self.keepers = [Fp8BlockToCompressed()]
            self.keep_config = _fp8_block_config(block)
        elif fmt.name == "compressed-tensors":
            self.decoders = [_ct_dequantizer(fmt.config)]
            self.keepers = []
            self.keep_config = fmt.config
        elif fmt.name == "modelopt-nvfp4":
            to_ct = c.ModelOptNvfp4Converter(targets=every)
            self.keep_config = to_ct.update_config(None).model_dump()
            self.decoders = [to_ct, _ct_dequantizer(self.keep_config)]
            self.keepers = [to_ct]
        elif fmt.name == "awq":
            to_ct = c.AutoAWQConverter.from_autoawq_config(fmt.config, targets=("Linear",))
            self.keep_config = to_ct.update_config(None).model_dump()
            self.decoders = [to_ct, _ct_dequantizer(self.keep_config)]
            self.keepers = [to_ct]
        else:
            raise PtqflowError(f"unknown source format {fmt.name!r}")

    def group_of(self, module: str) -> str | None:
        """The source config group a module is in (compressed-tensors sources have several)."""
        if self.fmt.name != "compressed-tensors":
            return None
        from compressed_tensors.utils.match import match_name

        for name, scheme in self.fmt.config["config_groups"].items():
            if any(match_name(module, t) for t in scheme.get("targets", ())):
                return name
        return None

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
        if self.fmt.name == "awq":
            # AutoAWQ's validate gives names only and its process does not run on meta:
            # convert zeros of these shapes (the plan caches one result per shape).
            zeros = {n: torch.zeros(t.shape, dtype=t.dtype) for n, t in tensors.items()}
            out = self._chain(converters, zeros, meta=False, keep=keep)
            return {n: t.to("meta") for n, t in out.items()}
        return self._chain(converters, dict(tensors), meta=True, keep=keep)


class Fp8BlockToCompressed:
    """DeepSeek-style FP8 blocks as compressed-tensors stores FP8_BLOCK: the
    multiplier DeepSeek names `weight_scale_inv` is what compressed-tensors calls `weight_scale`."""

    def process(self, tensors: Tensors) -> Tensors:
        return {
            n.removesuffix("_inv") if n.endswith(".weight_scale_inv") else n: t
            for n, t in tensors.items()
        }

    validate = process


def _fp8_block_config(block: tuple[int, int]) -> dict:
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import FP8_BLOCK

    weights = FP8_BLOCK["weights"].model_copy(update={"block_structure": list(block)})
    group = {**FP8_BLOCK, "weights": weights, "targets": ["Linear"], "format": "float-quantized"}
    return QuantizationConfig(config_groups={"group_0": group}).model_dump()


# Per-activation and KV-cache scales of a quantized source: meaningless once its
# weights are re-quantized with another scheme, so they are not written.
ACTIVATION_LEAVES = frozenset(
    f"{kind}_{p}" for kind in ("input", "output") for p in ("scale", "global_scale", "zero_point")
) | {"k_scale", "v_scale"}
# Weight-side tensors of a quantized source: each belongs to a quantized weight.
WEIGHT_QPARAM_LEAVES = frozenset(
    {
        "weight_scale",
        "weight_scale_inv",
        "weight_scale_2",
        "weight_global_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_packed",
        "qweight",
        "qzeros",
        "scales",
    }
)


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
