"""Tiny checkpoints of the architectures vLLM serves, written by transformers itself.

Each entry of ARCHS is a model type and the config values that make it small; `build` makes
the model with transformers' own class (`AutoModelForCausalLM.from_config`) and writes it
with `save_pretrained`, so tensor names and layouts are exactly what a Hub checkpoint of that
architecture holds: per-expert 2-D experts where the architecture stores them so, fused 3-D
experts where it stores those (gpt-oss, Llama-4, GraniteMoE), MLA, linear attention, mamba.
Multi-token-prediction (MTP) layers, which transformers does not build, are added the way
the real checkpoints store them.

Sizes: hidden 256 with 128-wide heads, so FP8_BLOCK's 128x128 blocks, W4A16's groups of 128
and NVFP4's groups of 16 fit every layer a real model would quantize; 4 experts; 2 layers.
gpt-oss's expert width (384) differs from its hidden size, Llama-4's (256) equals it: a split
along the wrong axis then has the right shape and only its values are wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = {
    "vocab_size": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "moe_intermediate_size": 256,
    "num_experts_per_tok": 2,
}
EXPERTS = 4
MLA = {
    "q_lora_rank": 384,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "num_key_value_heads": 2,
    "head_dim": 64,  # the rope part, as transformers' MLA configs define it
}
DEEPSEEK_MOE = {
    "n_routed_experts": EXPERTS,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
}
DEEPSEEK = {
    **DEEPSEEK_MOE,
    # what real DeepSeek-V3 configs carry and transformers 5 leaves out (vLLM builds no
    # e_score_correction_bias without them): ../shared/notes/vllm-0.33-cpu-loading.md
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
}
LINEAR_ATTENTION = {
    "layer_types": ["linear_attention", "full_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
}
SLIDING = {"layer_types": ["sliding_attention", "full_attention"]}
MAMBA = {"mamba_n_heads": 8, "mamba_d_head": 64, "mamba_d_state": 16}


@dataclass(frozen=True)
class Arch:
    """A model type and what makes it tiny; `mtp` MTP layers are appended after the
    main ones (as DeepSeek-V3, GLM-4.5 and Qwen3-Next ship them)."""

    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    mtp: int = 0
    kind: str = "dense"  # dense, moe, fused-moe, mla, hybrid: for the table


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama"),
    "mistral": Arch("mistral"),
    "qwen2": Arch("qwen2", {"layer_types": ["full_attention"] * 2}),
    "qwen3": Arch("qwen3", {"layer_types": ["full_attention"] * 2}),
    "gemma": Arch("gemma"),
    # Gemma 2 and 3 tie their embeddings (vLLM builds no lm_head for them)
    "gemma2": Arch("gemma2", {**SLIDING, "tie_word_embeddings": True}),
    "gemma3": Arch("gemma3_text", {**SLIDING, "tie_word_embeddings": True}),
    "phi3": Arch("phi3"),
    "granite": Arch("granite"),
    "cohere": Arch("cohere"),
    "glm4": Arch("glm4"),
    "exaone4": Arch("exaone4", SLIDING),
    "stablelm": Arch("stablelm"),
    "olmo2": Arch("olmo2"),
    "starcoder2": Arch("starcoder2"),
    "minicpm3": Arch(
        "minicpm3",
        {
            "q_lora_rank": 256,
            "kv_lora_rank": 128,
            "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 64,
            "v_head_dim": 64,
            "num_key_value_heads": 2,
        },
        kind="mla",
    ),
    "mixtral": Arch("mixtral", {"num_local_experts": EXPERTS}, kind="moe"),
    "qwen2_moe": Arch(
        "qwen2_moe",
        {
            "num_experts": EXPERTS,
            "layer_types": ["full_attention"] * 2,
            "shared_expert_intermediate_size": 256,
        },
        kind="moe",
    ),
    "qwen3_moe": Arch("qwen3_moe", {"num_experts": EXPERTS}, kind="moe"),
    "olmoe": Arch("olmoe", {"num_experts": EXPERTS}, kind="moe"),
    "phimoe": Arch("phimoe", {"num_local_experts": EXPERTS}, kind="moe"),
    "hunyuan_v1_moe": Arch("hunyuan_v1_moe", {"num_experts": EXPERTS}, kind="moe"),
    # rotary_dim, scoring_func, use_routing_bias: keys real MiniMax-M2 configs carry and
    # vLLM reads (without the last it has no parameter for e_score_correction_bias)
    "minimax_m2": Arch(
        "minimax_m2",
        {
            "num_local_experts": EXPERTS,
            "rotary_dim": 64,
            "scoring_func": "sigmoid",
            "use_routing_bias": True,
        },
        kind="moe",
    ),
    "ernie4_5_moe": Arch(
        "ernie4_5_moe",
        {"moe_num_experts": EXPERTS, "moe_num_shared_experts": 1, "moe_k": 2},
        kind="moe",
    ),
    "deepseek_v2": Arch("deepseek_v2", {**DEEPSEEK_MOE, **MLA}, kind="mla"),
    "deepseek_v3": Arch("deepseek_v3", {**DEEPSEEK, **MLA}, mtp=1, kind="mla"),
    "glm4_moe": Arch(
        "glm4_moe",
        {**DEEPSEEK, "partial_rotary_factor": 0.5, "attention_bias": True, "head_dim": 128},
        mtp=1,
        kind="moe",
    ),
    "glm4_moe_lite": Arch("glm4_moe_lite", {**DEEPSEEK, **MLA}, kind="mla"),
    "jamba": Arch(
        "jamba",
        {
            "num_experts": EXPERTS,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "mamba_d_state": 16,
        },
        kind="hybrid",
    ),
    "lfm2_moe": Arch(
        "lfm2_moe",
        {"num_experts": EXPERTS, "num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
        kind="hybrid",
    ),
    "gpt_oss": Arch(
        "gpt_oss",
        {
            "num_local_experts": EXPERTS,
            "intermediate_size": 384,
            "layer_types": ["sliding_attention", "full_attention"],
            "head_dim": 64,
            "num_attention_heads": 4,
        },
        kind="fused-moe",
    ),
    "llama4": Arch(
        "llama4_text",
        {
            "num_local_experts": EXPERTS,
            "intermediate_size": 256,
            "intermediate_size_mlp": 512,
            "layer_types": ["chunked_attention", "full_attention"],
            "no_rope_layers": [1, 0],
            "moe_layers": [0, 1],
        },
        kind="fused-moe",
    ),
    "granitemoe": Arch(
        "granitemoe", {"num_local_experts": EXPERTS, "intermediate_size": 256}, kind="fused-moe"
    ),
    "granitemoeshared": Arch(
        "granitemoeshared",
        {"num_local_experts": EXPERTS, "intermediate_size": 256, "shared_intermediate_size": 512},
        kind="fused-moe",
    ),
    "granitemoehybrid": Arch(
        "granitemoehybrid",
        {
            "num_local_experts": EXPERTS,
            "intermediate_size": 256,
            "shared_intermediate_size": 512,
            "layer_types": ["mamba", "attention"],
            **MAMBA,
        },
        kind="hybrid",
    ),
    "qwen3_next": Arch(
        "qwen3_next",
        {"num_experts": EXPERTS, "shared_expert_intermediate_size": 256, **LINEAR_ATTENTION},
        mtp=1,
        kind="hybrid",
    ),
    "qwen3_5": Arch("qwen3_5_text", LINEAR_ATTENTION, kind="hybrid"),
    "qwen3_5_moe": Arch(
        "qwen3_5_moe_text",
        {"num_experts": EXPERTS, "shared_expert_intermediate_size": 256, **LINEAR_ATTENTION},
        kind="hybrid",
    ),
    "falcon_h1": Arch("falcon_h1", {"mamba_d_ssm": 512, **MAMBA}, kind="hybrid"),
    # conv_dim, block_dim: keys real LFM2 configs carry and vLLM reads
    "lfm2": Arch(
        "lfm2",
        {
            "layer_types": ["conv", "full_attention"],
            "conv_dim": 256,
            "conv_dim_out": 256,
            "block_dim": 256,
        },
        kind="hybrid",
    ),
}


def make_config(arch: Arch):
    """The arch's transformers config: COMMON where the config class has the key, then its own."""
    from transformers import AutoConfig

    known = AutoConfig.for_model(arch.model_type).to_dict()
    values = {k: v for k, v in COMMON.items() if k in known}
    return AutoConfig.for_model(arch.model_type, **{**values, **arch.config})


