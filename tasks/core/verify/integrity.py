"""Completeness of QUANTIZED, from headers only.

`check_integrity` plans SOURCE with QUANTIZED's own quantization_config
(`plan_checkpoint`), which gives the name, dtype and shape of every tensor
QUANTIZED must hold; they are compared with its index and shard headers, and
each quantized layer's tensors with what vLLM's loader creates (`layout`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from storage.errors import PtqflowError
from storage.names import CONFIG, INDEX, README
from storage.safetensors import FLOAT_DTYPES, Header, TensorSpec, read_header
from storage.source import HUB_ID, Folder, open_source
from tasks.core.card import check_card
from tasks.core.quant.compress import meta_outputs
from tasks.core.quant.kinds import scheme_format
from tasks.core.records import ROTATION_KEY, Plan, Read
from tasks.core.select import mtp_modules
from tasks.core.verify.accuracy import error_limit
from tasks.core.verify.layout import check_vllm_layout
from tasks.core.verify.records import Integrity, TensorResult, Verification

__all__ = [
    "check_integrity",
    "open_quantized",
    "read_quantization_config",
]


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

    from tasks.core.schemes import resolve_config

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
        with warnings.catch_warnings():  # the run that wrote it said what kv_cache_scheme means
            warnings.simplefilter("ignore")
            return config, resolve_config(config=parsed)
    except PtqflowError as e:
        raise PtqflowError(f"{where}: {e}") from None


def check_integrity(source: Folder, quantized: Folder) -> Integrity:
    """Everything that headers tell: completeness, index, shard headers, config, layouts."""
    from compressed_tensors.quantization import QuantizationStatus

    from tasks.core.planner import plan_checkpoint
    from tasks.core.select import assign_groups

    files = quantized.files()
    config, qconfig = read_quantization_config(quantized, files)
    rotate = (config.get(ROTATION_KEY) or {}).get("kind")  # the weights to compare are rotated
    plan, report = plan_checkpoint(
        source, qconfig.model_copy(deep=True), strict=False, rotate=rotate
    )
    v = Verification(source.url, quantized.url)
    v.problems += [f"config.json: {p}" for p in report.problems]
    qc = config["quantization_config"]
    if qc.get("quantization_status") != QuantizationStatus.COMPRESSED.value:
        v.problems.append(
            f"config.json: quantization_status is {qc.get('quantization_status')!r}; loaders "
            "decompress only 'compressed' checkpoints"
        )
    source_config = json.loads(source.read_text(CONFIG))
    _compare_configs(source_config, config, plan, v)
    for rel in plan.other_files:
        if rel == README:  # the model card: _check_card
            continue
        if rel not in files:
            v.problems.append(f"{rel}: in SOURCE but missing from QUANTIZED")
        elif quantized.size(rel) != source.size(rel):
            v.problems.append(f"{rel}: differs in size from SOURCE's copy")

    schemes = qconfig.config_groups
    v.formats = {g: scheme_format(s) for g, s in schemes.items()}
    results = _results(
        plan,
        schemes,
        assign_groups(
            [w.name for s in plan.shards for u in s.units for w in u.weights],
            qconfig.model_copy(update={"ignore": []}),
        ),
    )
    v.tensors = list(results.values())
    v.size_in = sum(s.bytes_in for s in plan.shards)
    located = _check_shards(quantized, files, v)
    v.size_out = sum(r.stop - r.start for r in located.values())
    stored = _compare_tensors(plan, located, results, v)
    check_vllm_layout(results, schemes, stored)
    _check_mtp(source_config, located, v)
    _check_card(quantized, files, qc, v)
    return Integrity(plan, schemes, stored, results, v)


def _check_card(quantized: Folder, files: list[str], qc: dict, v: Verification) -> None:
    """QUANTIZED has a model card, and a ptqflow card names config.json's schemes."""
    if README not in files:
        v.problems.append(
            f"{README}: QUANTIZED has no model card; ptqflow writes one with every output "
            "(or copies SOURCE's with --no-model-card)"
        )
        return
    problem = check_card(quantized.read_text(README), qc)
    if problem:
        v.problems.append(problem)


