"""compressed-tensors' own compression of a weight, the way a Linear layer goes through it.

This is the yardstick the tests compare ptqflow's bytes against: a
`torch.nn.Linear` gets the scheme applied with
`initialize_module_for_quantization`, its qparams are computed with
compressed-tensors' `calculate_qparams` / `generate_gparam` from the weight's
min and max (written out here per strategy, independently of ptqflow's
observer), and `compress_module` compresses it.

For MSE observers the min and max come from `mse_min_max`, llm-compressor
0.14's grid search (observers/mse_quant.py, its CPU path) written out from
its algorithm: one step at a time over the whole weight, with
compressed-tensors' own `fake_quantize`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressed_tensors.compressors import compress_module, decompress_module
from compressed_tensors.quantization import (
    QuantizationStrategy,
    initialize_module_for_quantization,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

MSE_DEFAULTS = {
    "memoryless_mse": dict(maxshrink=0.2, patience=5, grid=100.0, norm=2.4, expand=1.0),
    "mse": dict(maxshrink=0.2, patience=5, grid=100.0, norm=2.4, expand=1.0),
    "nvfp4_expanded_mse": dict(
        maxshrink=1 - 0.8 / 1.8, patience=1000, grid=200.0, norm=2.4, expand=1.8
    ),
}
MSE_DEFAULTS["fouroversix"] = MSE_DEFAULTS["nvfp4_expanded_mse"]


def min_max(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    s = args.strategy
    if s == QuantizationStrategy.TENSOR:
        return w.min().reshape(1), w.max().reshape(1)
    if s == QuantizationStrategy.CHANNEL:
        return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    if s in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        g = w.reshape(rows, cols // args.group_size, args.group_size)
        return g.amin(dim=2), g.amax(dim=2)
    if s == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        p = F.pad(w, (0, -cols % bw, 0, -rows % bh))
        b = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw)
        return b.amin(dim=(1, 3)), b.amax(dim=(1, 3))
    raise AssertionError(s)


def flatten(w: torch.Tensor, args) -> torch.Tensor:
    """(1, *qparam shape, values per qparam), as llm-compressor's flatten_for_calibration."""
    s = args.strategy
    if s == QuantizationStrategy.TENSOR:
        return w.reshape(1, 1, -1)
    if s == QuantizationStrategy.CHANNEL:
        return w.unsqueeze(-2).unsqueeze(0)
    if s in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        return w.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    bh, bw = args.block_structure
    rows, cols = w.shape
    p = F.pad(w, (0, -cols % bw, 0, -rows % bh))
    b = p.reshape(p.shape[0] // bh, bh, p.shape[1] // bw, bw).transpose(1, 2)
    return b.flatten(-2, -1).unsqueeze(0)


def mse_min_max(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The searched min and max of llm-compressor's MSE observer named by args.observer."""
    kw = {**MSE_DEFAULTS[args.observer.lower()], **(args.observer_kwargs or {})}
    observed = flatten(w, args)
    token_args = args.model_copy(update={"strategy": QuantizationStrategy.TOKEN})
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:  # searched without FP8 scales
        args = args.model_copy(update={"scale_dtype": None})
        token_args = token_args.model_copy(update={"scale_dtype": None})
    min_val = torch.amin(observed, dim=(0, -1)) * kw["expand"]
    max_val = torch.amax(observed, dim=(0, -1)) * kw["expand"]
    best = torch.full_like(min_val, torch.finfo(min_val.dtype).max)
    best_min, best_max = min_val.clone(), max_val.clone()
    stale = 0
    for i in range(int(kw["maxshrink"] * kw["grid"])):
        p = 1 - i / kw["grid"]
        lo, hi = min_val * p, max_val * p
        scale, zp = calculate_qparams(lo, hi, args)
        q = fake_quantize(observed, scale.unsqueeze(-1), zp.unsqueeze(-1), token_args)
        err = torch.sum((q.to(observed.dtype) - observed).abs().pow(kw["norm"]), dim=(0, -1))
        better = err < best
        if torch.any(better):
            best[better], best_min[better], best_max[better] = err[better], lo[better], hi[better]
            stale = 0
        else:
            stale += 1
            if stale >= kw["patience"]:
                break
    return best_min, best_max


def observed(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max the scheme's observer gives: min-max, or an MSE search."""
    if (args.observer or "minmax").lower() in MSE_DEFAULTS:
        return mse_min_max(w, args)
    return min_max(w, args)


def reference_linears(weights: list[torch.Tensor], scheme) -> list[torch.nn.Linear]:
    """Quantized (not yet compressed) Linear layers; fused `weights` share one global scale."""
    scheme = scheme.model_copy(deep=True)
    args = scheme.weights
    stats = [observed(w, args) for w in weights]
    gscale = None
    if args.strategy == QuantizationStrategy.TENSOR_GROUP:
        absmax = torch.stack([torch.max(-lo.min(), hi.max()) for lo, hi in stats]).max()
        gscale = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
    out = []
    for w, (lo, hi) in zip(weights, stats, strict=True):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
        lin.weight.data.copy_(w)
        initialize_module_for_quantization(lin, scheme, force_zero_point=False)
        scale, zp = calculate_qparams(lo, hi, args, global_scale=gscale)
        with torch.no_grad():
            lin.weight_scale.copy_(scale)
            if hasattr(lin, "weight_zero_point"):
                lin.weight_zero_point.copy_(zp)
            if gscale is not None:
                lin.weight_global_scale.copy_(gscale)
        out.append(lin)
    return out


def reference_compress(weights: list[torch.Tensor], scheme) -> list[dict[str, torch.Tensor]]:
    """compressed-tensors' compressed state dict of each weight."""
    out = []
    for lin in reference_linears(weights, scheme):
        compress_module(lin)
        out.append({k: v.detach().clone() for k, v in lin.state_dict().items()})
    return out


def reference_fake_quant(weights: list[torch.Tensor], scheme) -> list[torch.Tensor]:
    """The weights as compressed-tensors decompresses them after compression."""
    out = []
    for lin in reference_linears(weights, scheme):
        compress_module(lin)
        decompress_module(lin)
        out.append(lin.weight.detach().clone())
    return out