def build(path: str | os.PathLike, name: str, seed: int = 0) -> Path:
    """Write the tiny `name` checkpoint into `path` with transformers' save_pretrained."""
    from transformers import AutoModelForCausalLM

    arch = ARCHS[name]
    root = Path(path)
    config = make_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        # random norms, so a norm swapped or dropped on the way shows in the logits
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root)
    if arch.mtp:
        _add_mtp(root, arch, seed)
    return root


def _add_mtp(root: Path, arch: Arch, seed: int) -> None:
    """Append `arch.mtp` MTP layers as the real checkpoints store them: for DeepSeek-V3 and
    GLM-4.5 decoder layers model.layers.N.. (N = num_hidden_layers) with embed_tokens, enorm,
    hnorm, eh_proj and shared_head; for Qwen3-Next `mtp.*`. Their decoder layer is a copy of
    the model's last layer, built by transformers with the main ones."""
    from safetensors.torch import load_file, save_file

    config = json.loads((root / "config.json").read_text())
    layers = config["num_hidden_layers"]
    tensors = load_file(root / "model.safetensors")
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = config["hidden_size"]
    last = f"model.layers.{layers - 1}."

    def noise(shape, base=0.0):
        return (base + 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)

    extra = {}
    for i in range(arch.mtp):
        if arch.model_type == "qwen3_next":
            prefix = f"mtp.layers.{i}."
            extra.update({f"mtp.{k}": noise((hidden,), 1.0) for k in MTP_QWEN_NORMS})
            extra["mtp.fc.weight"] = noise((hidden, 2 * hidden))
            # the MTP layer is a full-attention layer
            source = f"model.layers.{_full_attention_layer(config)}."
        else:
            prefix = f"model.layers.{layers + i}."
            embed = tensors["model.embed_tokens.weight"]
            extra[prefix + "embed_tokens.weight"] = noise(embed.shape)
            extra[prefix + "shared_head.head.weight"] = noise(embed.shape)
            for norm in ("enorm", "hnorm", "shared_head.norm"):
                extra[f"{prefix}{norm}.weight"] = noise((hidden,), 1.0)
            extra[prefix + "eh_proj.weight"] = noise((hidden, 2 * hidden))
            source = last
        for name, t in tensors.items():
            if name.startswith(source):
                extra[prefix + name[len(source) :]] = t + noise(t.shape).to(t.dtype)
    save_file({**tensors, **extra}, root / "model.safetensors", metadata={"format": "pt"})
    if arch.model_type == "qwen3_next":
        config["num_nextn_predict_layers"] = arch.mtp
    else:
        config["num_nextn_predict_layers"] = arch.mtp
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


