"""Small, realistic test checkpoints written to disk offline.

Models are built with ``transformers`` from tiny configs so that tensor names are exactly
those of real Hub checkpoints; the safetensors shards, index and side files are written here
directly (``save_pretrained`` of a transformers-v5 model would store MoE experts fused).

Layout notes (transformers 5.x):

* MoE models hold experts in memory as fused 3-D parameters ``mlp.experts.gate_up_proj``
  ``[E, 2I, H]`` (gate rows first, then up rows) and ``mlp.experts.down_proj`` ``[E, H, I]``.
  Hub checkpoints store per-expert 2-D ``mlp.experts.<e>.{gate,up,down}_proj.weight``; those
  are what the ``qwen3_moe`` / ``deepseek_v3`` checkpoints contain, while ``fused_experts``
  keeps the 3-D in-memory layout.
* DeepSeek-V3 keeps ``mlp.gate.e_score_correction_bias`` in float32 (as in the real
  checkpoint); every other floating tensor is cast to the requested dtype.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ARCHS = (
    "llama",
    "qwen3",
    "qwen3_moe",
    "deepseek_v3",
    "fused_experts",
    "tied",
    "deepseek_v3_mtp",
    "glm4_moe_mtp",
)

HIDDEN = 256
INTERMEDIATE = 512
MOE_INTERMEDIATE = 256
NUM_EXPERTS = 4
VOCAB = 512
LAYERS = 2

_COMMON: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

_QWEN3_ATTN: dict[str, Any] = {
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "rms_norm_eps": 1e-6,
}

_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "llama",
        {
            **_COMMON,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
    ),
    "tied": (
        "llama",
        {
            **_COMMON,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
        },
    ),
    "qwen3": ("qwen3", {**_COMMON, **_QWEN3_ATTN, "tie_word_embeddings": False}),
    "qwen3_moe": (
        "qwen3_moe",
        {
            **_COMMON,
            **_QWEN3_ATTN,
            "moe_intermediate_size": MOE_INTERMEDIATE,
            "num_experts": NUM_EXPERTS,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "tie_word_embeddings": False,
        },
    ),
    "deepseek_v3": (
        "deepseek_v3",
        {
            **_COMMON,
            "moe_intermediate_size": MOE_INTERMEDIATE,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "q_lora_rank": 384,
            "kv_lora_rank": 512,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 128,
            "v_head_dim": 128,
            "n_routed_experts": NUM_EXPERTS,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "rms_norm_eps": 1e-6,
            "num_nextn_predict_layers": 0,
            "tie_word_embeddings": False,
        },
    ),
}
_CONFIGS["fused_experts"] = _CONFIGS["qwen3_moe"]
# With a multi-token-prediction layer, as DeepSeek-V3/R1 and Kimi-K2 ship it, and the routing
# keys of their real config.json (transformers 5 omits them; vLLM then drops the router bias).
_CONFIGS["deepseek_v3_mtp"] = (
    "deepseek_v3",
    {
        **_CONFIGS["deepseek_v3"][1],
        "num_nextn_predict_layers": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
    },
)
_CONFIGS["glm4_moe_mtp"] = (
    "glm4_moe",
    {
        **_COMMON,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "n_routed_experts": NUM_EXPERTS,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "rms_norm_eps": 1e-5,
        "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False,
    },
)
# The tensors of an MTP layer besides its decoder layer (DeepSeek-V3's and GLM-4.5's naming):
# embed_tokens, enorm/hnorm, eh_proj [H, 2H], shared_head.norm and shared_head.head [V, H].
_MTP_EXTRA = ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head")

# Generic PretrainedConfig keys that real Hub config.json files do not carry.
_GENERIC_CONFIG_KEYS = (
    "_name_or_path",
    "id2label",
    "label2id",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
)

_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")

# Sets of tensors that inference engines fuse into one linear layer (shared scales needed).
_FUSED_SET_PATTERNS = (
    re.compile(r"^(?P<key>.*\.self_attn)\.(?:q|k|v)_proj\.weight$"),
    re.compile(r"^(?P<key>.*\.self_attn)\.(?:q_a_proj|kv_a_proj_with_mqa)\.weight$"),
    re.compile(r"^(?P<key>.*\.mlp(?:\.shared_experts|\.experts\.\d+)?)\.(?:gate|up)_proj\.weight$"),
)


def _fused_set(name: str) -> str | None:
    """Key of the fused set `name` belongs to (q/k/v, MLA q_a/kv_a, gate/up), or None."""
    for i, pattern in enumerate(_FUSED_SET_PATTERNS):
        match = pattern.match(name)
        if match:
            return f"{i}:{match['key']}"
    return None


def _unfuse_experts(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace 3-D fused expert tensors by per-expert 2-D ``experts.<e>.*_proj.weight``."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = _FUSED_EXPERTS.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, kind = match["prefix"], match["kind"]
        if kind == "gate_up_proj":
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :half]
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, half:]
        else:
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e]
    # Keep per-expert order e0.gate, e0.up, e0.down, e1.gate, ... like real checkpoints.
    order = {name: i for i, name in enumerate(out)}

    def sort_key(name: str) -> tuple[int, int, int]:
        m = re.match(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m is None:
            return (order[name], 0, 0)
        first = order[f"{m[1]}.0.gate_proj.weight"]
        return (first, int(m[2]), ("gate", "up", "down").index(m[3]))

    return {name: out[name] for name in sorted(out, key=sort_key)}


def _make_state(
    arch: str, dtype: torch.dtype, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Build the transformers model for `arch` and return (checkpoint tensors, config dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs = _CONFIGS[arch]
    mtp = kwargs.get("num_nextn_predict_layers", 0)
    # transformers builds no MTP layer: build `mtp` more decoder layers and make them MTP layers
    config = AutoConfig.for_model(model_type, **{**kwargs, "num_hidden_layers": LAYERS + mtp})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in range(LAYERS, LAYERS + mtp):
            state.update(_mtp_extra(f"model.layers.{layer}", state, gen))
        config.num_hidden_layers = LAYERS
        for name, tensor in state.items():
            # Randomize norms / router bias so pass-through mix-ups are detectable.
            if name.endswith("norm.weight"):
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.01 * torch.randn(tensor.shape, generator=gen))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if arch != "fused_experts":
        state = _unfuse_experts(state)
    tensors = {
        # The real DeepSeek-V3 checkpoint stores e_score_correction_bias in float32.
        name: (t if name.endswith("e_score_correction_bias") else t.to(dtype)).contiguous()
        for name, t in state.items()
    }
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    config_dict = json.loads(config.to_json_string(use_diff=False))
    for key in _GENERIC_CONFIG_KEYS:
        config_dict.pop(key, None)
    return tensors, config_dict


def _mtp_extra(prefix: str, state: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An MTP layer's own tensors, shaped as the main model's embedding, norms and head."""
    embed, norm = state["model.embed_tokens.weight"], state["model.norm.weight"]
    hidden = embed.shape[1]
    shapes = {
        "embed_tokens": embed.shape,
        "enorm": norm.shape,
        "hnorm": norm.shape,
        "eh_proj": (hidden, 2 * hidden),
        "shared_head.norm": norm.shape,
        "shared_head.head": embed.shape,
    }
    out = {}
    for leaf in _MTP_EXTRA:
        base = 1.0 if leaf.endswith("norm") else 0.0
        out[f"{prefix}.{leaf}.weight"] = base + 0.02 * torch.randn(shapes[leaf], generator=gen)
    return out


