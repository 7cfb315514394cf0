"""Verify a quantized checkpoint against its source: complete, exact, accurate, loadable.

One job per function:

* `check_integrity` reads headers only. Planning SOURCE with QUANTIZED's own
  quantization_config (`plan_checkpoint`) gives the name, dtype and shape of
  every tensor QUANTIZED must hold; they are compared with its index and shard
  headers, and each quantized layer's tensors with what vLLM's loader creates.
* `check_exactness`: quantization is deterministic, so re-quantizing a source
  weight with the recorded scheme must give the stored bytes exactly.
* `check_accuracy` dequantizes the stored tensors with compressed-tensors and
  compares them with the source weight.
* `compare_logits` (optional) loads both checkpoints with transformers.
* `write_report` writes report.md, tensors.csv and errors.png.

`verify` runs them shard by shard, shards in parallel, with one unit (a weight
or an NVFP4 fused set) in memory per shard at a time.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from storage.safetensors import Header, TensorSpec, read_header, read_tensor
from storage.source import HUB_ID, Folder, open_source
from tasks.compress import meta_outputs, observe, quantize_weights
from tasks.dequantize import Codec
from tasks.errors import PtqflowError
from tasks.plan import Plan, Read, ShardPlan
from tasks.quantize import read_unit
from tasks.schemes import scheme_format

INDEX = "model.safetensors.index.json"
Tensors = dict[str, torch.Tensor]

# A scale block that dequantizes to all zeros is flagged only when its source
# absmax is above this fraction of the tensor's: NVFP4's fp8 block scales
# underflow to zero, legitimately, below about 2e-6 of it.
ZERO_BLOCK_FLOOR = 1e-4
# --load: smallest logits cosine accepted when every scheme has 4 bits or more.
# Measured on the random tiny test models: 0.966-0.978 for 4-bit schemes,
# 0.996-0.9998 for 8-bit ones (real models do better); 2-bit gives about 0.5.
MIN_LOGITS_COSINE = 0.9


@dataclass
class TensorResult:
    """One output weight (a source tensor, or one expert of a 3-D one) and what verify found."""

    name: str
    shard: str  # planned output shard
    status: str  # quantized, ignored (targeted but ignored) or copied
    group: str | None
    shape: tuple[int, ...]
    bytes_in: int
    bytes_out: int
    limit: float | None = None  # largest relative error accepted
    rel_error: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def snr_db(self) -> float | None:
        if self.rel_error is None:
            return None
        return math.inf if self.rel_error == 0 else -20 * math.log10(self.rel_error)


@dataclass
class Verification:
    source: str
    quantized: str
    tensors: list[TensorResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # those not about one source weight
    notes: list[str] = field(default_factory=list)  # worth reading, not failures
    formats: dict[str, str] = field(default_factory=dict)  # config group -> format
    size_in: int = 0  # bytes of source tensors
    size_out: int = 0  # bytes of tensors in QUANTIZED
    logits: dict | None = None

    def failures(self) -> list[str]:
        return self.problems + [p for t in self.tensors for p in t.problems]

    @property
    def ok(self) -> bool:
        return not self.failures()


@dataclass
class Integrity:
    """What the data checks need from `check_integrity`."""

    plan: Plan
    schemes: dict  # config group -> QuantizationScheme
    stored: dict[str, Read]  # output tensor laid out as planned -> where QUANTIZED holds it
    results: dict[str, TensorResult]
    verification: Verification


# --- integrity ---------------------------------------------------------------------------


def open_quantized(spec: str) -> Folder:
    """QUANTIZED as a Folder: a local path, a Hub repo id or any fsspec URL."""
    if "://" not in spec and not os.path.exists(spec) and not HUB_ID.fullmatch(spec):
        raise PtqflowError(f"quantized checkpoint {spec} does not exist")
    folder = open_source(spec)
    if not folder.exists():
        raise PtqflowError(f"quantized checkpoint {folder.url} does not exist")
    return folder


def read_quantization_config(folder: Folder, files: list[str]) -> tuple[dict, object]:
    """config.json of QUANTIZED and its quantization_config, validated as compressed-tensors'
    QuantizationConfig of data-free schemes. Without one nothing else can be checked."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    from tasks.schemes import resolve_config

    where = f"{folder.url}/config.json"
    if "config.json" not in files:
        raise PtqflowError(f"{folder.url} has no config.json; is it a model folder?")
    try:
        config = json.loads(folder.read_text("config.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtqflowError(f"{where} is not JSON ({e})") from None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        raise PtqflowError(f"{where} has no compressed-tensors quantization_config")
    data = {k: v for k, v in qc.items() if k not in ("version", "quant_method")}
    try:
        parsed = QuantizationConfig.model_validate(data)
    except ValidationError as e:
        raise PtqflowError(
            f"{where}: quantization_config is not a valid QuantizationConfig:\n{e}"
        ) from None
    try:
        return config, resolve_config(config=parsed)
    except PtqflowError as e:
        raise PtqflowError(f"{where}: {e}") from None


def check_integrity(source: Folder, quantized: Folder) -> Integrity:
    """Everything that headers tell: completeness, index, shard headers, config, layouts."""
    from compressed_tensors.quantization import QuantizationStatus

    from tasks.planner import plan_checkpoint
    from tasks.select import assign_groups

    files = quantized.files()
    config, qconfig = read_quantization_config(quantized, files)
    plan, report = plan_checkpoint(source, qconfig.model_copy(deep=True), strict=False)
    v = Verification(source.url, quantized.url)
    v.problems += [f"config.json: {p}" for p in report.problems]
    qc = config["quantization_config"]
    if qc.get("quantization_status") != QuantizationStatus.COMPRESSED.value:
        v.problems.append(
            f"config.json: quantization_status is {qc.get('quantization_status')!r}; loaders "
            "decompress only 'compressed' checkpoints"
        )
    _compare_configs(source, config, plan, v)
    for rel in plan.other_files:
        if rel not in files:
            v.problems.append(f"{rel}: in SOURCE but missing from QUANTIZED")
        elif quantized.size(rel) != source.size(rel):
            v.problems.append(f"{rel}: differs in size from SOURCE's copy")

    schemes = qconfig.config_groups
    v.formats = {g: scheme_format(s) for g, s in schemes.items()}
    results = _results(plan, schemes, assign_groups(
        [w.name for s in plan.shards for u in s.units for w in u.weights],
        qconfig.model_copy(update={"ignore": []}),
    ))  # fmt: skip
    v.tensors = list(results.values())
    v.size_in = sum(s.bytes_in for s in plan.shards)
    located = _check_shards(quantized, files, v)
    v.size_out = sum(r.stop - r.start for r in located.values())
    stored = _compare_tensors(plan, located, results, v)
    _check_vllm_layout(results, schemes, stored)
    return Integrity(plan, schemes, stored, results, v)


def _compare_configs(source: Folder, config: dict, plan: Plan, v: Verification) -> None:
    def canonical(d: dict) -> dict:
        return json.loads(json.dumps({k: x for k, x in d.items() if k != "version"}))

    stored, ours = canonical(config["quantization_config"]), canonical(plan.config or {})
    if stored != ours:
        keys = sorted(k for k in stored.keys() | ours.keys() if stored.get(k) != ours.get(k))
        v.notes.append(
            "config.json: quantization_config differs from what ptqflow writes for the same "
            f"config_groups and ignore list ({', '.join(keys)})"
        )
    rest = {k: x for k, x in config.items() if k != "quantization_config"}
    src_config = json.loads(source.read_text("config.json"))
    src_config.pop("quantization_config", None)  # a pre-quantized SOURCE's
    if rest != src_config:
        keys = sorted(k for k in rest.keys() | src_config.keys()
                      if rest.get(k) != src_config.get(k))  # fmt: skip
        v.notes.append(f"config.json differs from SOURCE's beyond quantization_config: {keys}")


def _results(plan: Plan, schemes: dict, targeted: dict[str, str]) -> dict[str, TensorResult]:
    outputs: dict[tuple, int] = {}
    results = {}
    for shard in plan.shards:
        for unit in shard.units:
            for w in unit.weights:
                size_in = sum(r.stop - r.start for r in w.reads)
                if unit.group is None:
                    ignored = w.name in targeted and len(w.shape) == 2
                    size_out = TensorSpec(w.name, w.dtype, w.shape).nbytes
                    results[w.name] = TensorResult(
                        w.name, shard.name, "ignored" if ignored else "copied", None,
                        w.shape, size_in, size_out,
                    )  # fmt: skip
                    continue
                key = (w.shape, w.dtype, unit.group)
                if key not in outputs:
                    try:
                        specs = meta_outputs(w.shape, w.dtype, schemes[unit.group])
                    except (ValueError, RuntimeError):  # plan_checkpoint reported it
                        specs = []
                    outputs[key] = sum(TensorSpec(*s).nbytes for s in specs)
                results[w.name] = TensorResult(
                    w.name, shard.name, "quantized", unit.group, w.shape, size_in, outputs[key],
                )  # fmt: skip
    limits: dict[tuple, float] = {}
    for r in results.values():
        if r.group is not None and r.bytes_out:
            key = (r.group, r.shape[1])
            if key not in limits:
                limits[key] = error_limit(schemes[r.group], r.shape[1])
            r.limit = limits[key]
    return results


def _read_header(folder: Folder, rel: str) -> tuple[Header | None, str | None, int]:
    """A shard's header, a problem with it, and the file size. A truncated shard still
    gives its header, so the tensors it still holds can be checked."""
    size = folder.size(rel)
    with folder.open_unbuffered(rel) as f:
        try:
            return read_header(f, size, rel), None, size
        except PtqflowError as e:
            problem = str(e)
        f.seek(0)
        try:
            return read_header(f, 1 << 62, rel), problem, size
        except PtqflowError:
            return None, problem, size


def _check_shards(folder: Folder, files: list[str], v: Verification) -> dict[str, Read]:
    """Check the index and every shard header; returns where each readable tensor is."""
    shards = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    weight_map, total = None, None
    if INDEX in files:
        try:
            index = json.loads(folder.read_text(INDEX))
            weight_map, total = dict(index["weight_map"]), index.get("metadata", {})["total_size"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            v.problems.append(f"{INDEX} is not a valid index ({type(e).__name__}: {e})")
    elif len(shards) > 1:
        v.problems.append(f"{INDEX} is missing; loaders read only a single model.safetensors")
    if weight_map is not None:
        for name in sorted(set(weight_map.values()) - set(shards)):
            n = sum(1 for f in weight_map.values() if f == name)
            v.problems.append(f"{name}: named by {INDEX} for {n} tensors, but missing")
        for name in sorted(set(shards) - set(weight_map.values())):
            v.problems.append(f"{name}: holds tensors, but {INDEX} does not name it")
    with ThreadPoolExecutor(max(1, min(8, len(shards)))) as pool:
        found = dict(zip(shards, pool.map(lambda s: _read_header(folder, s), shards), strict=True))
    located: dict[str, Read] = {}
    where: dict[str, list[str]] = defaultdict(list)
    for shard, (header, problem, size) in found.items():
        if problem:
            v.problems.append(problem)
        if header is None:
            continue
        if problem is None and not _covers_exactly(header, size):
            v.problems.append(f"{shard}: tensors do not cover its data exactly; safetensors "
                              "refuses such files")  # fmt: skip
        for name, t in header.tensors.items():
            where[name].append(shard)
            start, stop = header.data_start + t.start, header.data_start + t.end
            if stop > size:
                v.problems.append(f"{name}: cut off, {shard} is truncated")
            elif name not in located:
                located[name] = Read(shard, name, start, stop, t.dtype, t.shape)
    for name, held in where.items():
        if len(held) > 1:
            v.problems.append(f"{name}: stored in more than one shard ({', '.join(held)})")
    if weight_map is not None:
        for name, shard in sorted(weight_map.items()):
            held = where.get(name, [])
            if shard in held or shard not in found or found[shard][0] is None:
                continue
            found_in = f"it is in {held[0]}" if held else "no shard holds it"
            v.problems.append(f"{name}: {INDEX} says {shard}, but {found_in}")
        for name in sorted(set(where) - set(weight_map)):
            v.problems.append(f"{name}: in {where[name][0]}, but not in {INDEX}")
        actual = sum(r.stop - r.start for r in located.values())
        if total is not None and total != actual and len(located) == len(where):
            v.problems.append(f"{INDEX}: total_size {total} != {actual} bytes of tensors")
    return located


def _covers_exactly(header: Header, size: int) -> bool:
    """Whether the tensors fill the data section without gaps, overlaps or trailing bytes."""
    pos = 0
    for t in sorted(header.tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != pos:
            return False
        pos = t.end
    return header.data_start + pos == size


def _compare_tensors(plan: Plan, located: dict[str, Read], results: dict[str, TensorResult],
                     v: Verification) -> dict[str, Read]:  # fmt: skip
    """Compare the planned output tensors with QUANTIZED's; returns those laid out as planned."""
    expected = {spec.name: (spec, s.name) for s in plan.shards for spec in s.specs}
    stored: dict[str, Read] = {}
    missing, moved = [], []
    for name, (spec, shard) in expected.items():
        loc = located.get(name)
        if loc is None:
            missing.append(name)
        elif (loc.dtype, loc.shape) != (spec.dtype, spec.shape):
            _problem(results, v, name, f"{name}: stored {loc.dtype} {list(loc.shape)}, "
                                       f"expected {spec.dtype} {list(spec.shape)}")  # fmt: skip
        else:
            stored[name] = loc
            if loc.file != shard:
                moved.append(name)
    if moved:
        v.notes.append(f"{len(moved)} tensors are in another shard than ptqflow puts them "
                       f"(loadable all the same), e.g. {moved[0]}")  # fmt: skip
    extra = [n for n in located if n not in expected]
    by_module: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for n in missing:
        by_module[n.rpartition(".")[0]][0].append(n)
    for n in extra:
        by_module[n.rpartition(".")[0]][1].append(n)
    for module, (miss, more) in by_module.items():
        r = results.get(f"{module}.weight")
        if r is not None and r.status == "quantized" and f"{module}.weight" in more:
            _problem(results, v, r.name,
                     f"{module}: config.json quantizes it (group {r.group}) but QUANTIZED "
                     f"holds it unquantized ({module}.weight)")  # fmt: skip
        elif r is not None and r.status != "quantized" and r.name in miss and more:
            _problem(results, v, r.name,
                     f"{module}: QUANTIZED holds it quantized ({', '.join(sorted(more))}) but "
                     f"config.json leaves it unquantized (it is {r.status})")  # fmt: skip
        else:
            for n in miss:
                _problem(results, v, n, f"{n}: missing from QUANTIZED")
            for n in more:
                v.problems.append(f"{n}: in QUANTIZED but not an output of SOURCE under its config")
    return stored


def _problem(results: dict[str, TensorResult], v: Verification, name: str, text: str) -> None:
    """File a problem under the source weight `name` belongs to, else under the checkpoint."""
    r = results.get(name) or results.get(f"{name.rpartition('.')[0]}.weight")
    (r.problems if r is not None else v.problems).append(text)


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


def _check_vllm_layout(results: dict[str, TensorResult], schemes: dict,
                       stored: dict[str, Read]) -> None:  # fmt: skip
    """Each quantized weight stored as planned must also have the layout vLLM loads."""
    by_module: dict[str, dict[str, Read]] = defaultdict(dict)
    for name, loc in stored.items():
        module, _, local = name.rpartition(".")
        by_module[module][local] = loc
    for r in results.values():
        if r.status != "quantized" or r.problems:
            continue
        module = r.name.rpartition(".")[0]
        scheme = schemes[r.group]
        fmt = scheme_format(scheme)
        want = vllm_layout(fmt, scheme.weights, *r.shape)
        if want is None:
            continue
        # the module's other tensors (bias, ...) are source tensors of their own
        got = {k: loc for k, loc in by_module[module].items()
               if f"{module}.{k}" == r.name or f"{module}.{k}" not in results}  # fmt: skip
        for key in sorted(want.keys() | got.keys()):
            if key not in got or key not in want:
                where = "lacks" if key not in got else "has an extra"
                r.problems.append(f"{module}.{key}: QUANTIZED {where} {key}; vLLM's {fmt} "
                                  f"loader creates {sorted(want)}")  # fmt: skip
                continue
            dtypes, shape = want[key]
            if got[key].dtype not in dtypes or got[key].shape != shape:
                r.problems.append(
                    f"{module}.{key}: vLLM's {fmt} loader expects {'/'.join(dtypes)} "
                    f"{list(shape)}, QUANTIZED holds {got[key].dtype} {list(got[key].shape)}"
                )


# --- exactness and accuracy --------------------------------------------------------------


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
            problems.append(f"{name}: stored as {got.dtype} {list(got.shape)}, SOURCE gives "
                            f"{want.dtype} {list(want.shape)}")  # fmt: skip
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


def check_accuracy(
    name: str, weight: torch.Tensor, stored: Tensors, scheme, limit: float
) -> tuple[float, list[str]]:
    """Relative error (‖Ŵ - W‖ / ‖W‖) of the stored weight dequantized by compressed-tensors,
    and its problems: NaN/Inf, scale blocks that became all zeros, an error above `limit`.

    `stored` holds the compressed tensors under their local names (weight_packed, ...).
    """
    from compressed_tensors.compressors import BaseCompressor

    state = dict(stored)
    if "weight_shape" in state:  # a wrong one is check_exactness's finding; don't unpack by it
        state["weight_shape"] = torch.tensor(weight.shape)
    compressor = BaseCompressor.get_value_from_registry(scheme_format(scheme))
    try:
        deq = compressor.decompress(state, scheme)["weight"].float()
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
            problems.append(f"{name}: {int(zero.sum())} of {zero.numel()} scale blocks "
                            "dequantize to all zeros, but are not zero in SOURCE")  # fmt: skip
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
                names = {k: f"{w.module}.{k}" for k in want}
                got = {k: x for k, n in names.items() if (x := load(n)) is not None}
                r.problems += check_exactness({names[k]: want[k] for k in want},
                                              {names[k]: x for k, x in got.items()})  # fmt: skip
                if "weight_global_scale" in got:
                    global_scales[w.module] = got["weight_global_scale"]
                if len(got) == len(want):
                    got = {k: x.to(device) for k, x in got.items()}
                    r.rel_error, problems = check_accuracy(w.name, t, got, scheme, r.limit)
                    r.problems += problems
            if len({bytes(s.contiguous().view(torch.uint8).numpy()) for s in
                    global_scales.values()}) > 1:  # fmt: skip
                first = unit.weights[0]
                results[first.name].problems.append(
                    f"{first.module}.weight_global_scale: differs within fused set "
                    f"{', '.join(global_scales)}; vLLM loads the set as one layer, one scale"
                )


# --- loading -----------------------------------------------------------------------------


def compare_logits(source_dir: str, quantized_dir: str, min_bits: int) -> tuple[dict, list[str]]:
    """Load both with transformers, run both on fixed token ids; returns figures and problems.

    For small models: both are loaded in float32 on the CPU.
    """
    try:
        import transformers
    except ImportError:
        raise PtqflowError("--load needs transformers: pip install transformers") from None
    auto = transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(source_dir, dtype=torch.float32)
    try:
        model, info = auto.from_pretrained(quantized_dir, dtype=torch.float32,
                                           output_loading_info=True)  # fmt: skip
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        return {}, [f"transformers cannot load QUANTIZED: {str(e).strip().splitlines()[-1]}"]
    problems = [f"transformers, loading QUANTIZED: {k.replace('_', ' ')}: {', '.join(map(str, v))}"
                for k, v in info.items() if v]  # fmt: skip
    vocab = ref.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits.float(), model(ids).logits.float()
    figures = {
        "max_abs_diff": float((got - want).abs().max()),
        "cosine": float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
    }
    if not torch.isfinite(got).all():
        problems.append("logits of QUANTIZED are not all finite")
    elif min_bits >= 4 and figures["cosine"] < MIN_LOGITS_COSINE:
        problems.append(f"logits cosine {figures['cosine']:.4f} to SOURCE's is below "
                        f"{MIN_LOGITS_COSINE}")  # fmt: skip
    return figures, problems


# --- orchestration -----------------------------------------------------------------------


class LocalFiles:
    """Local paths of SOURCE and QUANTIZED files, each downloaded once (remote ones into
    `cache_dir`, Hub ones into the Hugging Face cache), whichever thread asks first."""

    def __init__(self, cache_dir: str | None):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.lock = threading.Lock()
        self.locks: dict[tuple[str, str], threading.Lock] = {}
        self.paths: dict[tuple[str, str], str] = {}

    def path(self, folder: Folder, rel: str) -> str:
        key = (folder.url, rel)
        with self.lock:
            lock = self.locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self.paths:
                cache = self.cache_dir
                if cache is None and not folder.is_local and not folder.is_hub:
                    from storage.dest import default_state_dir

                    cache = default_state_dir() / "downloads"
                self.paths[key] = str(folder.download(rel, cache))
        return self.paths[key]

    def folder(self, folder: Folder, files: list[str], root: Path) -> str:
        """A local folder with `files`: the folder itself when local, else `root` with
        links to the downloaded copies."""
        if folder.is_local:
            return folder.root
        root.mkdir(parents=True)
        for rel in files:
            (root / rel).symlink_to(self.path(folder, rel))
        return str(root)


def verify(
    source: str,
    quantized: str,
    *,
    revision: str | None = None,
    max_workers: int = 1,
    device: str | None = None,
    cache_dir: str | None = None,
    load: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> Verification:
    """Check QUANTIZED against SOURCE; `progress(done, total, shard)` after each shard.

    Raises PtqflowError only when nothing can be checked (no SOURCE, no valid
    quantization_config); every other finding is in the Verification.
    """
    src = open_source(source, revision)
    out = open_quantized(quantized)
    integrity = check_integrity(src, out)
    v = integrity.verification
    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    local = LocalFiles(cache_dir)
    shards = integrity.plan.shards

    def one(shard: ShardPlan) -> None:
        stored = integrity.stored
        qfiles = {stored[s.name].file for s in shard.specs if s.name in stored}
        check_shard(shard, integrity, {f: local.path(src, f) for f in shard.files},
                    {f: local.path(out, f) for f in qfiles}, device)  # fmt: skip

    with ThreadPoolExecutor(max(1, max_workers)) as pool:
        futures = {pool.submit(one, s): s for s in shards}
        for done, future in enumerate(as_completed(futures), 1):
            try:
                future.result()
            except (OSError, PtqflowError) as e:
                v.problems.append(f"{futures[future].name}: could not be checked ({e})")
            if progress is not None:
                progress(done, len(shards), futures[future].name)
    if load:
        bits = min(s.weights.num_bits for s in integrity.schemes.values())
        with tempfile.TemporaryDirectory(prefix="ptqflow-verify-") as scratch:
            dirs = [local.folder(f, _model_files(f), Path(scratch) / name)
                    for f, name in ((src, "source"), (out, "quantized"))]  # fmt: skip
            v.logits, problems = compare_logits(*dirs, bits)
        v.problems += problems
    return v


def _model_files(folder: Folder) -> list[str]:
    """What transformers reads to load a model: top-level JSON and safetensors files."""
    return [f for f in folder.files() if "/" not in f and f.endswith((".json", ".safetensors"))]


# --- report ------------------------------------------------------------------------------

LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def default_report_dir(quantized: Folder) -> Path:
    """QUANTIZED/.ptqflow/verify when local, else a folder under PREFECT_HOME."""
    if quantized.is_local:
        return Path(quantized.root) / ".ptqflow" / "verify"
    from storage.dest import default_state_dir

    return default_state_dir() / "verify" / re.sub(r"[^\w.@-]+", "_", quantized.url)


def _ranked(v: Verification) -> list[TensorResult]:
    """Quantized weights, worst first: by relative error over its limit, NaN first."""
    done = [t for t in v.tensors if t.rel_error is not None]

    def badness(t: TensorResult) -> float:
        return math.inf if math.isnan(t.rel_error) else t.rel_error / (t.limit or 1.0)

    return sorted(done, key=badness, reverse=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def render_markdown(v: Verification, plot: str, worst: int = 20, listed: int = 100) -> str:
    """The Markdown report; `plot` is the line that shows or names the plot."""
    failures = v.failures()
    count = defaultdict(int)
    for t in v.tensors:
        count[t.status] += 1
    lines = [
        f"# ptqflow verify: {'PASSED' if not failures else 'FAILED'}",
        "",
        f"* SOURCE: `{v.source}`",
        f"* QUANTIZED: `{v.quantized}`",
        f"* {len(v.tensors)} source weights: {count['quantized']} quantized, "
        f"{count['ignored']} ignored, {count['copied']} copied",
        f"* size: {_mb(v.size_in)} → {_mb(v.size_out)} "
        f"({v.size_out / v.size_in if v.size_in else 0:.3f}x)",
        f"* {len(failures)} problem(s)",
        "",
        "## Schemes",
        "",
        "| group | format | weights | MB in | MB out | median rel. error | worst rel. error "
        "| min SNR (dB) | limit |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for group, fmt in v.formats.items():
        ts = [t for t in v.tensors if t.group == group]
        if not ts:
            continue
        measured = [t.rel_error for t in ts if t.rel_error is not None]
        errors = sorted(e for e in measured if not math.isnan(e))
        top = math.nan if len(errors) < len(measured) else max(errors, default=math.nan)
        med = f"{errors[len(errors) // 2]:.4g}" if errors else "-"
        snr = f"{-20 * math.log10(top):.1f}" if top > 0 else "-" if math.isnan(top) else "inf"
        top = f"{top:.4g}" if measured else "-"
        limits = sorted({t.limit for t in ts if t.limit is not None})
        lim = f"{limits[0]:.4g}" + (f"–{limits[-1]:.4g}" if len(limits) > 1 else "")
        lines.append(
            f"| {group} | {fmt} | {len(ts)} | {sum(t.bytes_in for t in ts) / 1e6:,.2f} "
            f"| {sum(t.bytes_out for t in ts) / 1e6:,.2f} | {med} | {top} | {snr} | {lim} |"
        )
    lines += ["", f"## Worst {worst} tensors (relative error over its limit)", "",
              "| tensor | group | shape | rel. error | SNR (dB) | limit | of limit | ok |",
              "|---|---|---|--:|--:|--:|--:|---|"]  # fmt: skip
    for t in _ranked(v)[:worst]:
        lines.append(
            f"| `{t.name}` | {t.group} | {list(t.shape)} | {t.rel_error:.4g} | {t.snr_db:.1f} "
            f"| {t.limit:.4g} | {t.rel_error / t.limit:.0%} | {'no' if t.problems else 'yes'} |"
        )
    if v.logits:
        lines += ["", "## Logits (transformers, QUANTIZED vs SOURCE)", ""]
        lines += [f"* {k.replace('_', ' ')}: {x:.4g}" for k, x in v.logits.items()]
    if failures:
        lines += ["", f"## Problems ({len(failures)})", ""]
        lines += [f"* {p}" for p in failures[:listed]]
        if len(failures) > listed:
            lines.append(f"* … and {len(failures) - listed} more (all in tensors.csv)")
    if v.notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in v.notes]
    lines += ["", "## Relative error per layer", "", plot, ""]
    return "\n".join(lines)


def plot_errors(v: Verification, path: Path) -> None:
    """Every quantized weight's relative error by layer: one colour per kind of layer
    (q_proj, down_proj, ...) side by side within a layer, the worst per layer joined by a
    line, failing weights as red crosses, each group's limit dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ts = [t for t in v.tensors if t.rel_error is not None and math.isfinite(t.rel_error)]
    layer = {t.name: int(m[1]) if (m := LAYER.search(t.name)) else None for t in ts}
    other = max((x for x in layer.values() if x is not None), default=-1) + 1
    kind = {t.name: t.name.rpartition(".")[0].rpartition(".")[2] for t in ts}
    kinds = sorted(set(kind.values()))
    fig = Figure(figsize=(11, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()

    def x(t: TensorResult) -> float:
        at = layer[t.name] if layer[t.name] is not None else other
        return at + 0.6 * ((kinds.index(kind[t.name]) + 0.5) / len(kinds) - 0.5)

    for i, k in enumerate(kinds):
        pts = [(x(t), t.rel_error) for t in ts if kind[t.name] == k]
        ax.scatter(*zip(*pts, strict=True), s=12, color=f"C{i % 10}", label=k, alpha=0.8)
    worst: dict[int, float] = defaultdict(float)
    for t in ts:
        at = layer[t.name] if layer[t.name] is not None else other
        worst[at] = max(worst[at], t.rel_error)
    if worst:
        xs = sorted(worst)
        ax.plot(xs, [worst[i] for i in xs], color="black", linewidth=0.8, label="worst")
    bad = [(x(t), t.rel_error) for t in ts if t.problems]
    if bad:
        ax.scatter(*zip(*bad, strict=True), s=60, marker="x", color="red", label="failed")
    for group in v.formats:
        limits = [t.limit for t in ts if t.group == group]
        if limits:
            ax.axhline(max(limits), linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(f"{group} limit", (0.01, max(limits)), xycoords=("axes fraction", "data"),
                        fontsize=7, color="grey", va="bottom")  # fmt: skip
    if ts:
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2, loc="best")
    else:
        ax.text(0.5, 0.5, "nothing quantized", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(at is None for at in layer.values()):
        ticks = [int(t) for t in ax.get_xticks() if 0 <= t < other]
        ax.set_xticks([*ticks, other], [*map(str, ticks), "other"])
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error ‖Ŵ − W‖ / ‖W‖")
    status = "PASSED" if v.ok else "FAILED"
    ax.set_title(f"{v.quantized}: {len(ts)} quantized weights, verify {status}", fontsize=9)
    fig.savefig(path, dpi=110)


def write_report(v: Verification, out_dir: Path) -> dict[str, Path]:
    """report.md, tensors.csv (every weight's figures and problems) and errors.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "tensors.csv",
             "plot": out_dir / "errors.png"}  # fmt: skip
    plot_errors(v, paths["plot"])
    paths["markdown"].write_text(render_markdown(v, "![relative error per layer](errors.png)"))
    with open(paths["csv"], "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["tensor", "shard", "status", "group", "shape", "bytes_in", "bytes_out",
                      "rel_error", "snr_db", "limit", "problems"])  # fmt: skip
        for t in v.tensors:
            out.writerow([t.name, t.shard, t.status, t.group or "", "x".join(map(str, t.shape)),
                          t.bytes_in, t.bytes_out, "" if t.rel_error is None else t.rel_error,
                          "" if t.snr_db is None else t.snr_db,
                          "" if t.limit is None else t.limit, " | ".join(t.problems)])  # fmt: skip
    return paths


def failure_message(v: Verification, report: Path, listed: int = 20) -> str:
    failures = v.failures()
    more = [f"... and {len(failures) - listed} more"] if len(failures) > listed else []
    return (
        f"{v.quantized} failed verification against {v.source}: {len(failures)} problem(s)\n  "
        + "\n  ".join(failures[:listed] + more)
        + f"\nreport: {report}"
    )


def _row(t: TensorResult) -> dict:
    return {"tensor": t.name, "group": t.group, "rel_error": t.rel_error, "snr_db": t.snr_db,
            "limit": t.limit, "ok": not t.problems}  # fmt: skip


def summary(v: Verification, paths: dict[str, Path]) -> dict:
    """What the flow returns: counts, sizes, the worst tensors, where the report is, and
    the failure message (None when verify passed)."""
    count = defaultdict(int)
    for t in v.tensors:
        count[t.status] += 1
    return {
        "ok": v.ok,
        "message": None if v.ok else failure_message(v, paths["markdown"]),
        "source": v.source,
        "quantized": v.quantized,
        "counts": dict(count),
        "shards": len({t.shard for t in v.tensors}),
        "size_in": v.size_in,
        "size_out": v.size_out,
        "problems": len(v.failures()),
        "worst": [_row(t) for t in _ranked(v)[:5]],
        "logits": v.logits,
        "report": str(paths["markdown"]),
        "plot": str(paths["plot"]),
    }


@task(name="verify", cache_policy=NO_CACHE)
def verify_task(
    source: str,
    quantized: str,
    report_dir: str | None = None,
    max_workers: int = 1,
    device: str | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    load: bool = False,
    fail: bool = True,
) -> dict:
    """Verify, write the report, attach it to the run; returns `summary`.

    With `fail`, any problem raises a PtqflowError that names the failing
    tensors (and fails the run); else the summary says ok False.
    """
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    logger = get_run_logger()

    def progress(done: int, total: int, shard: str) -> None:
        logger.info("[%d/%d] %s verified", done, total, shard)

    v = verify(source, quantized, revision=revision, max_workers=max_workers, device=device,
               cache_dir=cache_dir, load=load, progress=progress)  # fmt: skip
    target = Path(report_dir) if report_dir else default_report_dir(Folder(v.quantized))
    paths = write_report(v, target)
    create_markdown_artifact(
        key="verify-report",
        markdown=render_markdown(v, f"Plot: `{paths['plot']}`"),
        description=f"verify {'passed' if v.ok else 'FAILED'}: {v.quantized}",
    )
    create_table_artifact(
        key="verify-tensors",
        table=[_row(t) for t in _ranked(v)[:50]],
        description="the 50 quantized weights with the largest error relative to their limit",
    )
    for note in v.notes:
        logger.warning(note)
    result = summary(v, paths)
    if v.ok:
        logger.info("verified: report in %s", paths["markdown"])
    elif fail:
        raise PtqflowError(result["message"])
    else:
        logger.error("verify FAILED, %d problem(s): report in %s", result["problems"],
                     paths["markdown"])  # fmt: skip
    return result
