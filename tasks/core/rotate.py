"""Offline Hadamard rotation of the residual stream (QuaRot / SpinQuant R1), folded into weights.

With Q orthogonal, a model whose residual stream carries x·Q instead of x computes
the same function once every weight that reads the stream is rotated on its input
(W·Q), every weight that writes it on its output (Qᵀ·W), and the embedding on its
hidden dimension (E·Q). RMSNorm commutes with Q (it divides by the norm of x, which
Q keeps) once its weight γ is folded into the linears it feeds (W·diag(γ)) and set
to 1. Nothing is left to do at run time, and the rotated weights spread their
outliers over all channels, so they quantize with less error.

Q = diag(s)·B: random signs s (from a fixed seed, so reruns and verify give the same
bytes) and B block-diagonal, Sylvester Hadamard blocks of the largest power of two
dividing the hidden size, normalized (7168 = 7 blocks of 1024). Which tensor is what
is decided by name, for the layouts whose every tensor is known; anything else is
refused, naming the tensor.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import replace
from functools import cache

import torch

from storage.errors import PtqflowError
from tasks.core.records import ResidualRotation, Rotation

__all__ = ["KINDS", "MODEL_TYPES", "block_of", "plan_rotation", "roles", "rotate"]

KINDS = ("none", "hadamard")
MIN_BLOCK = 64  # smaller blocks barely spread an outlier
# model types whose tensors are all named below; others are refused
MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "kimi_k2",
)
_LAYER = r"model\.layers\.(?P<layer>\d+)\."
_EXPERT = r"mlp\.(?:experts\.\d+\.|shared_experts?\.)?"
_INPUT, _POST = "input_layernorm.weight", "post_attention_layernorm.weight"
# name -> (side, the norm folded into it: a name in the same layer, or a model-level name);
# side "keep": inside a block, off the residual stream, unchanged
_ROLES: tuple[tuple[re.Pattern, str, str | None], ...] = tuple(
    (re.compile(pattern), side, norm)
    for pattern, side, norm in (
        (r"model\.embed_tokens\.weight", "in", None),
        (r"lm_head\.weight", "in", "model.norm.weight"),
        (r"model\.norm\.weight", "ones", None),
        (_LAYER + r"(?:input|post_attention)_layernorm\.weight", "ones", None),
        (_LAYER + r"self_attn\.(?:q|k|v|q_a|kv_a)_proj(?:_with_mqa)?\.weight", "in", _INPUT),
        (_LAYER + r"self_attn\.o_proj\.(?:weight|bias)", "out", None),
        (_LAYER + _EXPERT + r"(?:gate_proj|up_proj)\.weight", "in", _POST),
        (_LAYER + r"mlp\.(?:gate|shared_expert_gate)\.weight", "in", _POST),
        (_LAYER + _EXPERT + r"down_proj\.weight", "out", None),
        (_LAYER + r"self_attn\.(?:q_norm|k_norm)\.weight", "keep", None),
        (_LAYER + r"self_attn\.(?:q_a_layernorm|kv_a_layernorm)\.weight", "keep", None),
        (_LAYER + r"self_attn\.(?:q_b_proj|kv_b_proj)\.weight", "keep", None),
        (_LAYER + r"self_attn\.(?:q_proj|k_proj|v_proj)\.bias", "keep", None),
        (_LAYER + r"mlp\.gate\.e_score_correction_bias", "keep", None),
    )
)


def _role(name: str) -> tuple[re.Match, str, str | None] | None:
    for pattern, side, norm in _ROLES:
        match = pattern.fullmatch(name)
        if match:
            return match, side, norm
    return None


def roles(model_config: dict, names: list[str]) -> dict[str, tuple[str, str | None]]:
    """Tensor name -> (side, the name of the norm folded into it, or None) for every tensor of
    a checkpoint whose residual stream can be rotated; raises naming what cannot be."""
    model_type = model_config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise PtqflowError(
            f"--rotate: model_type {model_type!r} is not one ptqflow can rotate and prove "
            f"unchanged ({', '.join(MODEL_TYPES)}); run without --rotate"
        )
    layers = model_config.get("num_hidden_layers")
    out, unknown = {}, []
    for name in names:
        role = _role(name)
        if role is None:
            unknown.append(name)
            continue
        match, side, norm = role
        layer = match.groupdict().get("layer")
        if layer is not None and layers is not None and int(layer) >= layers:
            raise PtqflowError(
                f"--rotate: model.layers.{layer} is a multi-token-prediction layer "
                f"({name}), which ptqflow does not rotate; run without --rotate"
            )
        if side == "keep":
            continue
        if norm is not None and layer is not None:
            norm = f"model.layers.{layer}.{norm}"
        out[name] = (side, norm)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" * (len(unknown) > 5))
        raise PtqflowError(
            f"--rotate: cannot prove the rotated model computes the same function: {shown} "
            "is not a tensor whose place in the residual stream ptqflow knows; run without --rotate"
        )
    present = set(names)
    for name, (_, norm) in out.items():
        if norm is not None and norm not in present:
            raise PtqflowError(f"--rotate: {name} reads {norm}, which the checkpoint lacks")
    return out


def plan_rotation(
    kind: str, model_config: dict, weights: dict, per_file: dict, keep_quantization: bool
) -> ResidualRotation:
    """Give every planned weight its rotation and the norm folded into it (in `weights`); a
    tied embedding gets an lm_head of its own, planned beside it (in `per_file`). Returns
    the plan's rotation."""
    if kind not in KINDS[1:]:
        raise PtqflowError(f"--rotate {kind}: the rotations ptqflow has are {', '.join(KINDS)}")
    if keep_quantization:
        raise PtqflowError(
            "--rotate changes every weight, so none can keep the source's quantization: "
            "drop --keep-source-quantization-for-ignored"
        )
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    untied = bool(model_config.get("tie_word_embeddings")) and head not in weights
    if untied and embed in weights:
        weights[head] = replace(weights[embed], name=head)
        per_file[weights[embed].read.file].append(weights[head])
    size = int(model_config["hidden_size"])
    block = block_of(size)
    for name, (side, norm) in roles(model_config, list(weights)).items():
        weights[name] = replace(
            weights[name],
            rotation=Rotation(side, size, block),
            norm=weights[norm].read if norm else None,
        )
    return ResidualRotation(kind, block, untied=untied)


