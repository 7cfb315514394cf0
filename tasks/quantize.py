"""Quantize weights with compressed-tensors and stream them into output shards.

Quantization parameters are computed exactly as llm-compressor's min-max weight
observer does (same reshapes, same dtypes), then compressed-tensors' own
`calculate_qparams`, `generate_gparam` and compressor classes produce the
stored tensors, so the bytes are those compressed-tensors produces itself.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import BinaryIO

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.safetensors import DTYPE_NAMES, DTYPES, ShardWriter, read_tensor, sha256_file
from tasks.errors import PtqflowError
from tasks.plan import ShardPlan

Tensors = dict[str, torch.Tensor]


def observe(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `weight` per scale element (llm-compressor's min-max observer)."""
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    if args.strategy == S.TENSOR:
        flat = weight.reshape(1, 1, -1)
    elif args.strategy == S.CHANNEL:
        flat = weight.unsqueeze(-2).unsqueeze(0)
    elif args.strategy in (S.GROUP, S.TENSOR_GROUP):
        if weight.shape[-1] % args.group_size:
            raise ValueError(
                f"{weight.shape[-1]} columns are not divisible by group size {args.group_size}"
            )
        flat = weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    elif args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(weight, tuple(args.block_structure))
        rows, cols = padded.shape
        flat = padded.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2).flatten(-2, -1)
        flat = flat.unsqueeze(0)
    else:
        raise ValueError(f"strategy {args.strategy} cannot be applied to weights")
    return torch.amin(flat, dim=(0, -1)), torch.amax(flat, dim=(0, -1))


def scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """dtype compressed-tensors gives a weight's scale parameter before compression."""
    if weight_dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return weight_dtype
    return torch.float16


@torch.no_grad()
def quantize_weights(weights: list[torch.Tensor], scheme) -> list[Tensors]:
    """Compressed state dicts (local names: weight_packed, weight_scale, ...) of `weights`.

    The weights share one global scale when the scheme has one (NVFP4): pass
    all members of a fused set together.
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    from tasks.schemes import scheme_format

    args = scheme.weights
    stats = [observe(w, args) for w in weights]
    global_scale = None
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:
        absmax = stats[0][1].max()
        for lo, hi in stats:
            absmax = torch.max(absmax, -lo.min())
            absmax = torch.max(absmax, hi.max())
        global_scale = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
    compressor = BaseCompressor.get_value_from_registry(scheme_format(scheme))
    out = []
    for w, (lo, hi) in zip(weights, stats, strict=True):
        scale, zero_point = calculate_qparams(lo, hi, args, global_scale=global_scale)
        state = {"weight": w, "weight_scale": scale.to(scale_dtype(w.dtype))}
        if not args.symmetric:
            state["weight_zero_point"] = zero_point.to(args.zp_dtype)
        if global_scale is not None:
            state["weight_global_scale"] = global_scale.to(torch.float32)
        out.append(compressor.compress(state, scheme))
    return out


def write_shard(
    shard: ShardPlan,
    open_source: Callable[[str], BinaryIO],
    out_dir: Path,
    schemes: dict,
    device: str | torch.device = "cpu",
) -> dict:
    """Write one output shard into `out_dir`, tensor by tensor; returns its manifest.

    `open_source(file)` opens a source file for reading; `schemes` maps config
    group -> QuantizationScheme. Only the tensors of one unit (one weight, or
    one fused set) are in memory at a time.
    """
    device = torch.device(device)
    start = time.monotonic()
    try:
        with ExitStack() as stack:
            files = {name: stack.enter_context(open_source(name)) for name in shard.files}
            writer = stack.enter_context(ShardWriter(out_dir / shard.name, shard.specs))
            for unit in shard.units:
                tensors = [
                    read_tensor(files[w.read.file], w.read.start, w.read.stop, w.read.dtype,
                                w.read.shape)
                    for w in unit.weights
                ]  # fmt: skip
                if unit.group is None:
                    for w, t in zip(unit.weights, tensors, strict=True):
                        writer.write(w.name, t)
                    continue
                tensors = [t.to(device, non_blocking=True) for t in tensors]
                states = quantize_weights(tensors, schemes[unit.group])
                for w, state in zip(unit.weights, states, strict=True):
                    for key, value in state.items():
                        writer.write(f"{w.module}.{key}", value)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise PtqflowError(
                f"disk full while writing {out_dir / shard.name}; free space and run the same "
                "command again: finished shards are kept"
            ) from None
        raise
    path = out_dir / shard.name
    return {
        "name": shard.name,
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
        "bytes_in": shard.bytes_in,
        "seconds": round(time.monotonic() - start, 3),
    }


def meta_outputs(shape: tuple[int, ...], dtype: str, scheme) -> list[tuple[str, str, tuple]]:
    """(local name, dtype, shape) of what quantizing a weight of this shape produces.

    Runs the real quantization code on the meta device, so a shape the scheme
    cannot represent fails here, before any data is read.
    """
    weight = torch.empty(shape, dtype=DTYPES[dtype], device="meta")
    (state,) = quantize_weights([weight], scheme)
    zero_point = state.get("weight_zero_point")
    if "weight_packed" in state and zero_point is not None and zero_point.dtype != torch.int32:
        # pack-quantized returns early on meta, before it packs an asymmetric zero point
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        zeros = torch.zeros(zero_point.shape, dtype=zero_point.dtype)
        state["weight_zero_point"] = pack_to_int32(zeros, scheme.weights.num_bits, packed_dim=0)
    return [(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in sorted(state.items())]


@task(name="quantize", cache_policy=NO_CACHE)
def quantize_task(shard: ShardPlan, paths: dict[str, str], out_dir: str, config, device: str,
                  limit: str | None = None) -> dict:  # fmt: skip
    """Quantize one shard from downloaded `paths`.

    `limit` names the Prefect global concurrency limit of `device`, so shards on
    one GPU never compete for its memory, whichever process or machine runs them.
    """
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, strict=True) if limit else nullcontext():
        return write_shard(shard, lambda f: open(paths[f], "rb"), Path(out_dir),
                           config.config_groups, device)  # fmt: skip
