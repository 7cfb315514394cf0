"""Loadability (optional, `--load`): both checkpoints loaded with transformers, their
logits compared."""

from __future__ import annotations

import torch

from storage.errors import PtqflowError
from storage.source import Folder
from tasks.core.verify.records import MIN_LOGITS_COSINE

__all__ = [
    "compare_logits",
    "model_files",
]


def compare_logits(source_dir: str, quantized_dir: str, min_bits: int) -> tuple[dict, list[str]]:
    """Load both with transformers, run both on fixed token ids; returns figures and problems.

    For small models: both are loaded in float32 on the CPU.
    """
    try:
        import transformers
    except ImportError:
        raise PtqflowError("--load needs transformers: pip install transformers") from None
    auto = transformers.AutoModelForCausalLM
    ref = auto.from_pretrained(source_dir, dtype=torch.float32)
    try:
        model, info = auto.from_pretrained(
            quantized_dir, dtype=torch.float32, output_loading_info=True
        )
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        return {}, [f"transformers cannot load QUANTIZED: {str(e).strip().splitlines()[-1]}"]
    problems = [
        f"transformers, loading QUANTIZED: {k.replace('_', ' ')}: {', '.join(map(str, v))}"
        for k, v in info.items()
        if v
    ]
    vocab = ref.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits.float(), model(ids).logits.float()
    figures = {
        "max_abs_diff": float((got - want).abs().max()),
        "cosine": float(torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), 0)),
        "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean()),
    }
    if not torch.isfinite(got).all():
        problems.append("logits of QUANTIZED are not all finite")
    elif min_bits >= 4 and figures["cosine"] < MIN_LOGITS_COSINE:
        problems.append(
            f"logits cosine {figures['cosine']:.4f} to SOURCE's is below {MIN_LOGITS_COSINE}"
        )
    return figures, problems


def model_files(folder: Folder) -> list[str]:
    """What transformers reads to load a model: top-level JSON and safetensors files."""
    return [f for f in folder.files() if "/" not in f and f.endswith((".json", ".safetensors"))]