MTP_QWEN_NORMS = ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight")


def _full_attention_layer(config: dict) -> int:
    return config["layer_types"].index("full_attention")


# --- the tier: quantize as `ptqflow plan` suggests, then check what loaders would read ------

SCHEMES = ("W4A16", "NVFP4A16", "FP8_BLOCK")
# relative error of a weight dequantized by compressed-tensors against its source slice: a few
# times what each scheme gives on these random weights (FP8 ~0.02, 4-bit ~0.1); a weight from
# the wrong slice, or wrongly oriented, is off by ~1.4
BOUNDS = {"W4A16": 0.2, "NVFP4A16": 0.2, "FP8_BLOCK": 0.05}


def quantize_as_planned(src: Path, dst: Path, scheme: str) -> list[str]:
    """Quantize `src` with `scheme`, ignoring exactly what `ptqflow plan` suggests (layers
    usually left unquantized, and those its problems name); returns that ignore list."""
    from tasks.core.pipeline import quantize
    from tasks.core.planner import plan_checkpoint
    from tasks.core.schemes import resolve_config

    _, report = plan_checkpoint(src, resolve_config(scheme), strict=False)
    ignore = list(dict.fromkeys(report.suggestions + report.fixes))
    quantize(src, dst, resolve_config(scheme, ignore=ignore))
    return ignore


