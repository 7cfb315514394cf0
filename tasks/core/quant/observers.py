"""Weight observers: min-max, and llm-compressor's MSE grid search, bit for bit.

An observer only decides the min and max of each scale element (row, group or
block); compressed-tensors' `calculate_qparams` turns them into scales as
usual. The MSE observers of llm-compressor 0.14 (observers/mse.py and
mse_quant.py, its CPU path) search shrink factors of the observed range:

    min0, max0 = amin(x) * expand, amax(x) * expand        (in the weight's dtype D)
    for i in range(int(maxshrink * grid)):
        lo, hi = min0 * (1 - i / grid), max0 * (1 - i / grid)
        scale, zero = calculate_qparams(lo, hi)            (NVFP4: no FP8 rounding, no global scale)
        error = sum(|fake_quant(x) - x| ** norm)           (every op rounded to D)
        keep lo, hi of every group whose error is strictly below its best so far
        stop after `patience` steps in which no group of the weight improved

Every operation is rounded to D as torch rounds it (a bf16 `pow` even uses
the exponent rounded to bf16), and changing any rounding changes the choice
of many groups, so this module keeps the operands and dtypes exactly. What it
changes is the order of work: each run of groups goes through a window of steps
while in cache, on its own core, and the stop rule, which needs every group of the
weight, is applied to what every run reports (`searched_minmax`). For bfloat16
on the CPU, the per-element arithmetic runs in one compiled loop
(mse_kernel.py) instead of a dozen passes of torch operations. Both dispatch
on the weights' kind of quantizer (kinds.py).

`mse` is a single observation here, so it is `memoryless_mse` (llm-compressor's
model_free_ptq renames it to a `static_mse` that does not exist and fails).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, fields

import torch

from storage.errors import PtqflowError
from tasks.core.quant.geometry import kernel_handles, scale_extent
from tasks.core.quant.kinds import QuantKind, search_kind

__all__ = [
    "ALIASES",
    "FOUROVERSIX_WARNING",
    "KNOWN",
    "MINMAX",
    "NEEDS_ACTIVATIONS",
    "SEARCHES",
    "Search",
    "advance",
    "candidates",
    "check_observer",
    "errors",
    "grouped",
    "observe",
    "observer_name",
    "search_args",
    "search_of",
    "searched_minmax",
    "shrunk",
    "warn_alias",
]

MINMAX = ("minmax", "static_minmax", "memoryless_minmax")
# observers that weigh the error with activation statistics, which model-free runs do not have
NEEDS_ACTIVATIONS = ("imatrix_mse", "nvfp4_expanded_imatrix")
FOUROVERSIX_WARNING = (
    "The 'fouroversix' observer is an alias for 'nvfp4_expanded_mse' and will be removed in a "
    "future release. Please use 'nvfp4_expanded_mse' instead."
)


@dataclass(frozen=True)
class Search:
    """An MSE observer's grid: `int(maxshrink * grid)` shrink steps of `1 / grid` each."""

    maxshrink: float = 0.2
    patience: int = 5
    grid: float = 100.0
    norm: float = 2.4
    expand: float = 1.0

    @property
    def factors(self) -> list[float]:
        return [1 - i / self.grid for i in range(int(self.maxshrink * self.grid))]


SEARCHES = {
    "memoryless_mse": Search(),
    "mse": Search(),
    "nvfp4_expanded_mse": Search(maxshrink=1 - 0.8 / 1.8, patience=1000, grid=200.0, expand=1.8),
}
ALIASES = {"fouroversix": "nvfp4_expanded_mse"}
KNOWN = (*MINMAX, *SEARCHES, *ALIASES)


