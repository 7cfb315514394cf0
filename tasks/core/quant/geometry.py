"""Where a weight's scale elements lie: which matrices the compiled kernels take, and the
rows x columns of the matrix under one scale element."""

from __future__ import annotations

import torch

__all__ = ["kernel_handles", "scale_extent"]


def kernel_handles(x: torch.Tensor) -> bool:
    """Whether the compiled kernels (code_kernel.py) take x: a 2-D bfloat16 tensor on the CPU."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 2


def scale_extent(weight: torch.Tensor, args) -> tuple[int, int] | None:
    """(rows, columns) of the matrix `weight` under one scale element, where they tile it (a
    block scheme pads a weight they do not tile: None)."""
    from compressed_tensors.quantization import QuantizationStrategy as S

    rows, cols = weight.shape
    if args.strategy == S.TENSOR:
        return rows, cols
    if args.strategy == S.CHANNEL:
        return 1, cols
    if args.strategy in (S.GROUP, S.TENSOR_GROUP) and cols % args.group_size == 0:
        return 1, args.group_size
    if args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        return (bh, bw) if rows % bh == 0 and cols % bw == 0 else None
    return None