def source_slice(source: dict[str, torch.Tensor], prefix: str) -> torch.Tensor | None:
    """The source weight a quantized output layer holds, found by its name as each
    architecture's own transformers forward pass uses its fused experts (written here from
    the modeling code, independently of ptqflow's tasks/core/layouts.py): `prefix` is what
    precedes `weight_scale` in the output (`model.layers.0.mlp.experts.1.w13_`)."""
    import re

    if prefix.endswith(".") and prefix + "weight" in source:
        return source[prefix + "weight"]
    m = re.fullmatch(r"(.*)\.experts\.(\d+)\.(w13|w2)_", prefix)
    if m:  # gpt-oss: x @ gate_up_proj[e] (gate/up interleaved), down_proj[e]
        fused = "gate_up_proj" if m[3] == "w13" else "down_proj"
        return source[f"{m[1]}.experts.{fused}"][int(m[2])].T
    m = re.fullmatch(r"(.*)\.experts\.(\d+)\.(gate|up|down)_proj\.", prefix)
    if m and f"{m[1]}.experts.gate_up_proj" in source:  # Llama-4: x @ gate_up_proj[e], chunk(2, -1)
        if m[3] == "down":
            return source[f"{m[1]}.experts.down_proj"][int(m[2])].T
        gate, up = source[f"{m[1]}.experts.gate_up_proj"][int(m[2])].chunk(2, dim=-1)
        return (gate if m[3] == "gate" else up).T
    if m and f"{m[1]}.input_linear.weight" in source:  # GraniteMoE: F.linear, chunk(2, -1)
        if m[3] == "down":
            return source[f"{m[1]}.output_linear.weight"][int(m[2])]
        gate, up = source[f"{m[1]}.input_linear.weight"][int(m[2])].chunk(2, dim=0)
        return gate if m[3] == "gate" else up
    return None


def weight_errors(src: Path, dst: Path) -> dict[str, float]:
    """Relative error of every quantized layer of `dst`, dequantized by compressed-tensors,
    against its source slice (KeyError naming a layer with no source found)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    source = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    out = {k: v for f in sorted(dst.glob("*.safetensors")) for k, v in load_file(f).items()}
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "version"})
    (scheme,) = config.config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    errors = {}
    for name in sorted(n for n in out if n.endswith("weight_scale")):
        prefix = name.removesuffix("weight_scale")
        want = source_slice(source, prefix)
        if want is None:
            raise KeyError(f"{prefix}: no source tensor for this quantized layer")
        state = {k.removeprefix(prefix): v for k, v in out.items() if k.startswith(prefix)}
        state = {k: v for k, v in state.items() if k.startswith("weight")}
        state.setdefault("weight_shape", torch.tensor(want.shape))
        got = compressor.decompress(state, scheme)["weight"].float()
        want = want.float()
        if got.shape != want.shape:
            errors[prefix] = float("inf")
            continue
        errors[prefix] = float((got - want).norm() / want.norm())
    return errors


def transformers_logits(folder: Path) -> tuple[torch.Tensor, dict]:
    """Logits of transformers' model of `folder` on a fixed prompt, and its loading info."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, output_loading_info=True
    )
    with torch.no_grad():
        logits = model(torch.arange(3, 19).reshape(1, 16)).logits.float()
    return logits, {k: sorted(v) for k, v in info.items() if v}


# transformers 5 reads these architectures' experts only as their fused 3-D tensors: it has no
# quantized form of them (llama4's has one: its SequentialLlama4TextExperts)
FUSED_ONLY = ("gpt_oss", "granitemoe", "granitemoeshared", "granitemoehybrid")


def transformers_cannot(dst: Path) -> str | None:
    """Why transformers 5 cannot load `dst`'s quantized experts, if it cannot: for the
    tier, where only the dequantized weights can then be compared."""
    from safetensors import safe_open

    from tasks.core.layouts import model_type

    config = json.loads((dst / "config.json").read_text())
    names = []
    for f in dst.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            names += list(s.keys())
    experts = [n for n in names if ".experts." in n and "weight_scale" in n]
    if not experts:
        return None
    kind = model_type(config)
    if kind in FUSED_ONLY:
        return f"transformers reads {kind}'s experts only as fused 3-D tensors"
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    merged = any(
        isinstance(c, WeightConverter) and "experts" in c.target_patterns[0]
        for c in get_checkpoint_conversion_mapping(kind) or ()
    )
    if merged and any(n.endswith("weight_global_scale") for n in names):
        return "transformers merges NVFP4 experts without their global scales"
    if merged and config["quantization_config"]["format"] == "float-quantized":
        return "transformers scales FP8 experts as if per channel, not per block"
    return None


# --- docs/architectures.md: the tier's last run, as a table -----------------------------------


