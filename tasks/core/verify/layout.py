"""The tensors vLLM's compressed-tensors loader creates for a quantized Linear, and the check
that QUANTIZED stores each quantized weight that way."""

from __future__ import annotations

from collections import defaultdict

from tasks.core.quant.kinds import scheme_format
from tasks.core.records import Read
from tasks.core.verify.records import TensorResult

__all__ = [
    "FLOAT_SCALES",
    "check_vllm_layout",
    "vllm_layout",
]

FLOAT_SCALES = ("F32", "F16", "BF16")  # vLLM copies these into its own float scale parameter


def vllm_layout(fmt: str, args, rows: int, cols: int) -> dict[str, tuple] | None:
    """What vLLM's compressed-tensors schemes create for one Linear of this format:
    local name -> (dtypes it loads, shape); None for formats not covered.

    From vLLM's create_weights of CompressedTensorsW8A8Fp8 / W8A16Fp8 / W8A8Int8
    (naive/int/float-quantized), WNA16 / WNA8Int (pack-quantized), W4A16Fp4
    (nvfp4), W4A16Mxfp4 and W8A8Mxfp8, written down independently of
    compressed-tensors so a layout change on either side shows up here.
    """
    from compressed_tensors.quantization import QuantizationStrategy as S

    if args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        scale: tuple = (-(-rows // bh), -(-cols // bw))
    elif args.strategy in (S.GROUP, S.TENSOR_GROUP):
        scale = (rows, cols // args.group_size)
    elif args.strategy == S.CHANNEL:
        scale = (rows, 1)
    else:
        scale = (1,)
    if fmt in ("naive-quantized", "int-quantized", "float-quantized"):
        dtype = "F8_E4M3" if args.type == "float" else "I8"
        return {"weight": ((dtype,), (rows, cols)), "weight_scale": (FLOAT_SCALES, scale)}
    if fmt == "pack-quantized":
        bits = args.num_bits
        out = {
            "weight_packed": (("I32",), (rows, -(-cols * bits // 32))),
            "weight_scale": (FLOAT_SCALES, scale),
            "weight_shape": (("I64",), (2,)),
        }
        if not args.symmetric:
            out["weight_zero_point"] = (("I32",), (-(-rows * bits // 32), scale[-1]))
        return out
    if fmt == "nvfp4-pack-quantized":
        return {
            "weight_packed": (("U8",), (rows, cols // 2)),
            "weight_scale": (("F8_E4M3",), scale),
            "weight_global_scale": (("F32",), (1,)),
        }
    if fmt == "mxfp4-pack-quantized":
        return {"weight_packed": (("U8",), (rows, cols // 2)), "weight_scale": (("U8",), scale)}
    if fmt == "mxfp8-quantized":
        return {"weight": (("F8_E4M3",), (rows, cols)), "weight_scale": (("U8",), scale)}
    return None


def check_vllm_layout(
    results: dict[str, TensorResult], schemes: dict, stored: dict[str, Read]
) -> None:
    """Each quantized weight stored as planned must also have the layout vLLM loads."""
    by_prefix: dict[str, dict[str, Read]] = defaultdict(dict)
    for name, loc in stored.items():
        module, _, local = name.rpartition(".")
        by_prefix[f"{module}."][local] = loc
        if "_" in local:  # gpt-oss's experts.N.w13_weight_packed: prefix w13_
            head, _, key = local.partition("_")
            by_prefix[f"{module}.{head}_"][key] = loc
    for r in results.values():
        if r.status != "quantized" or r.problems:
            continue
        scheme = schemes[r.group]
        fmt = scheme_format(scheme)
        want = vllm_layout(fmt, scheme.weights, *r.shape)
        if want is None:
            continue
        want = {k: v for k, v in want.items() if k not in r.skip}
        # the module's other tensors (bias, ...) are source tensors of their own
        got = {
            k: loc
            for k, loc in by_prefix[r.prefix].items()
            if r.prefix + k == r.name or r.prefix + k not in results
        }
        if r.prefix.endswith("_"):  # the prefix's own keys only (w13_ but not w13_bias)
            got = {k: loc for k, loc in got.items() if k in want}
        for key in sorted(want.keys() | got.keys()):
            if key not in got or key not in want:
                where = "lacks" if key not in got else "has an extra"
                r.problems.append(
                    f"{r.prefix}{key}: QUANTIZED {where} {key}; vLLM's {fmt} "
                    f"loader creates {sorted(want)}"
                )
                continue
            dtypes, shape = want[key]
            if got[key].dtype not in dtypes or got[key].shape != shape:
                r.problems.append(
                    f"{r.prefix}{key}: vLLM's {fmt} loader expects {'/'.join(dtypes)} "
                    f"{list(shape)}, QUANTIZED holds {got[key].dtype} {list(got[key].shape)}"
                )
