"""How accurate each data-free scheme × observer is: weight error, output error, perplexity.

    python benchmarks/accuracy.py [--schemes W4A16,NVFP4A16] [--seeds 3] [--train-seconds 240]
        [--rotate]

1. Layers with realistic statistics: Student-t(4) weights (out 1024 × in 2048)
   whose 16 outlier input columns are 8× larger, and inputs X (512 tokens)
   with 8 outlier channels 20× larger, over --seeds seeds. Per scheme ×
   observer: relative weight error ‖Ŵ - W‖/‖W‖, relative output error
   ‖XŴᵀ - XWᵀ‖/‖XWᵀ‖ (means over seeds), and the seconds ptqflow spent.
2. A small Llama (4 layers, hidden 256, byte vocabulary), trained here for
   --train-seconds on the CPU on Python's standard library sources (the only
   text every machine here has) and cached under benchmarks/.data/. Each
   scheme × observer quantizes it with ptqflow (lm_head and embeddings left in
   BF16), transformers loads the result, and its perplexity on 1024 windows
   of held-out library files is compared with BF16's.

With --rotate, every scheme × observer also runs after a Hadamard rotation
(`--rotate hadamard`): the layer's W·Q is quantized and its output error is
‖(XQ)Ŵᵀ - XWᵀ‖/‖XWᵀ‖ (XQ·(WQ)ᵀ = XWᵀ), the model's residual stream is rotated.

Ŵ is what compressed-tensors decompresses from ptqflow's bytes. Nothing is
downloaded: no model or dataset can be, here.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL = HERE / ".data" / "stdlib-llama"
OBSERVERS = {
    "W4A16": ["minmax", "memoryless_mse", "nvfp4_expanded_mse"],
    "NVFP4A16": ["minmax", "memoryless_mse", "nvfp4_expanded_mse"],
    "MXFP4A16": ["minmax", "memoryless_mse"],
    "FP8_BLOCK": ["minmax", "memoryless_mse"],
}
SEQ = 256
# left in BF16, as usual (transformers loads no quantized embedding)
IGNORE = ["lm_head", "model.embed_tokens"]


def scheme_of(name: str, observer: str):
    from tasks.core.schemes import resolve_config

    chosen = None if observer == "minmax" else observer
    (scheme,) = resolve_config(name, observer=chosen).config_groups.values()
    return scheme


def layer(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (1024 × 2048) and inputs (512 × 2048), both with outlier channels."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w = torch.distributions.StudentT(4.0).sample((1024, 2048)) * 0.02
    w[:, torch.randperm(2048, generator=g)[:16]] *= 8
    x = torch.randn(512, 2048, generator=g)
    x[:, torch.randperm(2048, generator=g)[:8]] *= 20
    return w.to(torch.bfloat16), x


def layer_errors(name: str, observer: str, seeds: int, rotated: bool = False) -> dict:
    from tasks.core.quant.compress import quantize_weights
    from tasks.core.records import Rotation
    from tasks.core.rotate import block_of, rotate
    from tasks.core.verify.accuracy import dequantized

    scheme = scheme_of(name, observer)
    weight_err, output_err, seconds = [], [], 0.0
    for seed in range(seeds):
        w, x = layer(seed)
        y = x @ w.float().T
        if rotated:  # the layer reads a rotated stream: W·Q, X·Q
            r = Rotation("in", w.shape[1], block_of(w.shape[1]))
            w, x = rotate(w, r), rotate(x, r)
        start = time.perf_counter()
        (state,) = quantize_weights([w], scheme)
        seconds += time.perf_counter() - start
        deq = dequantized(state, scheme, w.shape).float()
        wf = w.float()
        weight_err.append(float((deq - wf).norm() / wf.norm()))
        output_err.append(float((x @ deq.T - y).norm() / y.norm()))
    return {
        "weight": sum(weight_err) / seeds,
        "output": sum(output_err) / seeds,
        "seconds": seconds,
    }


def corpus() -> tuple[bytes, bytes]:
    """Training and held-out text: the standard library's sources, split by file."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held = [f for i, f in enumerate(files) if i % 10 == 0]
    train = [f for i, f in enumerate(files) if i % 10 != 0]
    return b"\n".join(f.read_bytes() for f in train), b"\n".join(f.read_bytes() for f in held)