def run_tier(root: Path, vllm_python: Path | None) -> list[dict]:
    """Every architecture and scheme through the tier's three checks; one row per pair."""
    import subprocess

    rows = []
    for name, arch in ARCHS.items():
        src = build(root / name, name)
        want, _ = transformers_logits(src)
        for scheme in SCHEMES:
            dst = root / f"{name}-{scheme}"
            ignore = quantize_as_planned(src, dst, scheme)
            errors = weight_errors(src, dst)
            cannot = transformers_cannot(dst)
            logits = None
            if not cannot:
                got, info = transformers_logits(dst)
                logits = float((got - want).norm() / want.norm())
            rows.append(
                {
                    "arch": name,
                    "model_type": arch.model_type,
                    "kind": arch.kind,
                    "scheme": scheme,
                    "ignore": ignore,
                    "quantized": len(errors),
                    "worst": max(errors.values()),
                    "bound": BOUNDS[scheme],
                    "transformers": cannot or f"logits {logits:.3f}",
                    "src": str(src),
                    "dst": str(dst),
                }
            )
    if vllm_python is not None:
        folders = sorted({r[k] for r in rows for k in ("src", "dst")})
        run = subprocess.run(
            [
                str(vllm_python),
                str(Path(__file__).parents[1] / "benchmarks/vllm_load.py"),
                *folders,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        reports = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
        clean = {r["checkpoint"]: _clean(r) for r in reports}
        for r in rows:
            r["vllm"] = clean[r["src"]] and clean[r["dst"]]
    return rows


def _clean(report: dict) -> bool:
    parts = [v for k, v in report.items() if k not in ("checkpoint", "config")]
    ok = {"error": None, "rejected": {}, "unwritten": []}
    return report["config"]["error"] is None and all(p == ok for p in parts)


def table(rows: list[dict], versions: str) -> str:
    """docs/architectures.md from `run_tier`'s rows."""
    notes: dict[str, int] = {}
    lines = [
        "# Architectures proven",
        "",
        "Generated by `python -m tests.architectures` (the architecture tier of",
        "`tests/test_architectures.py`) from its last run; do not edit by hand.",
        "",
        "Each architecture is a tiny checkpoint built by transformers' own model class and",
        "written by `save_pretrained` (tensor names and layouts as on the Hub), quantized",
        "ignoring only what `ptqflow plan` suggests. A cell reads: vLLM's own loader refuses",
        "nothing and leaves nothing unwritten (main model and MTP drafter) · transformers loads",
        "it, with the relative error of its logits against the BF16 model's · every quantized",
        "weight, dequantized, within the scheme's bound of its source slice (worst error).",
        f"Versions: {versions}.",
        "",
        f"| architecture | kind | {' | '.join(SCHEMES)} |",
        "|---|---|" + "---|" * len(SCHEMES),
    ]
    by_arch: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_arch.setdefault(r["arch"], {})[r["scheme"]] = r
    for name, cells in by_arch.items():
        first = next(iter(cells.values()))
        out = []
        for scheme in SCHEMES:
            r = cells[scheme]
            vllm = {True: "vLLM ✓", False: "vLLM ✗", None: "vLLM —"}[r.get("vllm")]
            if r["transformers"].startswith("logits"):
                hf = f"HF {r['transformers'].split()[1]}"
            else:
                n = notes.setdefault(r["transformers"], len(notes) + 1)
                hf = f"HF —{n}"
            ok = "✓" if r["worst"] <= r["bound"] else "✗"
            out.append(f"{vllm} · {hf} · weights {ok} {r['worst']:.3f}")
        lines.append(f"| {name} (`{first['model_type']}`) | {first['kind']} | {' | '.join(out)} |")
    lines += ["", "HF — : transformers 5 cannot load these quantized experts; only the weights "]
    lines[-1] += "are compared:"
    lines += [f"{n}. {why}." for why, n in notes.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse
    import importlib.metadata as md
    import subprocess
    import tempfile

    parser = argparse.ArgumentParser(description="run the architecture tier, write its table")
    parser.add_argument("--out", default="docs/architectures.md")
    args = parser.parse_args()
    root = Path(__file__).parents[1]
    vllm = root / "benchmarks/.venv-vllm/bin/python"
    vllm = vllm if vllm.exists() else None
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_tier(Path(tmp), vllm)
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("transformers", "compressed-tensors"))
    if vllm is not None:
        v = subprocess.run(
            [str(vllm), "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
        )
        versions += f", vLLM {v.stdout.strip()} (its loader on the CPU, benchmarks/vllm_load.py)"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table(rows, versions))
    print(f"{len(rows)} outputs, {sum(r.get('vllm', True) for r in rows)} clean in vLLM")


if __name__ == "__main__":
    main()
