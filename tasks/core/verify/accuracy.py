"""Accuracy: the stored tensors dequantized with compressed-tensors, compared with the
source weight, against a limit measured for each scheme."""

from __future__ import annotations

import math

import torch

from tasks.core.quant.compress import Tensors, quantize_weights
from tasks.core.quant.kinds import scheme_format
from tasks.core.quant.observers import observe
from tasks.core.verify.records import ZERO_BLOCK_FLOOR

__all__ = [
    "check_accuracy",
    "dequantized",
    "error_limit",
]


def dequantized(stored: Tensors, scheme, shape) -> torch.Tensor:
    """The weight compressed-tensors decompresses from `stored` (local names), of `shape`."""
    from compressed_tensors.compressors import BaseCompressor

    state = dict(stored)
    if "weight_packed" in state:  # a wrong weight_shape is check_exactness's finding, and
        state["weight_shape"] = torch.tensor(shape)  # gpt-oss's experts have none
    compressor = BaseCompressor.get_value_from_registry(scheme_format(scheme))
    return compressor.decompress(state, scheme)["weight"]


def check_accuracy(
    name: str, weight: torch.Tensor, stored: Tensors, scheme, limit: float
) -> tuple[float, list[str]]:
    """Relative error (‖Ŵ - W‖ / ‖W‖) of the stored weight dequantized by compressed-tensors,
    and its problems: NaN/Inf, scale blocks that became all zeros, an error above `limit`.

    `stored` holds the compressed tensors under their local names (weight_packed, ...).
    """
    try:
        deq = dequantized(stored, scheme, weight.shape).float()
    except (RuntimeError, ValueError) as e:
        return math.nan, [f"{name}: compressed-tensors cannot dequantize it ({e})"]
    w = weight.float()
    problems = []
    nonfinite = ~torch.isfinite(deq)
    if nonfinite.any():
        bad = int((nonfinite & torch.isfinite(w)).sum())
        problems.append(f"{name}: {bad} of {w.numel()} values are NaN or Inf after dequantizing")
    lo, hi = observe(deq, scheme.weights)
    zero = torch.maximum(-lo, hi) == 0
    if zero.any():
        lo, hi = observe(w, scheme.weights)
        src_max = torch.maximum(-lo, hi)
        zero &= src_max > ZERO_BLOCK_FLOOR * src_max.max()
        if zero.any():
            problems.append(
                f"{name}: {int(zero.sum())} of {zero.numel()} scale blocks "
                "dequantize to all zeros, but are not zero in SOURCE"
            )
    norm, err = float(w.norm()), float((deq - w).norm())
    rel = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
    if rel > limit:
        problems.append(
            f"{name}: relative error {rel:.4g} ({-20 * math.log10(rel):.1f} dB SNR) is above "
            f"{limit:.4g}, twice the worst this scheme gives on random weights"
        )
    return rel, problems


_LIMITS: dict[tuple[str, int], float] = {}


def error_limit(scheme, cols: int) -> float:
    """Largest relative error accepted for a weight with `cols` columns under `scheme`.

    Twice the worst the scheme itself gives on three random 128 x `cols` BF16
    weights: Gaussian, Student-t with 3 degrees of freedom (heavy tails), and
    Gaussian with 64 of every 1024 columns scaled 30x (outlier channels). On
    1024 x 1024 weights these measure (Gaussian / worst): FP8_DYNAMIC,
    FP8_BLOCK, MXFP8A16 0.027 / 0.027; INT8 0.008 / 0.028; W8A16 0.007 /
    0.017; W4A16 and W4AFP8 0.11 / 0.22; W4A16_ASYM 0.10 / 0.17; NVFP4A16 0.095
    / 0.10; MXFP4A16 0.11 / 0.14; W2A16 0.55 / 0.66. A weight beyond twice
    that is not what the scheme gives; a corrupt scale or wrong bytes are.
    """
    from compressed_tensors.compressors import BaseCompressor

    key = (scheme.model_dump_json(), cols)
    if key in _LIMITS:
        return _LIMITS[key]
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(128, cols, generator=g)
    heavy = gauss / torch.randn(3, 128, cols, generator=g).pow(2).mean(0).sqrt()
    outliers = gauss.clone()
    outliers[:, torch.randperm(cols, generator=g)[: max(1, cols // 16)]] *= 30
    compressor = BaseCompressor.get_value_from_registry(scheme_format(scheme))
    worst = 0.0
    for w in (gauss, heavy, outliers):
        w = (w * 0.02).to(torch.bfloat16)
        (state,) = quantize_weights([w], scheme)
        deq = compressor.decompress(state, scheme)["weight"].float()
        worst = max(worst, float((deq - w.float()).norm() / w.float().norm()))
    _LIMITS[key] = 2 * worst
    return _LIMITS[key]
