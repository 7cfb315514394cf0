"""Which tensors are quantized, by which config group, and which ones form fused sets.

Selection follows llm-compressor's model_free_ptq: tensors named `*.weight`
whose module is targeted and not ignored, modules ending in `norm` skipped,
3-D fused expert tensors split into per-expert 2-D weights first.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

__all__ = [
    "EMBEDDING_LEAVES",
    "EXPERT_SPLITS",
    "FUSED_LEAVES",
    "MTP_UNQUANTIZED",
    "assign_groups",
    "fused_sets",
    "ignore_pattern",
    "is_router",
    "mtp_modules",
    "named_by",
    "split_experts",
    "tied_modules",
]

# Sibling layers that vLLM fuses into one layer and that must therefore share
# one NVFP4 global scale. Matching on siblings of one parent module covers the
# dense MLP, every routed expert (`experts.N`) and shared experts alike.
FUSED_LEAVES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
    ("wq_a", "wkv_a_with_mqa"),
    ("w1", "w3"),
)

# 3-D fused expert tensors and the per-expert 2-D weights they split into.
EXPERT_SPLITS: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}

EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")

# Multi-token-prediction (MTP) layers: DeepSeek-V3/R1, Kimi-K2, GLM-4.5 and others append
# config.json's `num_nextn_predict_layers` decoder layers after the main ones, each with these
# modules that vLLM's MTP drafter builds unquantized: eh_proj a plain nn.Linear,
# shared_head.head an LM head and embed_tokens an embedding (vllm deepseek_mtp.py,
# glm4_moe_mtp.py). Their attention and MoE layers are loaded like the main model's.
MTP_UNQUANTIZED = ("eh_proj", "shared_head.head", "embed_tokens")


def split_experts(name: str, shape: tuple[int, ...]) -> list[tuple[str, int, int]] | None:
    """Per-expert weights of a 3-D fused expert tensor, as (name, first row, last row).

    Rows index the tensor viewed as 2-D ([E * R, C]). None if `name` is not a
    3-D fused expert tensor. Names are those llm-compressor gives the split.
    """
    keys = [k for k in EXPERT_SPLITS if k in name]
    if len(keys) != 1 or len(shape) != 3:
        if len(keys) > 1 and len(shape) == 3:
            raise ValueError(f"{name} matches several fused-expert names: {keys}")
        return None
    key = keys[0]
    parts = EXPERT_SPLITS[key]
    experts, rows, _ = shape
    if rows % len(parts):
        raise ValueError(f"{name} has shape {list(shape)}: dim 1 must split into {len(parts)}")
    per = rows // len(parts)
    out = []
    for e in range(experts):
        for i, part in enumerate(parts):
            out_name = name.replace(key, f"{e}.{part}")
            if not out_name.endswith(".weight"):
                out_name += ".weight"
            start = e * rows + i * per
            out.append((out_name, start, start + per))
    return out


def fused_sets(modules: Iterable[str]) -> list[tuple[str, ...]]:
    """Complete fused sets among module names, each as a tuple in FUSED_LEAVES order."""
    leaves: dict[str, set[str]] = defaultdict(set)
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        leaves[parent].add(leaf)
    sets = []
    for parent, present in leaves.items():
        for group in FUSED_LEAVES:
            if all(leaf in present for leaf in group):
                sets.append(tuple(f"{parent}.{leaf}" if parent else leaf for leaf in group))
    return sets


def assign_groups(names: Iterable[str], config) -> dict[str, str]:
    """Tensor name -> config group for every tensor the config quantizes (first group wins)."""
    from compressed_tensors.utils import match_quantizable_tensors

    names = dict.fromkeys(names)
    assigned: dict[str, str] = {}
    for group, scheme in config.config_groups.items():
        for _, name in match_quantizable_tensors(names, config.ignore or [], scheme.targets):
            assigned.setdefault(name, group)
    return assigned


def tied_modules(model_config: dict, modules: Iterable[str]) -> list[str]:
    """Input embedding and lm_head modules that are tied, if the model ties them."""
    tied = model_config.get("tie_word_embeddings")
    text = model_config.get("text_config")
    if tied is None and isinstance(text, dict):
        tied = text.get("tie_word_embeddings")
    if not tied:
        return []
    return [
        m
        for m in modules
        if m.rpartition(".")[2] in EMBEDDING_LEAVES or m == "lm_head" or m.endswith(".lm_head")
    ]


def mtp_modules(model_config: dict, modules: Iterable[str]) -> list[str]:
    """Modules of the MTP layers (model.layers.N and after, N = num_hidden_layers) that vLLM
    builds unquantized."""
    config = model_config.get("text_config") or model_config
    count, first = config.get("num_nextn_predict_layers") or 0, config.get("num_hidden_layers")
    if not count or not isinstance(first, int):
        return []
    wanted = {
        f"model.layers.{i}.{leaf}" for i in range(first, first + count) for leaf in MTP_UNQUANTIZED
    }
    return sorted(m for m in modules if m in wanted)


def named_by(targets: Iterable[str], module: str) -> bool:
    """Whether one of a scheme's targets names `module` itself (a name or an re:), not its class."""
    from compressed_tensors.utils.match import match_name

    return any(("." in t or t.startswith("re:")) and match_name(module, t) for t in targets)


def ignore_pattern(module: str) -> str:
    """An `re:` ignore pattern matching this module in every layer / expert."""
    parts = [r"\d+" if p.isdigit() else re.escape(p) for p in module.split(".")]
    return "re:" + r"\.".join(parts) + "$"


def is_router(module: str, shape: tuple[int, ...]) -> bool:
    """MoE routers (`mlp.gate`, `block_sparse_moe.gate`, ...) that vLLM keeps unquantized."""
    return module.rpartition(".")[2] in ("gate", "router") and len(shape) == 2
