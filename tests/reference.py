"""compressed-tensors' own compression of a weight, the way a Linear layer goes through it.

This is the yardstick the tests compare ptqflow's bytes against: a
`torch.nn.Linear` gets the scheme applied with
`initialize_module_for_quantization`, its qparams are computed with
compressed-tensors' `calculate_qparams` / `generate_gparam` from the weight's
min and max (written out here per strategy, independently of ptqflow's
observer), and `compress_module` compresses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from compressed_tensors.compressors import compress_module, decompress_module
from compressed_tensors.quantization import (
    QuantizationStrategy,
    initialize_module_for_quantization,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam


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


def reference_linears(weights: list[torch.Tensor], scheme) -> list[torch.nn.Linear]:
    """Quantized (not yet compressed) Linear layers; fused `weights` share one global scale."""
    scheme = scheme.model_copy(deep=True)
    args = scheme.weights
    stats = [min_max(w, args) for w in weights]
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
