"""Fit a plan to what its loaders read: experts quantized or kept whole, layouts proven,
vLLM's checks, and the ignore list written under every name the loaders use.

plan_checkpoint calls these once it knows which config group quantizes each weight
(`groups`: weight name -> group). They change `groups` and `per_file` where a weight must stay
as the source has it, and add to the plan's report: problems (with the ignore patterns that
fix them), suggestions and callouts. The facts they apply are in tasks/core/layouts.py and
tasks/core/loaders.py.
"""

from __future__ import annotations

import re
from collections import defaultdict

from storage.safetensors import Header
from tasks.core.layouts import expert_count, inputs_first_2d, layout_of, model_type
from tasks.core.loaders import (
    HEAD,
    aliases,
    experts_names,
    fused_sets,
    layer_problems,
    unquantized,
)
from tasks.core.records import Read, Report, Weight
from tasks.core.select import ignore_pattern, ties

__all__ = [
    "check",
    "experts_kept",
    "fix",
    "ignore_entries",
    "restrict",
    "suggest",
    "whole",
]


def _cut(w: Weight) -> bool:
    """Cut from a 3-D tensor of fused experts (tasks/core/layouts.py)."""
    return w.read.tensor != w.name and len(w.read.shape) == 2 and not w.encoded


def restrict(model_config: dict, weights: dict[str, Weight], groups: dict, schemes, report: Report):
    """Experts whose loader reads none of their scheme's compressed tensors stay unquantized
    (gpt-oss's vLLM loader reads its experts only as packed integers)."""
    from tasks.core.quant.compress import meta_outputs

    held: dict[str, set[str]] = defaultdict(set)
    for name, group in list(groups.items()):
        w = weights[name]
        layout = layout_of(model_config, w.read.tensor) if _cut(w) else None
        if layout is None or layout.reads is None:
            continue
        keys = {k for k, _, _ in meta_outputs(w.shape, w.dtype, schemes[group])}
        if not keys - set(layout.skip) <= set(layout.reads):
            groups.pop(name)
            held[group].add(w.read.tensor)
    for group, tensors in held.items():
        kind = model_type(model_config)
        report.callouts.append(
            f"{kind}'s experts stay as the source stores them ({len(tensors)} tensors, e.g. "
            f"{min(tensors)}): vLLM's {kind} loader reads its experts only as "
            f"{' / '.join(layout_of(model_config, min(tensors)).reads)}, not in {group}'s "
            "format; the ignore list says so, so vLLM builds them unquantized"
        )


def whole(
    headers: dict[str, Header], per_file: dict[str, list[Weight]], groups: dict
) -> dict[str, list[Weight]]:
    """Per source file, its weights with every 3-D expert tensor none of whose experts is
    quantized (nor rotated) kept whole, as the source stores it: both loaders read it so."""
    out = {}
    for file, ws in per_file.items():
        parts: dict[str, list[Weight]] = defaultdict(list)
        for w in ws:
            if _cut(w):
                parts[w.read.tensor].append(w)
        keep = {
            t for t, cut in parts.items() if not any(w.name in groups or w.rotation for w in cut)
        }
        kept = []
        for w in ws:
            if not _cut(w) or w.read.tensor not in keep:
                kept.append(w)
            elif w is parts[w.read.tensor][0]:
                info = headers[file].tensors[w.read.tensor]
                start = headers[file].data_start + info.start
                read = Read(file, w.read.tensor, start, start + info.nbytes, info.dtype, info.shape)
                kept.append(Weight(w.read.tensor, read))
        out[file] = kept
    return out


def _block(name: str) -> str:
    """The MoE block (`model.layers.3.mlp`) an expert weight or fused expert tensor is in."""
    if ".experts." in name:
        return name.split(".experts.")[0]
    return name.rpartition(".")[0].rpartition(".")[0]


def _expert_tensors(model_config: dict, weights: dict[str, Weight]) -> list[str]:
    """3-D tensors holding one slice per expert, as stored (not cut)."""
    count = expert_count(model_config)
    return [
        n
        for n, w in weights.items()
        if len(w.shape) == 3 and w.shape[0] == count and not w.view and not w.encoded
    ]


def experts_kept(model_config: dict, weights: dict[str, Weight], groups: dict) -> list[str]:
    """MoE blocks none of whose experts is quantized: vLLM builds their experts unquantized
    only if the ignore list names them as it checks them."""
    blocks = {_block(n) for n in weights if ".experts." in n}
    blocks |= {_block(n) for n in _expert_tensors(model_config, weights)}
    quantized = {_block(n) for n in groups if ".experts." in n}
    return sorted(blocks - quantized)


def fix(report: Report, weights: dict[str, Weight], modules: set[str]) -> None:
    """Ignore patterns that leave `modules` unquantized, with the rest of their fused sets."""
    for members in fused_sets(n.rpartition(".")[0] for n in weights):
        if modules & set(members):
            modules |= set(members)
    for pattern in sorted({ignore_pattern(m) for m in modules}):
        if pattern not in report.fixes:
            report.fixes.append(pattern)