def _check_mtp(model_config: dict, located: dict[str, Read], v: Verification) -> None:
    """MTP modules vLLM's drafter builds unquantized must be stored unquantized."""
    modules = {n.rpartition(".")[0] for n in located}
    for m in mtp_modules(model_config, modules):
        quantized = sorted(n for n in located if n.startswith(f"{m}.weight_"))
        weight = located.get(f"{m}.weight")
        if weight is not None and weight.dtype not in FLOAT_DTYPES:
            quantized.insert(0, f"{m}.weight ({weight.dtype})")
        if quantized:
            v.problems.append(
                f"{m}: stored quantized ({', '.join(quantized)}), but vLLM's MTP drafter builds "
                "it unquantized and rejects it, so speculative decoding fails; leave it "
                "unquantized (ptqflow's default)"
            )


def _compare_configs(source_config: dict, config: dict, plan: Plan, v: Verification) -> None:
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
    # without a pre-quantized SOURCE's quantization_config; as a rotation leaves it
    src_config = {k: x for k, x in source_config.items() if k != "quantization_config"}
    if plan.rotation is not None:
        plan.rotation.write_into(src_config)
    if rest != src_config:
        keys = sorted(
            k for k in rest.keys() | src_config.keys() if rest.get(k) != src_config.get(k)
        )
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
                        w.name,
                        shard.name,
                        "ignored" if ignored else "copied",
                        None,
                        w.shape,
                        size_in,
                        size_out,
                    )
                    continue
                key = (w.shape, w.dtype, unit.group)
                if key not in outputs:
                    try:
                        specs = meta_outputs(w.shape, w.dtype, schemes[unit.group])
                    except (ValueError, RuntimeError):  # plan_checkpoint reported it
                        specs = []
                    outputs[key] = sum(TensorSpec(*s).nbytes for s in specs)
                results[w.name] = TensorResult(
                    w.name,
                    shard.name,
                    "quantized",
                    unit.group,
                    w.shape,
                    size_in,
                    outputs[key],
                    prefix=w.output(""),
                    skip=w.skip,
                )
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
            v.problems.append(
                f"{shard}: tensors do not cover its data exactly; safetensors refuses such files"
            )
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


def _compare_tensors(
    plan: Plan, located: dict[str, Read], results: dict[str, TensorResult], v: Verification
) -> dict[str, Read]:
    """Compare the planned output tensors with QUANTIZED's; returns those laid out as planned."""
    expected = {spec.name: (spec, s.name) for s in plan.shards for spec in s.specs}
    stored: dict[str, Read] = {}
    missing, moved = [], []
    for name, (spec, shard) in expected.items():
        loc = located.get(name)
        if loc is None:
            missing.append(name)
        elif (loc.dtype, loc.shape) != (spec.dtype, spec.shape):
            _problem(
                results,
                v,
                name,
                f"{name}: stored {loc.dtype} {list(loc.shape)}, "
                f"expected {spec.dtype} {list(spec.shape)}",
            )
        else:
            stored[name] = loc
            if loc.file != shard:
                moved.append(name)
    if moved:
        v.notes.append(
            f"{len(moved)} tensors are in another shard than ptqflow puts them "
            f"(loadable all the same), e.g. {moved[0]}"
        )
    extra = [n for n in located if n not in expected]
    by_module: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for n in missing:
        by_module[n.rpartition(".")[0]][0].append(n)
    for n in extra:
        by_module[n.rpartition(".")[0]][1].append(n)
    for module, (miss, more) in by_module.items():
        r = results.get(f"{module}.weight")
        if r is not None and r.status == "quantized" and f"{module}.weight" in more:
            _problem(
                results,
                v,
                r.name,
                f"{module}: config.json quantizes it (group {r.group}) but QUANTIZED "
                f"holds it unquantized ({module}.weight)",
            )
        elif r is not None and r.status != "quantized" and r.name in miss and more:
            _problem(
                results,
                v,
                r.name,
                f"{module}: QUANTIZED holds it quantized ({', '.join(sorted(more))}) but "
                f"config.json leaves it unquantized (it is {r.status})",
            )
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
