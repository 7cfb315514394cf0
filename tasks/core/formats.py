"""The pre-quantized source formats ptqflow dequantizes, one registry: everything about each.

A format is registered here, and only here, with what names and detects it
(its `--source-format` name, config.json's `quant_method`, a tensor only its
checkpoints hold), the compressed-tensors converter `model_free_ptq` accepts for
it and that converter's settings, the checks of its quantization_config, and
the converters that decode its weights (`converters`). The CLI's choices, the
flow's converter table, codecs.py's detection and docs/prequantized.md's table come from it.

Nothing here imports torch or compressed-tensors until a format is used, so the
CLI reads the names at once (`ptqflow --help`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from storage.errors import PtqflowError
from tasks.core.registry import Registry

__all__ = [
    "AutoAwq",
    "CompressedTensors",
    "Converters",
    "Format",
    "Fp8Block",
    "Fp8BlockToCompressed",
    "ModelOptNvfp4",
    "by_quant_method",
    "side_files",
    "source_formats",
]

_EVERY = ("re:.*",)  # converters target every module: the tensors present say what is quantized


@dataclass(frozen=True)
class Converters:
    """compressed-tensors' converters of one source: `decoders` turn a weight's tensors into
    BF16, `keepers` into the compressed-tensors form of the source's own scheme
    (`keep_config`), for weights kept in the source's quantization."""

    decoders: list
    keepers: list
    keep_config: dict


class Format(Registry):
    """One pre-quantized source format."""

    what = "source format"
    quant_method: ClassVar[str]  # config.json's quantization_config.quant_method
    converter: ClassVar[str]  # the compressed-tensors converter class model_free_ptq takes
    settings: ClassVar[tuple[str, ...]] = ()  # its attributes that replace config.json's keys
    marker: ClassVar[str]  # a tensor leaf only a checkpoint in this format holds
    leaves: ClassVar[frozenset[str]]  # the leaves of its weights' tensors (scales, packs, ...)
    side_file: ClassVar[str | None] = None  # a file that may hold its settings instead
    plans_on_meta: ClassVar[bool] = True  # its converters' `validate` gives shapes on meta
    detected: ClassVar[str]  # docs/prequantized.md's "detected from"
    examples: ClassVar[str]  # docs/prequantized.md's examples

    def settle(self, config: dict) -> dict:
        """The source's quantization_config, checked and completed (raises naming a
        variant ptqflow cannot dequantize)."""
        return config

    def from_side(self, data: dict) -> dict | None:
        """The quantization_config `side_file` holds, if it holds one."""
        return None

    def converters(self, config: dict) -> Converters:
        raise NotImplementedError

    def group_of(self, config: dict, module: str) -> str | None:
        """The source config group `module` is in, for formats with several."""
        return None


def source_formats() -> tuple[str, ...]:
    """The --source-format values: "auto" detects, "plain" reads every tensor as stored."""
    return ("auto", "plain", *(f.name for f in Format.registered()))


def side_files() -> tuple[str, ...]:
    return tuple(f.side_file for f in Format.registered() if f.side_file)


def by_quant_method(method) -> Format:
    """The format config.json's quant_method names."""
    for fmt in Format.registered():
        if fmt.quant_method == method:
            return fmt
    raise PtqflowError(
        f"the source is quantized with quant_method {method!r}, which ptqflow cannot "
        f"dequantize; supported: {', '.join(f.quant_method for f in Format.registered())}. "
        "Dequantize it to BF16 first, or pass --source-format plain to copy its tensors as "
        "they are"
    )


@Format.register("fp8-block")
class Fp8Block(Format):
    quant_method, converter, settings = "fp8", "FP8BlockDequantizer", ("weight_block_size",)
    marker, leaves = "weight_scale_inv", frozenset({"weight_scale_inv"})
    detected = "`quant_method: fp8` with `weight_block_size` (`weight_scale_inv` tensors)"
    examples = "DeepSeek-V3/R1, Kimi-K2"

    def settle(self, config: dict) -> dict:
        if config.get("quant_method", "fp8") == "fp8":
            if "weight_block_size" not in config and config:
                raise PtqflowError(
                    "the source is FP8 without weight_block_size (per-tensor FP8); only block "
                    "FP8 (DeepSeek-V3/Kimi-K2 style, weight_scale_inv) can be dequantized"
                )
            config.setdefault("weight_block_size", [128, 128])
        return config

    def converters(self, config: dict) -> Converters:
        from compressed_tensors.entrypoints.convert.converters import FP8BlockDequantizer
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.quantization.quant_scheme import FP8_BLOCK

        block = tuple(config["weight_block_size"])
        weights = FP8_BLOCK["weights"].model_copy(update={"block_structure": list(block)})
        group = {
            **FP8_BLOCK,
            "weights": weights,
            "targets": ["Linear"],
            "format": "float-quantized",
        }
        keep = QuantizationConfig(config_groups={"group_0": group})
        return Converters(
            [FP8BlockDequantizer(targets=_EVERY, weight_block_size=block)],
            [Fp8BlockToCompressed()],
            keep.model_dump(),
        )