def _touched(config, module: str) -> bool:
    """Would a group of `config` quantize `module` if it were a Linear (not ignored)?"""
    from compressed_tensors.utils.match import match_name

    if any(match_name(module, p) for p in config.ignore or []):
        return False
    return any(
        not s.targets or "Linear" in s.targets or any(match_name(module, t) for t in s.targets)
        for s in config.config_groups.values()
    )


def check(model_config: dict, weights: dict[str, Weight], groups: dict, config, report: Report):
    """What no loader would read as planned: 3-D experts of a layout ptqflow cannot prove,
    2-D layers stored inputs first, and layers vLLM's checks refuse (tasks/core/loaders.py)."""
    kind = model_type(model_config)
    for name in _expert_tensors(model_config, weights):
        module = name.removesuffix(".weight")
        if (
            layout_of(model_config, name) is None
            and _touched(config, module)
            and _touched(config, f"{_block(name)}.experts")
        ):
            report.problems.append(
                f"{name} {list(weights[name].shape)} holds one slice per expert, in a layout "
                f"ptqflow does not know for model type {kind}: it will not guess how to cut it"
            )
            fix(report, weights, {module})
    for name in list(groups):
        module = name.removesuffix(".weight")
        if inputs_first_2d(model_config, module):
            report.problems.append(
                f"{name} {list(weights[name].shape)} is stored [in, out] ({kind}'s Conv1D): a "
                "scheme would group and scale it along the wrong axis"
            )
            fix(report, weights, {module})
    shapes = {n: w.shape for n, w in weights.items()}
    found = layer_problems(model_config, shapes, groups, config.config_groups)
    for name, why in found.items():
        report.problems.append(f"{name} {list(shapes[name])} cannot be {groups[name]}: {why}")
    if found:
        fix(report, weights, {n.removesuffix(".weight") for n in found})


def suggest(
    model_config: dict, weights: dict[str, Weight], groups: dict, targeted: dict, report: Report
):
    """Ignore patterns for the layers that would be quantized though vLLM builds them
    unquantized (and would refuse the output: each kind gets a warning), a warning for each
    large tensor kept because it is not 2-D, and one note for the weights left unquantized
    as asked."""
    shapes = {n: w.shape for n, w in weights.items()}
    found: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for module, why in sorted(unquantized(model_config, shapes).items()):
        if f"{module}.weight" in groups:
            found[module if why == HEAD else ignore_pattern(module)].append((module, why))
    for pattern, modules in found.items():
        report.suggestions.append(pattern)
        (first, why), more = modules[0], len(modules) - 1
        report.callouts.append(
            f"{first}{f' and {more} more like it' if more else ''} will be quantized, but "
            f"vLLM builds {'them' if more else 'it'} unquantized ({why}) and would refuse the "
            f"checkpoint; pass --ignore '{pattern}'"
        )
    left, solid = [], defaultdict(list)
    for name, w in weights.items():
        if name in groups or len(w.shape) < 2:
            continue
        if len(w.shape) == 2:
            left.append(name.removesuffix(".weight"))
        else:
            solid[ignore_pattern(name)].append(name)
    for names in solid.values():
        w, more = weights[names[0]], len(names) - 1
        report.callouts.append(
            f"{names[0]} {list(w.shape)}{f' and {more} more like it' if more else ''} stay "
            f"{w.dtype}: {len(w.shape)}-D, only 2-D linear weights are quantized"
        )
    if left:
        asked = [m for m in left if f"{m}.weight" in targeted]
        rest = len(left) - len(asked)
        report.notes.append(
            f"{len(asked)} weights stay unquantized (ignored)"
            + (f", e.g. {', '.join(asked[:3])}" if asked else "")
            + (f"; {rest} the config does not target" if rest else "")
        )


def ignore_entries(
    model_config: dict, weights: dict[str, Weight], groups: dict, left: list[str]
) -> list[str]:
    """Entries for the written ignore list beyond its own: the other names loaders look the
    modules `left` unquantized up by, and the experts of MoE blocks none of whose experts is
    quantized, as patterns over every layer where that matches no quantized layer's name
    (else by name)."""
    quantized = {n.removesuffix(".weight") for n in groups}
    taken = quantized | set(aliases(model_config, quantized))
    found = [(a, False) for a in aliases(model_config, left) if a not in taken]
    for block in experts_kept(model_config, weights, groups):
        found += [(n, True) for n in experts_names(model_config, block)]
    entries = []
    for alias, below in sorted(found):
        pattern = ignore_pattern(alias, below)
        entry = alias if any(re.match(pattern[3:], t) for t in taken) else pattern
        if entry not in entries:
            entries.append(entry)
    # a tied lm_head has no tensor, but transformers builds a Linear for it
    heads = [n for n in weights if n.removesuffix(".weight").rpartition(".")[2] == "lm_head"]
    if ties(model_config) and not heads:
        entries.append("lm_head")
    return entries