def _sizes(tensors: Mapping[str, torch.Tensor]) -> list[int]:
    """Byte size of each tensor, in dict order."""
    return [t.numel() * t.element_size() for t in tensors.values()]


def _balanced_bounds(sizes: list[int], shards: int) -> list[int]:
    """Start index of each shard (contiguous split, roughly equal bytes, none empty)."""
    n = len(sizes)
    if not 1 <= shards <= n:
        raise ValueError(f"shards must be in [1, {n}], got {shards}")
    total = sum(sizes)
    bounds = [0]
    acc = 0
    for i, size in enumerate(sizes):
        if len(bounds) < shards and acc >= total * len(bounds) / shards and i > bounds[-1]:
            bounds.append(i)
        acc += size
    while len(bounds) < shards:  # degenerate sizes: fill remaining boundaries at the end
        bounds.append(bounds[-1] + 1)
    for k in range(shards - 1, 0, -1):  # keep every shard non-empty
        bounds[k] = min(bounds[k], n - (shards - k))
    return bounds


def _splits_set(names: list[str], pos: int) -> bool:
    """Whether a shard boundary before index `pos` separates members of a fused set."""
    before = {_fused_set(n) for n in names[:pos]} - {None}
    after = {_fused_set(n) for n in names[pos:]} - {None}
    return bool(before & after)


def _to_assignment(names: list[str], starts: list[int]) -> dict[str, int]:
    """Map names to shard indices given each shard's start index."""
    return {name: sum(1 for s in starts[1:] if i >= s) for i, name in enumerate(names)}