def batches(text: bytes, size: int, generator: torch.Generator) -> torch.Tensor:
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    starts = torch.randint(0, len(data) - SEQ - 1, (size,), generator=generator)
    return torch.stack([data[s : s + SEQ + 1] for s in starts.tolist()]).long()


def trained_model(seconds: float) -> Path:
    """The small Llama, trained once and cached as a safetensors checkpoint."""
    import transformers

    if (MODEL / "config.json").exists():
        return MODEL
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    train, _ = corpus()
    g = torch.Generator().manual_seed(0)
    start, step = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        batch = batches(train, 16, g)
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        step += 1
        if step % 50 == 0:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    model.to(torch.bfloat16).save_pretrained(MODEL)
    print(f"trained {step} steps in {time.monotonic() - start:.0f} s -> {MODEL}", flush=True)
    return MODEL


@torch.no_grad()
def perplexity(path: Path, windows: int = 1024) -> float:
    """exp(mean loss) per byte on held-out text: `windows` windows of 256 bytes."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    _, held = corpus()
    data = batches(held, windows, torch.Generator().manual_seed(1))
    losses = [
        float(model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss) for batch in data.split(64)
    ]
    return math.exp(sum(losses) / len(losses))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--schemes", default="W4A16,NVFP4A16,MXFP4A16,FP8_BLOCK")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-seconds", type=float, default=240.0)
    p.add_argument("--no-model", action="store_true", help="layer errors only")
    p.add_argument("--rotate", action="store_true", help="also every row after --rotate hadamard")
    a = p.parse_args(argv)
    from tasks.core.pipeline import quantize
    from tasks.core.schemes import resolve_config

    names = a.schemes.split(",")
    rows = {
        (n, o, r): layer_errors(n, o, a.seeds, r)
        for n in names
        for r in ((False, True) if a.rotate else (False,))
        for o in OBSERVERS[n]
    }
    model, base = None, None
    if not a.no_model:
        model = trained_model(a.train_seconds)
        base = perplexity(model)
        with tempfile.TemporaryDirectory() as work:
            for (name, observer, rotated), row in rows.items():
                out = Path(work) / f"{name}-{observer}-{rotated}"
                chosen = None if observer == "minmax" else observer
                config = resolve_config(name, ignore=IGNORE, observer=chosen)
                quantize(model, out, config, rotate="hadamard" if rotated else "none")
                row["ppl"] = perplexity(out)
    print(f"\nlayers: {a.seeds} seeds of W 1024×2048 (Student-t(4), 16 outlier input columns ×8),")
    print("X 512×2048 (8 outlier channels ×20); means over seeds")
    if base is not None:
        print(f"model: {MODEL.name}, perplexity per byte on held-out stdlib files, BF16 {base:.4f}")
    head = (
        f"{'scheme':<10} {'observer':<20} {'rotate':<8} {'weight err':>10} {'output err':>10} "
        f"{'vs min-max':>10}"
    )
    head += f" {'seconds':>8}" + (f" {'ppl':>8} {'Δppl':>8}" if base is not None else "")
    print(head)
    print("-" * len(head))
    for (name, observer, rotated), r in rows.items():
        ref = rows[name, "minmax", False]["output"]
        line = (
            f"{name:<10} {observer:<20} {'hadamard' if rotated else '-':<8} {r['weight']:>10.4f} "
            f"{r['output']:>10.4f} {r['output'] / ref - 1:>+10.1%} {r['seconds']:>8.2f}"
        )
        if base is not None:
            line += f" {r['ppl']:>8.4f} {r['ppl'] - base:>+8.4f}"
        print(line)


if __name__ == "__main__":
    main()
