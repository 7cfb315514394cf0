"""What the loaders of ptqflow's output need: vLLM 0.33's and transformers 5's.

A checkpoint vLLM refuses is found out only when someone serves it. So the plan checks,
before any work, what vLLM's loader would refuse (facts read from vLLM 0.33's code and
proven by tests/test_architectures.py's vLLM tier):

* Layers vLLM merges (`MERGES`: q/k/v into qkv_proj, gate/up, MLA's q_a/kv_a into
  fused_qkv_a_proj, Qwen3.5's in_proj_b/in_proj_a into in_proj_ba, ...) and fused-on-disk
  layers it builds in partitions (Phi-3's qkv_proj, mamba2's in_proj): with FP8 blocks every
  partition but the last must be a whole number of blocks (`fp8_utils.validate_fp8_block_shape`),
  and an MoE's expert width too.
* Layers vLLM builds unquantized whatever the config says (`unquantized`): MoE routers and
  shared-expert gates (found by rule: `routers`), lm_head and the embedding under a
  "Linear" target, Jamba's mamba projections. A quantized tensor there is refused.

And the written ignore list must name what is left unquantized under every name a loader
looks it up by (`aliases`): vLLM's merged layers (its MTP drafter builds `fused_qkv_a_proj`
without knowing its members), the experts vLLM checks (`<experts>.0.<gate|up|down>`), the
names vLLM's model code gives some layers, and transformers 5's names (its checkpoint
conversion renames PhiMoE's `block_sparse_moe.gate` to `mlp.router`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from tasks.core.layouts import expert_count, model_type

__all__ = [
    "HEAD",
    "MERGES",
    "Merge",
    "aliases",
    "experts_names",
    "fp8_block_problems",
    "fused_sets",
    "layer_problems",
    "partitions",
    "routers",
    "unquantized",
]


@dataclass(frozen=True)
class Merge:
    """Sibling layers vLLM loads as one (`name`), in partition order."""

    leaves: tuple[str, ...]
    name: str


MERGES = (
    Merge(("q_proj", "k_proj", "v_proj"), "qkv_proj"),
    Merge(("gate_proj", "up_proj"), "gate_up_proj"),
    Merge(("q_a_proj", "kv_a_proj_with_mqa"), "fused_qkv_a_proj"),
    Merge(("wq_a", "wkv_a_with_mqa"), "fused_qkv_a_proj"),
    Merge(("w1", "w3"), "w13"),
    Merge(("in_proj_qkv", "in_proj_z"), "in_proj_qkvz"),
    Merge(("in_proj_b", "in_proj_a"), "in_proj_ba"),
)

EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embeddings")


def fused_sets(modules: Iterable[str]) -> list[tuple[str, ...]]:
    """Complete sets of sibling layers vLLM merges into one, each in partition order: they
    share one NVFP4 global scale and must share one scheme."""
    leaves: dict[str, set[str]] = defaultdict(set)
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        leaves[parent].add(leaf)
    sets = []
    for parent, present in leaves.items():
        for group in dict.fromkeys(m.leaves for m in MERGES):
            if all(leaf in present for leaf in group):
                sets.append(tuple(f"{parent}.{leaf}" if parent else leaf for leaf in group))
    return sets


# Per model type: module paths (regexes) vLLM builds without its quantization config
UNQUANTIZED = {"jamba": (r".*\.mamba\.(in_proj|x_proj|dt_proj|out_proj)$",)}

# Per model type: layers whose rows vLLM permutes per head when loading (rotary embeddings),
# which FP8 block scales, one per 128 rows, cannot follow (vllm llama4.py permute_qk)
ROWS_PERMUTED = {"llama4": ("q_proj", "k_proj"), "llama4_text": ("q_proj", "k_proj")}


def _text(model_config: dict) -> dict:
    text = model_config.get("text_config")
    return {**model_config, **text} if isinstance(text, dict) else model_config


def routers(model_config: dict, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """MoE routers and shared-expert gates, by rule: a 2-D layer beside a block's experts
    whose outputs are one per expert (a router, however it is named: `mlp.gate`,
    `block_sparse_moe.router.layer`, `mlp.gate.wg`, ...) or a single one (a shared-expert
    gate). `shapes` maps weight names to shapes."""
    count = expert_count(model_config)
    if count is None:
        return []
    blocks = set()
    for name, shape in shapes.items():
        if ".experts." in name:
            blocks.add(name.split(".experts.")[0])
        elif len(shape) == 3 and shape[0] == count:  # fused experts: a sibling of the router
            blocks.add(name.rpartition(".")[0].rpartition(".")[0])
    found = []
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(shape) != 2 or ".experts." in name:
            continue
        if shape[0] in (count, 1) and any(module.startswith(b + ".") for b in blocks):
            found.append(module)
    return sorted(found)


HEAD = "an LM head or embedding"


def unquantized(model_config: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Modules vLLM builds unquantized under a "Linear" target, with what they are."""
    kind = model_type(model_config) or ""
    out = {m: "a router" for m in routers(model_config, shapes)}
    for name in shapes:
        module, _, leaf = name.rpartition(".")
        if leaf != "weight":
            continue
        if module.rpartition(".")[2] in ("lm_head", *EMBEDDING_LEAVES):
            out[module] = HEAD
        if any(re.match(p, module) for p in UNQUANTIZED.get(kind, ())):
            out[module] = f"in {kind}'s vLLM model"
    return out


