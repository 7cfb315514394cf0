"""Plan a run from headers only, and materialise the fused-set reindexing.

No Prefect here (tasks/plan.py wraps this as the stage's tasks), so
`ptqflow plan` does not pay for importing it.
`plan_checkpoint` is the reindex-fused-weights planning stage: it reads every
shard's header, validates the checkpoint, decides what each tensor becomes and
assigns every fused set that shares an NVFP4 global scale to the output shard
of its first member, so each quantize task can fuse scales on its own.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace

from storage.errors import PtqflowError
from storage.safetensors import FLOAT_DTYPES, TensorSpec
from storage.source import Folder, open_source
from tasks.core.checkpoint import Source, load_source, other_files, source_weights
from tasks.core.codecs import Codec, decode_weights, detect_format, meta
from tasks.core.formats import side_files
from tasks.core.loadable import check, fix, ignore_entries, restrict, suggest, whole
from tasks.core.loaders import fused_sets
from tasks.core.records import Plan, Report, ShardPlan, Unit
from tasks.core.rotate import plan_rotation
from tasks.core.schemes import KV_CACHE_WARNING
from tasks.core.select import assign_groups, mtp_modules, named_by, tied_modules, unmatched

__all__ = [
    "plan_checkpoint",
    "reindex_plan",
]


def plan_checkpoint(
    source: str | Folder,
    config,
    *,
    include_other_weights: bool = False,
    strict: bool = True,
    revision: str | None = None,
    source_format: str | None = None,
    keep_source_quantization: bool = False,
    source_settings: dict | None = None,
    rotate: str | None = None,  # or "none"
) -> tuple[Plan, Report]:
    """Validate SOURCE against `config` (a resolved QuantizationConfig) and plan every shard.

    Only headers are read. A pre-quantized SOURCE (detected from config.json,
    or `source_format`; `source_settings` replace its config's) is dequantized
    weight by weight; with `keep_source_quantization` the weights the config
    leaves unquantized keep the source's quantization. A config without groups
    only dequantizes, unless `rotate` ("hadamard") rotates the residual stream (see
    tasks/core/rotate.py), with or without quantizing.
    With `strict`, problems that would make the run fail (tensors the scheme
    cannot represent, split fused sets, undecodable source tensors) raise a
    PtqflowError listing all of them; otherwise they are returned in the report.
    """
    from compressed_tensors.quantization import QuantizationStrategy

    folder = source if isinstance(source, Folder) else open_source(str(source), revision)
    src = load_source(folder)
    model_config, shards = src.model_config, src.shards
    report = Report()
    names = [n for h in src.headers.values() for n in h.tensors]
    sides = {f: json.loads(folder.read_text(f)) for f in side_files() if f in src.files}
    fmt = detect_format(model_config, names, source_format, sides, source_settings)
    rotate = None if rotate == "none" else rotate
    if fmt is None and not config.config_groups and not rotate:
        raise PtqflowError(f"{folder.url} is not quantized: there is nothing to dequantize")
    per_file = source_weights(src.headers, model_config if fmt is None else None)
    codec, dropped = None, []
    if fmt is not None:
        codec = Codec(fmt)
        per_file, dropped, problems = decode_weights(per_file, codec)
        report.problems += problems
        report.source_format = fmt.name
        encoded = sum(w.encoded for ws in per_file.values() for w in ws)
        report.notes.append(
            f"the source is {fmt.name}: {encoded} weights stored quantized are dequantized "
            "to BF16 in memory, one at a time, by compressed-tensors' converters"
        )
        if dropped:
            report.notes.append(
                f"{len(dropped)} activation / KV-cache scale(s) of the {fmt.name} source are "
                f"not written (e.g. {dropped[0].name}); the new scheme does not use them"
                + (
                    " (layers kept in the source's quantization keep theirs)"
                    if keep_source_quantization
                    else ""
                )
            )
    weights = {w.name: w for ws in per_file.values() for w in ws}
    rotation = None
    if rotate:
        rotation = plan_rotation(rotate, model_config, weights, per_file, keep_source_quantization)
        per_file = {f: [weights[w.name] for w in ws] for f, ws in per_file.items()}
        report.notes.append(rotation.callout)

    report.callouts += unmatched(config, {n: w.shape for n, w in weights.items()})
    groups = assign_groups(weights, config)
    targeted = assign_groups(weights, _without_ignore(config))
    if config.kv_cache_scheme is not None:
        report.callouts.append(KV_CACHE_WARNING)
    tied = (  # a rotated checkpoint is untied: its lm_head is its own
        []
        if rotation
        else sorted(tied_modules(model_config, {w.rpartition(".")[0] for w in groups}))
    )
    _leave_unquantized(
        tied,
        config,
        groups,
        report,
        "tie_word_embeddings is set",
        " so the tied weights stay identical",
    )
    unquantized = set(mtp_modules(model_config, {w.rpartition(".")[0] for w in weights}))
    mtp = [
        m
        for m in sorted(unquantized)
        if f"{m}.weight" in groups
        and not named_by(config.config_groups[groups[f"{m}.weight"]].targets, m)
    ]
    _leave_unquantized(
        mtp,
        config,
        groups,
        report,
        "multi-token-prediction layers",
        ", as vLLM's MTP drafter builds them (eh_proj a plain Linear, shared_head.head an LM "
        "head, embed_tokens an embedding); a config target naming them quantizes them",
    )
    restrict(model_config, weights, groups, config.config_groups, report)
    for name in list(groups):
        w = weights[name]
        if len(w.shape) != 2:
            groups.pop(name)
        elif w.dtype not in FLOAT_DTYPES:
            report.problems.append(
                f"{name} is {w.dtype}, not a float weight; ignore it or fix the source"
            )
    per_file = whole(src.headers, per_file, groups)
    weights = {w.name: w for ws in per_file.values() for w in ws}
    check(model_config, weights, groups, config, report)
    kept = {}
    if keep_source_quantization and codec is not None:
        kept = {
            n: w
            for n, w in weights.items()
            if w.encoded and n not in groups and n.rpartition(".")[0] not in unquantized
        }
        # a kept layer keeps its activation scales (not the KV cache's: that scheme goes)
        scales = defaultdict(list)
        for d in dropped:
            if d.name.rpartition(".")[2] not in ("k_scale", "v_scale"):
                scales[d.module].append(d.read)
        weights.update(
            {
                n: replace(w, decoded=None, deps=w.deps + tuple(scales[w.module]))
                for n, w in kept.items()
            }
        )
        per_file = {f: [weights[w.name] for w in ws] for f, ws in per_file.items()}
    schemes = config.config_groups
    _check_fused(weights, groups, schemes, report)
    specs_by_weight = _plan_outputs(weights, groups, schemes, report, codec)
    suggest(model_config, weights, groups, targeted, report)
    if strict and report.problems:
        raise PtqflowError(
            "cannot quantize as asked:\n  "
            + "\n  ".join(report.problems)
            + (
                "\nIgnore them with: " + " ".join(f"--ignore '{p}'" for p in report.fixes)
                if report.fixes
                else ""
            )
        )

    # Units: fused sets with a global scale travel together to their first member's shard.
    shared = QuantizationStrategy.TENSOR_GROUP
    unit_of: dict[str, tuple[str, ...]] = {}
    for members in fused_sets(w.rpartition(".")[0] for w in weights):
        names = tuple(f"{m}.weight" for m in members)
        if all(n in groups for n in names) and schemes[groups[names[0]]].weights.strategy == shared:
            for n in names:
                unit_of[n] = names
    shard_units: dict[str, list[Unit]] = {f: [] for f in shards}
    for file in shards:
        for w in per_file[file]:
            members = unit_of.get(w.name, (w.name,))
            if w.name != members[0]:
                continue
            shard_units[file].append(Unit(tuple(weights[m] for m in members), groups.get(w.name)))
    plan_shards = []
    for file in shards:
        units = shard_units[file]
        if not units:
            continue
        specs = [s for u in units for w in u.weights for s in specs_by_weight[w.name]]
        plan_shards.append(ShardPlan(file, units, specs, fmt))
        report.counts[file] = _count(units, targeted, weights)
    other = other_files(src.files, shards, include_other_weights)
    if fmt is not None:  # the output is described by config.json alone
        other = [f for f in other if f not in side_files()]
    fingerprints = {f: folder.fingerprint(f) for f in shards}
    done = groups.keys() | kept.keys()
    ignored = [n for n in targeted if n in weights and n not in done and len(weights[n].shape) == 2]
    extra = ignore_entries(model_config, weights, groups, [n.rpartition(".")[0] for n in ignored])
    if extra and config.config_groups:
        report.notes.append(
            "the ignore list written to config.json also names what stays unquantized as "
            f"vLLM and transformers look it up: {', '.join(extra)}"
        )
    out_config = _config_dict(config, kept, ignored, codec, extra) if config.config_groups else None
    size = sum(t.nbytes for h in src.headers.values() for t in h.tensors.values())
    plan = Plan(folder.url, out_config, plan_shards, other, fingerprints, fmt, rotation, size)
    return plan, report


def _leave_unquantized(modules: list[str], config, groups: dict, report: Report, what, why):
    """Take targeted `modules` out of `groups` and into the config's ignore list, saying so."""
    if modules:
        config.ignore = list(config.ignore or []) + modules
        for m in modules:
            groups.pop(f"{m}.weight", None)
        report.callouts.append(f"{what}: {', '.join(modules)} stay unquantized{why}")


def _without_ignore(config):
    return config.model_copy(update={"ignore": []})


def _check_fused(weights, groups, schemes, report: Report) -> None:
    def key(name):
        g = groups.get(name)
        return None if g is None else schemes[g].model_dump(exclude={"targets", "format"})

    for members in fused_sets(w.rpartition(".")[0] for w in weights):
        names = [f"{m}.weight" for m in members]
        if any(n not in weights for n in names):
            continue
        keys = [key(n) for n in names]
        if any(k != keys[0] for k in keys):
            status = ", ".join(
                f"{n.rpartition('.')[0]}: {groups.get(n) or 'unquantized'}" for n in names
            )
            report.problems.append(
                f"fused set {', '.join(members)} would be split ({status}); vLLM loads it as "
                "one layer, so quantize all of its members with one scheme or ignore all"
            )


def _plan_outputs(weights, groups, schemes, report: Report, codec) -> dict[str, list[TensorSpec]]:
    from storage.safetensors import DTYPE_NAMES
    from tasks.core.quant.compress import meta_outputs

    cache: dict[tuple, list | str] = {}
    out: dict[str, list[TensorSpec]] = {}
    bad: list[str] = []
    for name, w in weights.items():
        group = groups.get(name)
        if group is None and w.encoded and w.decoded is None:  # kept as the source has it
            kept = codec.plan(meta(w.reads), keep=True).items()
            out[name] = [TensorSpec(k, DTYPE_NAMES[t.dtype], tuple(t.shape)) for k, t in kept]
            continue
        if group is None:
            out[name] = [TensorSpec(name, w.dtype, w.shape)]
            continue
        key = (w.shape, w.dtype, group)
        if key not in cache:
            try:
                cache[key] = meta_outputs(w.shape, w.dtype, schemes[group])
            except (ValueError, RuntimeError) as e:
                cache[key] = str(e)
        result = cache[key]
        if isinstance(result, str):
            bad.append(name)
            report.problems.append(f"{name} {list(w.shape)} cannot be {group}: {result}")
            out[name] = []
            continue
        out[name] = [
            TensorSpec(w.output(k), dtype, shape) for k, dtype, shape in result if k not in w.skip
        ]
    if bad:
        fix(report, weights, {n.rpartition(".")[0] for n in bad})
    return out


def _count(units: list[Unit], targeted: dict, weights: dict) -> dict[str, int]:
    counts = {"quantized": 0, "ignored": 0, "kept": 0}
    for u in units:
        for w in u.weights:
            if u.group is not None:
                counts["quantized"] += 1
            elif w.name in targeted and len(w.shape) == 2:
                counts["ignored"] += 1
            else:
                counts["kept"] += 1
    return counts


def _config_dict(config, kept=(), ignored=(), codec=None, extra=()) -> dict:
    """The quantization_config as compressed-tensors writes it into config.json.

    Modules in `kept` stay quantized as the source had them: each source group
    targets them by name, and the ignore list becomes the modules in `ignored`,
    so no pattern of the user's ignores a kept module. `extra` entries follow:
    the other names loaders know ignored modules by (tasks/core/loadable.py).
    """
    from compressed_tensors import __version__
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    from tasks.core.quant.kinds import scheme_format

    groups = {}
    for name, scheme in config.config_groups.items():
        scheme = scheme.model_copy(deep=True)
        scheme.format = scheme_format(scheme)
        groups[name] = scheme
    ignore = list(config.ignore or [])
    if kept:
        source = QuantizationConfig.model_validate(codec.keep_config)
        of = assign_groups(kept, _without_ignore(source))
        for g, scheme in source.config_groups.items():
            modules = sorted(n.rpartition(".")[0] for n in kept if of.get(n) == g)
            if modules:
                scheme = scheme.model_copy(deep=True, update={"targets": modules})
                scheme.format = scheme.format or scheme_format(scheme)
                groups[f"source_{g}"] = scheme
        ignore = sorted(n.rpartition(".")[0] for n in ignored)
    ignore += [e for e in extra if e not in ignore]
    formats = {s.format for s in groups.values()}
    final = QuantizationConfig(
        config_groups=groups,
        ignore=ignore,
        quantization_status=QuantizationStatus.COMPRESSED,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        kv_cache_scheme=config.kv_cache_scheme,
    )
    return {"version": __version__, **final.model_dump()}


def reindex_plan(src: Source) -> Plan:
    """A copy-only plan that moves every member of a fused set into its first member's shard."""
    per_file = source_weights(src.headers)
    weights = {w.name: (file, w) for file, ws in per_file.items() for w in ws}
    home: dict[str, str] = {}
    for members in fused_sets(n.rpartition(".")[0] for n in weights):
        names = [f"{m}.weight" for m in members]
        if all(n in weights for n in names):
            for n in names:
                home[n] = weights[names[0]][0]
    units: dict[str, list[Unit]] = {f: [] for f in src.shards}
    for file, ws in per_file.items():
        for w in ws:
            units[home.get(w.name, file)].append(Unit((w,), None))
    shards = [
        ShardPlan(
            f,
            units[f],
            [
                TensorSpec(u.weights[0].name, u.weights[0].read.dtype, u.weights[0].read.shape)
                for u in units[f]
            ],
        )
        for f in src.shards
        if units[f]
    ]
    other = other_files(src.files, src.shards, False)
    fingerprints = {f: src.folder.fingerprint(f) for f in src.shards}
    return Plan(src.folder.url, None, shards, other, fingerprints)