def observe(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `weight` per scale element (llm-compressor's min-max observer).

    Reduces strided views in place of the observer's transposed copies: min and
    max are exact in any order, so the values are the observer's. On the CPU, a
    bfloat16 matrix is reduced in one compiled pass (code_kernel.py),
    and other 16-bit weights per row, group or block as float32, which torch
    reduces 1.5-3x faster; both conversions are exact.
    """
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    if kernel_handles(weight) and (extent := scale_extent(weight, args)):
        from tasks.core.quant.code_kernel import extremes

        found = extremes(weight, *extent)
        if found is not None:
            lo, hi = found
            return (lo.reshape(1), hi.reshape(1)) if args.strategy == S.TENSOR else (lo, hi)
    if args.strategy == S.TENSOR:
        return torch.amin(weight).reshape(1), torch.amax(weight).reshape(1)
    x = weight
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    if args.strategy == S.CHANNEL:
        lo, hi = torch.amin(x, dim=-1, keepdim=True), torch.amax(x, dim=-1, keepdim=True)
    elif args.strategy in (S.GROUP, S.TENSOR_GROUP):
        if weight.shape[-1] % args.group_size:
            raise ValueError(
                f"{weight.shape[-1]} columns are not divisible by group size {args.group_size}"
            )
        groups = x.unflatten(-1, (-1, args.group_size))
        lo, hi = torch.amin(groups, dim=-1), torch.amax(groups, dim=-1)
    elif args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(x, tuple(args.block_structure))
        rows, cols = padded.shape
        blocks = padded.view(rows // bh, bh, cols // bw, bw)
        lo, hi = torch.amin(blocks, dim=(1, 3)), torch.amax(blocks, dim=(1, 3))
    else:
        raise ValueError(f"strategy {args.strategy} cannot be applied to weights")
    return lo.to(weight.dtype), hi.to(weight.dtype)


def observer_name(name: str | None) -> str:
    """The registry's spelling: compressed-tensors looks names up lower case, with '_' for '-'."""
    return (name or "memoryless_minmax").lower().replace("-", "_").replace(" ", "_")


def check_observer(args, where: str) -> None:
    """Refuse, naming `where`, an observer model-free quantization cannot run on
    QuantizationArgs `args`, or its bad kwargs."""
    name, kwargs = args.observer, args.observer_kwargs
    key = observer_name(name)
    if key in NEEDS_ACTIVATIONS:
        raise PtqflowError(
            f"{where} uses observer {name!r}, which weighs errors by activation statistics; "
            "model-free quantization has no activations. Use memoryless_mse or "
            "nvfp4_expanded_mse, or llm-compressor's oneshot with a dataset."
        )
    if key not in KNOWN:
        raise PtqflowError(
            f"{where} uses unknown weight observer {name!r}; use one of {', '.join(KNOWN)}"
        )
    if key in MINMAX:
        return
    allowed = {f.name for f in fields(Search)}
    unknown = sorted(set(kwargs or {}) - allowed)
    if unknown:
        raise PtqflowError(
            f"{where}: observer_kwargs {', '.join(unknown)} are not read by {name}; "
            f"it reads {', '.join(sorted(allowed))}"
        )
    search = search_of(name, kwargs)
    if search.expand < 1.0:
        raise PtqflowError(f"{where}: observer_kwargs expand must be at least 1.0")
    if not search.factors:
        raise PtqflowError(f"{where}: observer_kwargs give no step (int(maxshrink * grid) is 0)")
    try:
        search_kind(args)
    except PtqflowError as e:
        raise PtqflowError(f"{where} uses observer {name!r}: {e}") from None


def search_of(name: str | None, kwargs: dict | None) -> Search | None:
    """The grid search an observer runs, or None for min-max."""
    key = observer_name(name)
    if key in MINMAX:
        return None
    base = SEARCHES[ALIASES.get(key, key)]
    values = {f.name: getattr(base, f.name) for f in fields(Search)}
    values.update(kwargs or {})
    return Search(**values)


def warn_alias(name: str | None) -> None:
    if observer_name(name) == "fouroversix":
        warnings.warn(FOUROVERSIX_WARNING, UserWarning, stacklevel=3)


def search_args(args):
    """The arguments candidates are quantized with: NVFP4's are searched without FP8 scales."""
    from compressed_tensors.quantization import QuantizationStrategy as S

    if args.strategy == S.TENSOR_GROUP and args.scale_dtype is not None:
        return args.model_copy(update={"scale_dtype": None})
    return args


def grouped(weight: torch.Tensor, args) -> torch.Tensor:
    """`weight` as llm-compressor's flatten_for_calibration shapes it: (1, *scale shape, values)."""
    from compressed_tensors.quantization import QuantizationStrategy as S
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    if args.strategy == S.TENSOR:
        return weight.reshape(1, 1, -1)
    if args.strategy == S.CHANNEL:
        return weight.unsqueeze(-2).unsqueeze(0)
    if args.strategy in (S.GROUP, S.TENSOR_GROUP):
        return weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    if args.strategy == S.BLOCK:
        bh, bw = args.block_structure
        padded = maybe_pad_tensor_for_block_quant(weight, (bh, bw))
        rows, cols = padded.shape
        blocks = padded.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2)
        return blocks.flatten(-2, -1).unsqueeze(0)
    raise ValueError(f"strategy {args.strategy} cannot be applied to weights")


def candidates(lo: torch.Tensor, hi: torch.Tensor, args, factors: list[float]):
    """Each shrink factor's scale and zero point (steps, *scale shape), in lo's dtype."""
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, zero = calculate_qparams(shrunk(lo, factors), shrunk(hi, factors), search_args(args))
    return scale, zero.to(lo.dtype)


def shrunk(t: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """t * p for each p of factors (steps, *t's shape), as the observer multiplies them."""
    return torch.stack([t * p for p in factors])


def errors(values: torch.Tensor, scale, zero, args, norm: float) -> torch.Tensor:
    """Error of every step (rows) and group (columns): values (groups, n), scale (steps, groups)."""
    kind, mse_kernel = search_kind(args), _kernel_module()
    if mse_kernel is not None and mse_kernel.handles(values, kind):
        return mse_kernel.errors(values, scale, zero, args, kind, norm)
    return _torch_errors(values, scale, zero, args, kind, norm)


def _torch_errors(values: torch.Tensor, scale, zero, args, kind, norm: float) -> torch.Tensor:
    each = zip(scale, zero, strict=True)
    return torch.stack([_error(values, s, z, args, kind, norm) for s, z in each])


def _stepper(weight: torch.Tensor, width: int, kind: QuantKind):
    """How runs of `weight`'s groups of `width` values go through a window of steps: a
    function of (values, scale, zero, args, norm, best, step, first) that `advance`s best
    and step, and returns whether any group improved at each step.

    The compiled kernel handles the weight or not (checked once: it reads every
    value). It runs the fused search on groups it can sum itself, and leaves the
    groups whose errors it is unsure of to `advance` here; on larger ones
    (channels, blocks) it computes the terms and torch sums them; otherwise torch
    computes everything.
    """
    mse_kernel = _kernel_module()
    score = _torch_errors
    if mse_kernel is not None and mse_kernel.handles(weight, kind):
        if width <= mse_kernel.FUSED_VALUES:

            def fused(values, scale, zero, args, norm: float, best, step, first: int):
                improved, groups, unsure = mse_kernel.search(
                    values, scale, zero, args, kind, norm, best, step, first
                )
                if len(groups):
                    b, s = best[groups], step[groups]
                    improved |= advance(unsure, b, s, first)
                    best[groups], step[groups] = b, s
                return improved

            return fused
        score = mse_kernel.errors

    def steps(values, scale, zero, args, norm: float, best, step, first: int) -> torch.Tensor:
        return advance(score(values, scale, zero, args, kind, norm), best, step, first)

    return steps


@functools.cache
def _kernel_module():
    """mse_kernel, or None where numba is missing (torch computes the same errors)."""
    try:
        from tasks.core.quant import mse_kernel
    except ImportError:
        return None
    return mse_kernel


def _error(x: torch.Tensor, scale, zero, args, kind: QuantKind, norm: float) -> torch.Tensor:
    """Σ|fake_quant(x) - x|^norm per group, with compressed-tensors' operations and dtypes.

    As compressed-tensors' fake_quantize: x / scale (+ zero point), clamp,
    round onto the grid, (- zero point) * scale; a symmetric zero point is 0
    and adding or subtracting it changes no value but the sign of a zero,
    which the error does not see.
    """
    from compressed_tensors.quantization.utils import calculate_range

    lo, hi = (float(v) for v in calculate_range(args, x.device))
    scale = scale.unsqueeze(-1)
    y = x / scale
    if not args.symmetric:
        y += zero.unsqueeze(-1)
    y = kind.onto(y.clamp_(lo, hi))
    if not args.symmetric:
        y -= zero.unsqueeze(-1)
    return (y * scale - x).abs_().pow_(norm).sum(dim=-1)


def advance(err: torch.Tensor, best: torch.Tensor, step: torch.Tensor, first: int) -> torch.Tensor:
    """Go through steps `first`, `first` + 1, ... with errors `err` (steps, groups).

    `best` (each group's smallest error so far, in the errors' dtype) and
    `step` (where it was first reached) are updated in place; returns whether
    any group improved at each step. An error improves only when strictly
    smaller, and NaN never does, like infinity.
    """
    e = err.nan_to_num(nan=math.inf)
    running = torch.cummin(torch.cat([best[None], e]), dim=0).values
    improved = (e < running[:-1]).any(dim=1)
    lower = running[-1] < best
    step[lower] = first + torch.argmin(e[:, lower], dim=0)  # the first of equal smallest errors
    best.copy_(running[-1])
    return improved


def searched_minmax(weight: torch.Tensor, args, search: Search, parallel=map, budget=None):
    """Min and max per scale element of `weight` after the search, in the weight's dtype.

    Steps go in windows that end where the stop rule could first end the
    search (`patience` steps after the last improvement of any group), so no
    step past the stop is computed. In a window, runs of groups of about
    `budget` values times steps (all groups if None) are mapped with
    `parallel` (the quantize worker pool); each keeps only its groups' best
    error and step, so memory stays bounded by the weight.
    """
    kind = search_kind(args)
    x = grouped(weight, args)
    lo = torch.amin(x, dim=(0, -1)) * search.expand
    hi = torch.amax(x, dim=(0, -1)) * search.expand
    values, lo_, hi_ = x.reshape(-1, x.shape[-1]), lo.reshape(-1), hi.reshape(-1)
    count, factors, steps = len(values), search.factors, _stepper(weight, values.shape[1], kind)
    best = torch.full((count,), torch.finfo(lo.dtype).max, dtype=lo.dtype)
    step = torch.zeros(count, dtype=torch.long)
    done, stale = 0, 0
    # the search ends on a step no group improved at, once `patience` steps in a row were so
    while done < len(factors) and not (stale and stale >= search.patience):
        window = factors[done : done + max(1, search.patience - stale)]
        run = count if budget is None else max(1, budget // (len(window) * values.shape[1]))

        def one(start: int, window=window, first=done, run=run) -> torch.Tensor:
            part = slice(start, start + run)
            scale, zero = candidates(lo_[part], hi_[part], args, window)
            return steps(
                values[part], scale, zero, args, search.norm, best[part], step[part], first
            )

        improved = torch.stack(list(parallel(one, range(0, count, run)))).any(dim=0)
        for any_better in improved.tolist():
            stale = 0 if any_better else stale + 1
        done += len(window)
    return tuple(shrunk(t, factors).gather(0, step[None]).reshape(lo.shape) for t in (lo_, hi_))