def partitions(model_config: dict, module: str, rows: int) -> list[int]:
    """The output partitions vLLM builds one fused-on-disk layer in (at tensor parallel 1)."""
    config = _text(model_config)
    leaf = module.rpartition(".")[2]
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // heads if heads and config.get("hidden_size") else None
    )
    candidates = []
    if leaf in ("qkv_proj", "query_key_value", "c_attn") and heads and head_dim:
        kv = kv or heads
        candidates.append([heads * head_dim, kv * head_dim, kv * head_dim])
    if leaf == "gate_up_proj" and rows % 2 == 0:
        candidates.append([rows // 2, rows // 2])
    if leaf == "in_proj_qkv":  # Qwen3.5's linear attention: q, k, v
        k = _product(config, "linear_num_key_heads", "linear_key_head_dim")
        v = _product(config, "linear_num_value_heads", "linear_value_head_dim")
        if k and v:
            candidates.append([k, k, v])
    if leaf == "in_proj" and config.get("mamba_n_heads"):  # mamba2: x, z, B, C, dt
        inner = config.get("mamba_d_ssm") or config.get("mamba_expand", 2) * config["hidden_size"]
        groups = config.get("mamba_n_groups", 1) * config.get("mamba_d_state", 0)
        candidates.append([inner, inner, groups, groups, config["mamba_n_heads"]])
    for parts in candidates:
        if sum(parts) == rows:
            return parts
    return [rows]


def _product(config: dict, *keys: str) -> int | None:
    values = [config.get(k) for k in keys]
    return values[0] * values[1] if all(isinstance(v, int) for v in values) else None


def fp8_block_problems(
    model_config: dict, layers: dict[str, list[tuple[str, int]]], block: int
) -> dict[str, str]:
    """vLLM's FP8 block check: every output partition of a merged or fused layer but the last
    is a whole number of `block` rows. `layers` maps each quantized layer (a vLLM layer:
    one module, or a merged set under its first member) to its members and their rows;
    returns the refused layers' first module -> why."""
    out = {}
    for first, members in layers.items():
        parts = [p for module, rows in members for p in partitions(model_config, module, rows)]
        bad = [p for p in parts[:-1] if p % block]
        if bad:
            names = ", ".join(m.rpartition(".")[2] for m, _ in members)
            out[first] = (
                f"vLLM loads {names} as one layer in partitions of {parts} rows, and refuses "
                f"FP8 blocks of {block} rows that do not divide each but the last"
            )
    return out


def layer_problems(
    model_config: dict, shapes: dict[str, tuple[int, ...]], groups: dict[str, str], schemes
) -> dict[str, str]:
    """Quantized layers vLLM's loader refuses, by weight name, with why. `shapes` holds every
    planned weight's shape, `groups` the config group of each quantized one."""
    out: dict[str, str] = {}
    modules = {n.removesuffix(".weight"): n for n in groups}
    permuted = ROWS_PERMUTED.get(model_type(model_config) or "", ())
    blocks: dict[int, dict[str, list[tuple[str, int]]]] = defaultdict(dict)
    merged = {m: members for members in fused_sets(modules) for m in members}
    for name, group in groups.items():
        args, module = schemes[group].weights, name.removesuffix(".weight")
        if args.strategy != "block":
            continue
        if module.rpartition(".")[2] in permuted:
            out[name] = (
                f"vLLM permutes {model_type(model_config)}'s {module.rpartition('.')[2]} rows "
                "per head when loading it, which FP8 block scales cannot follow"
            )
        members = merged.get(module, (module,))
        if all(m in modules and groups[modules[m]] == group for m in members):
            layers = blocks[args.block_structure[0]]
            layers.setdefault(members[0], [(m, shapes[modules[m]][0]) for m in members])
    for block, layers in blocks.items():
        for first, why in fp8_block_problems(model_config, layers, block).items():
            out.setdefault(modules[first], why)
    return out


def _renamed(name: str, rules) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def _transformers_rules(kind: str) -> list[tuple[str, str]]:
    """transformers 5's checkpoint renames of `kind` as (regex, replacement), applied to a
    module's `.weight` name (its conversion renames PhiMoE's routers)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    rules = []
    for rule in get_checkpoint_conversion_mapping(kind) or ():
        if type(rule) is WeightRenaming:
            rules += zip(rule.source_patterns, rule.target_patterns, strict=False)
    return rules


def _vllm_rules(model_config: dict) -> list:
    """(regex, replacement) turning a checkpoint module name into the name vLLM matches the
    ignore list against, where its model code names the layer otherwise. vLLM renames exact
    ignore entries by its model's own mapper, never `re:` patterns (compressed_tensors.py
    apply_vllm_mapper), and some names are not the module's path at all."""
    kind, config = model_type(model_config), _text(model_config)
    layers = config.get("num_hidden_layers") or 0
    rules = {
        "gpt_oss": [(r"\.self_attn\.", ".attn.")],
        "jamba": [(r"\.self_attn\.", ".")],
        "granitemoehybrid": [(r"\.mamba\.", ".mixer.")],
        # falcon_h1.py names its mamba mixers model.{layers + i}.mixer and drops self_attn
        "falcon_h1": [
            (r"^model\.layers\.(\d+)\.mamba\.", lambda m: f"model.{layers + int(m[1])}.mixer."),
            (r"\.self_attn\.", "."),
        ],
        "minimax_m2": [(r"\.block_sparse_moe\.", ".mlp.")],
        "lfm2": [(r"\.conv\.", ".short_conv.")],
        "lfm2_moe": [(r"\.conv\.", ".short_conv.")],
        "nemotron_h": [(r"^backbone\.", "model.")],
    }
    return rules.get(kind, [])


def aliases(model_config: dict, modules: Iterable[str]) -> dict[str, str]:
    """Other names loaders look the unquantized `modules` up by: name -> module. vLLM's
    merged layers whose members are all among them (its MTP drafter builds
    `fused_qkv_a_proj` without knowing its members), and the names transformers 5's
    conversion and vLLM's model code give them."""
    kind = model_type(model_config) or ""
    modules = set(modules)
    out: dict[str, str] = {}
    by_parent: dict[str, set[str]] = defaultdict(set)
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        by_parent[parent].add(leaf)
    for parent, leaves in by_parent.items():
        for merge in MERGES:
            if set(merge.leaves) <= leaves:
                out[f"{parent}.{merge.name}"] = f"{parent}.{merge.leaves[0]}"
    for rules in (_transformers_rules(kind), _vllm_rules(model_config)):
        for name, module in list(out.items()) + [(m, m) for m in modules]:
            renamed = _renamed(name + ".weight", rules).removesuffix(".weight")
            if renamed != name:
                out[renamed] = module
    return {a: m for a, m in out.items() if a not in modules}


def experts_names(model_config: dict, block: str) -> list[str]:
    """The names loaders give the experts of the MoE block `block` (`model.layers.3.mlp`):
    vLLM builds them unquantized only if the ignore list covers each expert projection it
    checks (`<experts>.0.<gate>`, `.0.<up>`, `.0.<down>`, named as its model names them)."""
    experts = f"{block}.experts"
    return sorted({experts, *aliases(model_config, [experts])})