def block_of(size: int) -> int:
    """The Hadamard block for a hidden size: its largest power-of-two factor."""
    block = size & -size
    if block < MIN_BLOCK:
        raise PtqflowError(
            f"--rotate: hidden size {size} has no power-of-two factor of at least {MIN_BLOCK} "
            f"(its largest is {block}), so no block Hadamard rotation fits it"
        )
    return block


@cache
def _signs(size: int, seed: int) -> torch.Tensor:
    """±1 per channel from SHAKE-256 of the seed: the same on every machine and torch."""
    bits = hashlib.shake_256(f"ptqflow-hadamard-{seed}".encode()).digest((size + 7) // 8)
    values = [1.0 - 2.0 * ((bits[i // 8] >> (i % 8)) & 1) for i in range(size)]
    return torch.tensor(values, dtype=torch.float32)


def rotate(t: torch.Tensor, r: Rotation, norm: torch.Tensor | None = None) -> torch.Tensor:
    """`t` rotated as `r` says (with `norm` folded in first, for side "in"), in t's dtype.

    Float32 throughout, rounded once to t's dtype at the end. The Hadamard blocks are
    applied as a fast Walsh-Hadamard transform: log2(block) stages of elementwise sums
    and differences, no reductions, so every device, BLAS and thread count gives the
    same bits (a matrix product's summation order is theirs to choose), and a value
    costs log2(block) additions, not `block` multiply-adds.
    """
    if r.side == "ones":
        return torch.ones_like(t)
    x, s = t.float(), _signs(r.size, r.seed).to(t.device)
    if r.side == "in":  # rows of t are read as residual vectors: t·diag(norm)·diag(s)·B
        if norm is not None:
            x = x * norm.float()
        x = _fwht((x * s).reshape(-1, r.block, 1))
    else:  # Qᵀ·t = B·diag(s)·t: the residual is t's first dimension
        x = x.reshape(r.size, -1) * s[:, None]
        x = _fwht(x.reshape(r.size // r.block, r.block, -1))
    return (x * (1 / math.sqrt(r.block))).reshape(t.shape).to(t.dtype)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """x (P, b, Q) times Sylvester's unnormalized Hadamard matrix of order b along dim 1."""
    p, b, q = x.shape
    h = 1
    while h < b:
        x = x.view(p, b // (2 * h), 2, h, q)
        x = torch.stack((x[:, :, 0] + x[:, :, 1], x[:, :, 0] - x[:, :, 1]), dim=2)
        h *= 2
    return x.view(p, b, q)
