"""Which tensors are quantized, by which config group, and which ones form fused sets.

Selection follows llm-compressor's model_free_ptq: tensors named `*.weight`
whose module is targeted and not ignored, modules ending in `norm` skipped,
3-D fused expert tensors of a known layout cut into per-expert 2-D weights first
(tasks/core/layouts.py).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from tasks.core.loaders import EMBEDDING_LEAVES

__all__ = [
    "MTP_UNQUANTIZED",
    "assign_groups",
    "ignore_pattern",
    "mtp_modules",
    "named_by",
    "ties",
    "tied_modules",
    "unmatched",
]

# Multi-token-prediction (MTP) layers: DeepSeek-V3/R1, Kimi-K2, GLM-4.5 and others append
# config.json's `num_nextn_predict_layers` decoder layers after the main ones, each with these
# modules that vLLM's MTP drafter builds unquantized: eh_proj a plain nn.Linear,
# shared_head.head an LM head and embed_tokens an embedding (vllm deepseek_mtp.py,
# glm4_moe_mtp.py). Their attention and MoE layers are loaded like the main model's.
MTP_UNQUANTIZED = ("eh_proj", "shared_head.head", "embed_tokens")


def assign_groups(names: Iterable[str], config) -> dict[str, str]:
    """Tensor name -> config group for every tensor the config quantizes (first group wins)."""
    from compressed_tensors.utils import match_quantizable_tensors

    names = dict.fromkeys(names)
    assigned: dict[str, str] = {}
    for group, scheme in config.config_groups.items():
        for _, name in match_quantizable_tensors(names, config.ignore or [], scheme.targets):
            assigned.setdefault(name, group)
    return assigned


def ties(model_config: dict) -> bool:
    """Does the model tie its lm_head to its input embedding?"""
    tied = model_config.get("tie_word_embeddings")
    text = model_config.get("text_config")
    if tied is None and isinstance(text, dict):
        tied = text.get("tie_word_embeddings")
    return bool(tied)


def tied_modules(model_config: dict, modules: Iterable[str]) -> list[str]:
    """Input embedding and lm_head modules that are tied, if the model ties them."""
    if not ties(model_config):
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


def ignore_pattern(module: str, below: bool = False) -> str:
    """An `re:` ignore pattern matching this module in every layer / expert (and, `below`,
    every module inside it)."""
    parts = [r"\d+" if p.isdigit() else re.escape(p) for p in module.split(".")]
    return "re:" + r"\.".join(parts) + (r"(\..*)?$" if below else "$")


def unmatched(config, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """A warning for each ignore entry, and each targets entry of a config group, that
    matches no module of the checkpoint (`shapes`: its weights), with the closest names:
    almost always a typo (`lm-head`), though a pattern may be meant for another model."""
    from compressed_tensors.utils.match import match_name

    modules = {n.removesuffix(".weight") for n in shapes} | {n.rpartition(".")[0] for n in shapes}
    modules.discard("")
    entries = [("--ignore (the config's ignore list)", p) for p in config.ignore or []]
    for group, scheme in config.config_groups.items():
        entries += [
            (f"config group {group!r}'s targets", t) for t in scheme.targets if t != "Linear"
        ]
    out = []
    for where, pattern in entries:
        if any(match_name(m, pattern) for m in modules):
            continue
        close = _closest(pattern, modules)
        out.append(
            f"{where}: '{pattern}' matches no module of SOURCE"
            + (f"; closest: {', '.join(close)}" if close else "")
        )
    return out


def _closest(pattern: str, modules: set[str]) -> list[str]:
    """Module names (whole, or their last one or two parts) closest to `pattern`'s text."""
    text = re.sub(r"\\[dDsSwW][+*]?|[\^$()\[\]+*?\\]|re:|\.\*", "", pattern).strip(".")
    tails = {".".join(m.split(".")[-k:]) for m in modules for k in (1, 2)}
    words = sorted(modules | {t for t in tails if not t.isdigit()})
    return difflib.get_close_matches(text, words, n=3, cutoff=0.6)