class Fp8BlockToCompressed:
    """DeepSeek-style FP8 blocks as compressed-tensors stores FP8_BLOCK: the
    multiplier DeepSeek names `weight_scale_inv` is what compressed-tensors calls `weight_scale`."""

    def process(self, tensors: dict[str, Any]) -> dict[str, Any]:
        return {
            n.removesuffix("_inv") if n.endswith(".weight_scale_inv") else n: t
            for n, t in tensors.items()
        }

    validate = process


def _ct_dequantizer(config: dict):
    """compressed-tensors' dequantizer for a quantization_config (it reads one from a folder)."""
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps({"quantization_config": config}))
        return CompressedTensorsDequantizer(d)


@Format.register("compressed-tensors")
class CompressedTensors(Format):
    quant_method, converter = "compressed-tensors", "CompressedTensorsDequantizer"
    marker = "weight_packed"
    leaves = frozenset(
        {"weight_scale", "weight_global_scale", "weight_zero_point", "weight_shape", marker}
    )
    detected = "`quant_method: compressed-tensors`"
    examples = "Kimi-K2.6 INT4, llm-compressor and ptqflow outputs"

    def settle(self, config: dict) -> dict:
        if "config_groups" not in config:
            raise PtqflowError(
                "a compressed-tensors source needs config.json's quantization_config"
            )
        return config

    def converters(self, config: dict) -> Converters:
        return Converters([_ct_dequantizer(config)], [], config)

    def group_of(self, config: dict, module: str) -> str | None:
        from compressed_tensors.utils.match import match_name

        for name, scheme in config["config_groups"].items():
            if any(match_name(module, t) for t in scheme.get("targets", ())):
                return name
        return None


@Format.register("modelopt-nvfp4")
class ModelOptNvfp4(Format):
    quant_method, converter = "modelopt", "ModelOptNvfp4Converter"
    marker, leaves = "weight_scale_2", frozenset({"weight_scale", "weight_scale_2"})
    side_file = "hf_quant_config.json"
    detected = "`quant_method: modelopt`, `quant_algo: NVFP4` (or `hf_quant_config.json`)"
    examples = "NVIDIA's `*-FP4` checkpoints"

    def settle(self, config: dict) -> dict:
        algo = config.get("quant_algo") or config.get("quantization", {}).get("quant_algo")
        if algo not in (None, "NVFP4"):
            raise PtqflowError(f"ModelOpt {algo} sources are not supported; only NVFP4")
        return config

    def from_side(self, data: dict) -> dict | None:
        if "quantization" not in data:
            return None
        return {"quant_method": self.quant_method, **data["quantization"]}

    def converters(self, config: dict) -> Converters:
        from compressed_tensors.entrypoints.convert.converters import ModelOptNvfp4Converter

        to_ct = ModelOptNvfp4Converter(targets=_EVERY)
        keep = to_ct.update_config(None).model_dump()
        return Converters([to_ct, _ct_dequantizer(keep)], [to_ct], keep)


@Format.register("awq")
class AutoAwq(Format):
    quant_method, converter = "awq", "AutoAWQConverter"
    settings = ("bits", "group_size", "zero_point", "version")
    marker, leaves = "qweight", frozenset({"qweight", "qzeros", "scales"})
    plans_on_meta = False  # AutoAWQ's validate gives names only, its process needs data
    detected = "`quant_method: awq` (GEMM)"
    examples = "AutoAWQ checkpoints"

    def converters(self, config: dict) -> Converters:
        from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter

        to_ct = AutoAWQConverter.from_autoawq_config(config, targets=("Linear",))
        keep = to_ct.update_config(None).model_dump()
        return Converters([to_ct, _ct_dequantizer(keep)], [to_ct], keep)
