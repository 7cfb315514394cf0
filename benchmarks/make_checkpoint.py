"""Write a synthetic Llama-style checkpoint of a chosen size, offline, with real tensor names.

    python benchmarks/make_checkpoint.py DIR [--size-gb 1.6] [--shard-gb 0.4] [--hidden 4096]

Layers have Llama-3-8B's shapes by default (hidden 4096, 14336 MLP, 8 KV heads);
use a smaller --hidden for quick examples. Weights are random normal in BF16.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def layer_shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    return {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (intermediate, hidden),
        "mlp.up_proj.weight": (intermediate, hidden),
        "mlp.down_proj.weight": (hidden, intermediate),
    }


def make_checkpoint(
    path: str | Path,
    size_gb: float = 1.6,
    shard_gb: float = 0.4,
    hidden: int = 4096,
    seed: int = 0,
) -> Path:
    """Write config.json, shards, index and a tokenizer_config.json; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    intermediate, kv, vocab = hidden * 7 // 2, hidden // 4, 8 * hidden
    gen = torch.Generator().manual_seed(seed)
    shapes = layer_shapes(hidden, intermediate, kv)
    per_layer = sum(r * c for r, c in shapes.values()) * 2
    layers = max(1, round((size_gb * 1e9 - 2 * vocab * hidden * 2) / per_layer))
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        tensors += [(f"model.layers.{i}.{k}", v) for k, v in shapes.items()]
        tensors += [
            (f"model.layers.{i}.input_layernorm.weight", (hidden,)),
            (f"model.layers.{i}.post_attention_layernorm.weight", (hidden,)),
        ]
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        n = 2
        for d in shape:
            n *= d
        if shards[-1] and size + n > shard_gb * 1e9:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shard}
        save_file(data, path / fname, metadata={"format": "pt"})
        for n, t in data.items():
            weight_map[n] = fname
            total += t.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": kv // 128,
        "head_dim": 128,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path")
    p.add_argument("--size-gb", type=float, default=1.6)
    p.add_argument("--shard-gb", type=float, default=0.4)
    p.add_argument("--hidden", type=int, default=4096)
    a = p.parse_args()
    out = make_checkpoint(a.path, a.size_gb, a.shard_gb, a.hidden)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
