"""Exactness: quantization is deterministic, so re-quantizing a source weight with the
recorded scheme must give the stored bytes exactly.

`check_shard` re-quantizes one planned shard, one unit (a weight or an NVFP4 fused
set) in memory at a time, and checks each weight's bytes and accuracy.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from storage.safetensors import read_tensor
from tasks.core.codecs import Codec
from tasks.core.quant.compress import Tensors, quantize_weights
from tasks.core.records import ShardPlan
from tasks.core.shard import read_unit
from tasks.core.verify.accuracy import check_accuracy
from tasks.core.verify.records import Integrity

__all__ = [
    "check_exactness",
    "check_shard",
]


def check_exactness(expected: Tensors, stored: Tensors) -> list[str]:
    """Every stored tensor whose bytes differ from `expected`, with its first differing element.

    Tensors missing from `stored` were reported by `check_integrity`.
    """
    problems = []
    for name, want in expected.items():
        got = stored.get(name)
        if got is None:
            continue
        want = want.detach().to("cpu").contiguous().reshape(-1)
        got = got.contiguous().reshape(-1)
        if (got.dtype, got.shape) != (want.dtype, want.shape):
            problems.append(
                f"{name}: stored as {got.dtype} {list(got.shape)}, SOURCE gives "
                f"{want.dtype} {list(want.shape)}"
            )
            continue
        a, b = want.view(torch.uint8), got.view(torch.uint8)
        if torch.equal(a, b):
            continue
        diff = a != b
        i = int(diff.nonzero()[0]) // want.element_size()
        problems.append(
            f"{name}: {int(diff.sum())} of {diff.numel()} bytes differ from what SOURCE gives "
            f"(element {i}: stored {_value(got[i])}, expected {_value(want[i])})"
        )
    return problems


def _value(x: torch.Tensor) -> str:
    if x.dtype.is_floating_point:
        return f"{x.float().item():.6g}"
    return str(int(x))


def check_shard(
    shard: ShardPlan,
    integrity: Integrity,
    source_paths: dict[str, str],
    quantized_paths: dict[str, str],
    device: str | torch.device = "cpu",
) -> None:
    """Exactness and accuracy of every weight of one planned shard, one unit at a time.

    Problems go into the weights' TensorResults. A fused set that shares an
    NVFP4 global scale is re-quantized together, as it was quantized.
    """
    results, stored = integrity.results, integrity.stored
    with ExitStack() as stack:
        src = {f: stack.enter_context(open(p, "rb")) for f, p in source_paths.items()}
        out = {f: stack.enter_context(open(p, "rb")) for f, p in quantized_paths.items()}

        def load(name: str) -> torch.Tensor | None:
            loc = stored.get(name)
            if loc is None:
                return None
            return read_tensor(out[loc.file], loc.start, loc.stop, loc.dtype, loc.shape)

        codec = Codec(shard.source_format) if shard.source_format else None
        for unit in shard.units:
            tensors = read_unit(unit, src, codec, device)
            if unit.group is None:
                for w, t in zip(unit.weights, tensors, strict=True):
                    got = load(w.name)
                    if got is not None:
                        results[w.name].problems += check_exactness({w.name: t}, {w.name: got})
                continue
            scheme = integrity.schemes[unit.group]
            tensors = [t.to(device) for t in tensors]
            try:
                expected = quantize_weights(tensors, scheme)
            except ValueError:  # a shape the scheme cannot represent: plan_checkpoint said so
                continue
            global_scales = {}
            for w, t, want in zip(unit.weights, tensors, expected, strict=True):
                r = results[w.name]
                want = {k: t for k, t in want.items() if k not in w.skip}
                names = {k: w.output(k) for k in want}
                got = {k: x for k, n in names.items() if (x := load(n)) is not None}
                r.problems += check_exactness(
                    {names[k]: want[k] for k in want}, {names[k]: x for k, x in got.items()}
                )
                if "weight_global_scale" in got:
                    global_scales[w.module] = got["weight_global_scale"]
                if len(got) == len(want):
                    got = {k: x.to(device) for k, x in got.items()}
                    r.rel_error, problems = check_accuracy(w.name, t, got, scheme, r.limit)
                    r.problems += problems
            if (
                len(
                    {
                        bytes(s.contiguous().view(torch.uint8).numpy())
                        for s in global_scales.values()
                    }
                )
                > 1
            ):
                first = unit.weights[0]
                results[first.name].problems.append(
                    f"{first.module}.weight_global_scale: differs within fused set "
                    f"{', '.join(global_scales)}; vLLM loads the set as one layer, one scale"
                )
