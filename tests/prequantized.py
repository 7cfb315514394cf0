"""Small pre-quantized checkpoints, written the way their publishers write them.

* FP8 block (DeepSeek-V3 / Kimi-K2): every linear weight except the router,
  embeddings and lm_head as float8_e4m3fn with a float32 `weight_scale_inv`
  per 128x128 block (amax / 448, as DeepSeek's `weight_quant` does).
* compressed-tensors: made by ptqflow itself (W4A16, NVFP4A16).
* ModelOpt NVFP4: ptqflow's NVFP4 tensors under ModelOpt's names and
  conventions (`weight` uint8, `weight_scale_2` = 1 / global scale, scalar
  `input_scale`, k/v scales on k_proj/v_proj).
* AutoAWQ GEMM: random packed `qweight`/`qzeros` and fp16 `scales` (every
  bit pattern is a valid 4-bit value).

The expected dequantized tensors come from compressed-tensors' converters
applied to the whole checkpoint at once (`converter_dequantize`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint, load_tensors, write_checkpoint
from tests.helpers import IGNORE, quantize_folder

FP8_MAX = 448.0
BLOCK = 128
UNQUANTIZED = ("embed_tokens", "lm_head", "mlp.gate")


def _linear(name: str, t: torch.Tensor) -> bool:
    module = name.removesuffix(".weight")
    return (
        name.endswith(".weight")
        and t.ndim == 2
        and not module.endswith("norm")
        and not module.endswith(UNQUANTIZED)
    )


def _bf16(tmp: Path, arch: str) -> tuple[dict[str, torch.Tensor], dict]:
    src = build_checkpoint(tmp / f"bf16-{arch}", arch)
    return load_tensors(src), json.loads((src / "config.json").read_text())


def fp8_block(path: Path, arch: str = "deepseek_v3", shards: int = 3) -> Path:
    """DeepSeek-style FP8 checkpoint; one weight_scale_inv is in another shard than its weight."""
    tensors, config = _bf16(path.parent, arch)
    out = {}
    for name, t in tensors.items():
        if not _linear(name, t):
            out[name] = t
            continue
        rows, cols = t.shape
        pr, pc = -rows % BLOCK, -cols % BLOCK
        x = torch.nn.functional.pad(t.float(), (0, pc, 0, pr))
        blocks = x.view(x.shape[0] // BLOCK, BLOCK, x.shape[1] // BLOCK, BLOCK)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
        q = (blocks / scale[:, None, :, None]).view_as(x)[:rows, :cols]
        out[name] = q.to(torch.float8_e4m3fn)
        out[name.removesuffix("weight") + "weight_scale_inv"] = scale
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [BLOCK, BLOCK],
    }
    names = list(out)
    assignment = {n: i * shards // len(names) for i, n in enumerate(names)}
    scales = [n for n in names if n.endswith("weight_scale_inv")]
    moved = scales[len(scales) // 2]
    assignment[moved] = (assignment[moved] + 1) % shards
    return write_checkpoint(path, out, config, assignment=assignment)


def compressed(path: Path, scheme: str, arch: str = "qwen3_moe") -> Path:
    """A compressed-tensors checkpoint made by ptqflow from a BF16 one."""
    src = build_checkpoint(path.parent / f"bf16-{arch}-{scheme}", arch, shards=2)
    quantize_folder(src, path, resolve_config(scheme, ignore=IGNORE))
    return path


def modelopt_nvfp4(path: Path, arch: str = "llama") -> Path:
    ct = compressed(path.parent / "ct-nvfp4", "NVFP4A16", arch)
    tensors = load_tensors(ct)
    out = {}
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight_packed":
            out[f"{module}.weight"] = t
            out[f"{module}.input_scale"] = torch.tensor(0.0123, dtype=torch.float32)
            if module.endswith(("k_proj", "v_proj")):
                out[f"{module}.{module[-6]}_scale"] = torch.tensor(0.5, dtype=torch.float32)
        elif leaf == "weight_global_scale":
            out[f"{module}.weight_scale_2"] = (1 / t).reshape(())
        else:
            out[name] = t
    config = json.loads((ct / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "modelopt",
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": "FP8",
        "group_size": 16,
        "exclude_modules": ["lm_head", "model.embed_tokens"],
        "producer": {"name": "modelopt", "version": "0.37.0"},
    }
    return write_checkpoint(path, out, config, shards=2)


def awq(path: Path, arch: str = "llama", group: int = 128) -> Path:
    tensors, config = _bf16(path.parent, arch)
    gen = torch.Generator().manual_seed(7)
    out = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if not _linear(name, t):
            out[name] = t
            continue
        rows, cols = t.shape  # AutoAWQ stores [in, out]
        bits = torch.randint(-(2**31), 2**31 - 1, (cols, rows // 8), generator=gen)
        zeros = torch.randint(-(2**31), 2**31 - 1, (cols // group, rows // 8), generator=gen)
        scales = torch.rand((cols // group, rows), generator=gen) * 0.01 + 0.001
        out[f"{module}.qweight"] = bits.to(torch.int32)
        out[f"{module}.qzeros"] = zeros.to(torch.int32)
        out[f"{module}.scales"] = scales.to(torch.float16)
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    return write_checkpoint(path, out, config, shards=2)


def converter_dequantize(src: Path, work: Path) -> dict[str, torch.Tensor]:
    """The whole checkpoint dequantized by compressed-tensors' converters: ModelOpt and
    AutoAWQ are first converted to compressed-tensors on disk by its convert_checkpoint.
    Activation and KV-cache scales are dropped."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert import converters as c
    from compressed_tensors.quantization import QuantizationArgs

    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    method = qc["quant_method"]
    if method in ("modelopt", "awq"):
        if method == "modelopt":  # targets: what NVIDIA's checkpoints list (quantized modules)
            names = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
            targets = [
                n.removesuffix(".weight_scale_2") for n in names if n.endswith(".weight_scale_2")
            ]
            kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False)
            to_ct = c.ModelOptNvfp4Converter(
                targets=targets, ignore=qc["exclude_modules"], kv_cache_scheme=kv
            )
        else:
            to_ct = c.AutoAWQConverter.from_pretrained(str(src))
        convert_checkpoint(str(src), str(work), to_ct, max_workers=1, device="cpu")
        src = work
    if method == "fp8":
        dequantizer = c.FP8BlockDequantizer.from_pretrained(str(src))
    else:
        dequantizer = c.CompressedTensorsDequantizer(str(src))
    tensors = dequantizer.process(load_tensors(src))
    drop = ("input_scale", "input_global_scale", "k_scale", "v_scale")
    return {n: t for n, t in tensors.items() if n.rpartition(".")[2] not in drop}