def _sharded_assignment(
    names: list[str], sizes: list[int], shards: int, split_fused: bool
) -> dict[str, int]:
    """Contiguous assignment; moves boundaries to split (or to avoid splitting) a fused set."""
    bounds = [*_balanced_bounds(sizes, shards), len(names)]

    def nearest(k: int, want_split: bool) -> tuple[int, int] | None:
        """(distance, position) of the closest legal boundary k with the wanted property."""
        options = [
            (abs(pos - bounds[k]), pos)
            for pos in range(bounds[k - 1] + 1, bounds[k + 1])
            if _splits_set(names, pos) == want_split
        ]
        return min(options) if options else None

    if split_fused and shards > 1:
        if not any(_splits_set(names, bounds[k]) for k in range(1, shards)):
            found = [(c, k) for k in range(1, shards) if (c := nearest(k, True))]
            if not found:
                raise ValueError("no fused set can be split across shards")
            (_, pos), k = min(found)
            bounds[k] = pos
    elif not split_fused:
        for k in range(1, shards):
            if _splits_set(names, bounds[k]) and (c := nearest(k, False)):
                bounds[k] = c[1]
    return _to_assignment(names, bounds[:-1])


_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _write_side_files(root: pathlib.Path, config: Mapping[str, Any]) -> None:
    """Write tokenizer/generation configs, a chat template and a file in a subfolder."""
    tokenizer_config = {
        "add_bos_token": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.get("max_position_embeddings", 2048),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    generation_config = {
        "bos_token_id": config.get("bos_token_id"),
        "eos_token_id": config.get("eos_token_id"),
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": config.get("transformers_version", "5.0.0"),
    }
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (root / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    (root / "chat_template.jinja").write_text(_CHAT_TEMPLATE)
    (root / "assets").mkdir(exist_ok=True)
    (root / "assets" / "readme.txt").write_text("Test asset; must be copied unchanged.\n")


def write_checkpoint(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    config: dict,
    *,
    shards: int = 1,
    assignment: dict[str, int] | None = None,
) -> pathlib.Path:
    """Write `tensors` as a safetensors checkpoint with `config` as config.json.

    Without `assignment`, tensors are split contiguously (in dict order, balanced by bytes)
    over `shards` files. `assignment` maps every tensor name to a shard index; the shard count
    is then ``max(shards, max(index) + 1)``. One shard is written as ``model.safetensors``;
    several as ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    Non-weight side files are always written.
    """
    root = pathlib.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if not names:
        raise ValueError("no tensors to write")
    if assignment is None:
        assignment = _to_assignment(names, _balanced_bounds(_sizes(tensors), shards))
    else:
        missing = set(names) - set(assignment)
        extra = set(assignment) - set(names)
        if missing or extra:
            raise ValueError(
                f"assignment mismatch: missing={sorted(missing)} extra={sorted(extra)}"
            )
        shards = max(shards, max(assignment.values()) + 1)
        empty = set(range(shards)) - set(assignment.values())
        if min(assignment.values()) < 0 or empty:
            raise ValueError(f"invalid shard indices (empty shards: {sorted(empty)})")

    if shards == 1:
        files = {0: "model.safetensors"}
    else:
        files = {k: f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)}
    for k, filename in files.items():
        part = {n: tensors[n].detach().contiguous().clone() for n in names if assignment[n] == k}
        save_file(part, str(root / filename), metadata={"format": "pt"})
    if shards > 1:
        index = {
            "metadata": {"total_size": sum(_sizes(tensors))},
            "weight_map": {n: files[assignment[n]] for n in names},
        }
        index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (root / "model.safetensors.index.json").write_text(index_text)
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_side_files(root, config)
    return root


def build_checkpoint(
    path: str | os.PathLike[str],
    arch: str,
    *,
    shards: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    split_fused: bool = True,
) -> pathlib.Path:
    """Write a checkpoint for `arch` into `path` (created).

    With shards > 1 tensors are spread over model-0000k-of-0000n.safetensors in state-dict
    order; when split_fused is True, at least one fused set (q/k/v of a layer, MLA
    q_a/kv_a, or gate/up of an expert / the shared expert / the dense MLP) is deliberately
    split across two shards; when False, boundaries are moved so no fused set is split.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    tensors, config = _make_state(arch, dtype, seed)
    names = list(tensors)
    assignment = _sharded_assignment(names, _sizes(tensors), shards, split_fused)
    return write_checkpoint(path, tensors, config, shards=shards, assignment=assignment)


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (all top-level ``*.safetensors``), for comparisons."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(pathlib.Path(path).glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if name in out:
                raise ValueError(f"tensor {name!r} appears in more than one shard")
            out[name] = tensor
    return out
