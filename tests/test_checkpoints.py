"""Self-checks for the test-checkpoint builders in ``tests.checkpoints``."""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest
import torch
from safetensors import safe_open

from tests.checkpoints import ARCHS, build_checkpoint, load_tensors, write_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIDE_FILES = (
    "config.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "assets/readme.txt",
)

FUSED_SETS = (
    re.compile(r"^(.*\.self_attn)\.(?:q|k|v)_proj\.weight$"),
    re.compile(r"^(.*\.self_attn)\.(?:q_a_proj|kv_a_proj_with_mqa)\.weight$"),
    re.compile(r"^(.*\.mlp(?:\.shared_experts|\.experts\.\d+)?)\.(?:gate|up)_proj\.weight$"),
)


def _weight_map(path: pathlib.Path) -> dict[str, str]:
    """Tensor name -> file, read from the shard headers."""
    out: dict[str, str] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert name not in out
                out[name] = file.name
    return out


def _split_sets(weight_map: dict[str, str]) -> list[str]:
    """Fused sets whose members live in more than one file."""
    files: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        for i, pattern in enumerate(FUSED_SETS):
            if match := pattern.match(name):
                files.setdefault(f"{i}:{match[1]}", set()).add(file)
    return sorted(key for key, where in files.items() if len(where) > 1)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], pathlib.Path]:
    """Every arch built once with one and with three shards."""
    root = tmp_path_factory.mktemp("ckpts")
    return {
        (arch, shards): build_checkpoint(root / f"{arch}-{shards}", arch, shards=shards)
        for arch in ARCHS
        for shards in (1, 3)
    }


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_layout(built: dict[tuple[str, int], pathlib.Path], arch: str, shards: int) -> None:
    """Files, index, and a deliberately split fused set."""
    path = built[(arch, shards)]
    for side in SIDE_FILES:
        assert (path / side).is_file(), side
    weight_map = _weight_map(path)
    tensors = load_tensors(path)
    assert set(weight_map) == set(tensors)
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 512
    if shards == 1:
        assert set(weight_map.values()) == {"model.safetensors"}
        assert not (path / "model.safetensors.index.json").exists()
        return
    expected_files = {f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)}
    assert set(weight_map.values()) == expected_files
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert _split_sets(weight_map), "expected at least one fused set split across shards"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_split_when_disabled(tmp_path: pathlib.Path, arch: str) -> None:
    """split_fused=False keeps every fused set in one shard."""
    path = build_checkpoint(tmp_path / arch, arch, shards=3, split_fused=False)
    assert _split_sets(_weight_map(path)) == []


def test_names_and_shapes(built: dict[tuple[str, int], pathlib.Path]) -> None:
    """Real Hub tensor names and the chosen small shapes."""
    llama = load_tensors(built[("llama", 1)])
    assert llama["model.layers.1.self_attn.q_proj.weight"].shape == (256, 256)
    assert llama["model.layers.1.self_attn.k_proj.weight"].shape == (128, 256)
    assert llama["model.layers.0.mlp.down_proj.weight"].shape == (256, 512)
    assert llama["lm_head.weight"].shape == (512, 256)
    assert all(t.dtype == torch.bfloat16 for t in llama.values())

    tied = load_tensors(built[("tied", 1)])
    assert "lm_head.weight" not in tied and "model.embed_tokens.weight" in tied
    config = json.loads((built[("tied", 1)] / "config.json").read_text())
    assert config["tie_word_embeddings"] is True

    qwen3 = load_tensors(built[("qwen3", 1)])
    assert qwen3["model.layers.0.self_attn.q_proj.weight"].shape == (512, 256)
    assert qwen3["model.layers.0.self_attn.o_proj.weight"].shape == (256, 512)
    assert qwen3["model.layers.0.self_attn.q_norm.weight"].shape == (128,)

    moe = load_tensors(built[("qwen3_moe", 1)])
    for layer in (0, 1):
        assert moe[f"model.layers.{layer}.mlp.gate.weight"].shape == (4, 256)
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                assert moe[name].shape == (256, 256)
    assert not any(t.dim() == 3 for t in moe.values())

    ds = load_tensors(built[("deepseek_v3", 1)])
    attn = "model.layers.1.self_attn"
    assert ds[f"{attn}.q_a_proj.weight"].shape == (384, 256)
    assert ds[f"{attn}.q_a_layernorm.weight"].shape == (384,)
    assert ds[f"{attn}.q_b_proj.weight"].shape == (768, 384)
    assert ds[f"{attn}.kv_a_proj_with_mqa.weight"].shape == (576, 256)
    assert ds[f"{attn}.kv_a_layernorm.weight"].shape == (512,)
    assert ds[f"{attn}.kv_b_proj.weight"].shape == (1024, 512)
    assert ds[f"{attn}.o_proj.weight"].shape == (256, 512)
    assert ds["model.layers.0.mlp.gate_proj.weight"].shape == (512, 256)
    assert not any(n.startswith("model.layers.0.mlp.experts") for n in ds)
    assert ds["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert ds["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert ds["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (256, 256)
    assert ds["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (256, 256)

    fused = load_tensors(built[("fused_experts", 1)])
    assert fused["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 512, 256)
    assert fused["model.layers.0.mlp.experts.down_proj"].shape == (4, 256, 256)
    assert not any(".experts.0." in n for n in fused)
    # Same seed: fused layout is the stack of the per-expert layout (gate rows first).
    gate_up = torch.stack(
        [
            torch.cat(
                [
                    moe[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"],
                    moe[f"model.layers.0.mlp.experts.{e}.up_proj.weight"],
                ]
            )
            for e in range(4)
        ]
    )
    assert torch.equal(fused["model.layers.0.mlp.experts.gate_up_proj"], gate_up)


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_transformers(built: dict[tuple[str, int], pathlib.Path], arch: str) -> None:
    """from_pretrained finds exactly the checkpoint's tensors, with equal values."""
    from transformers import AutoModelForCausalLM

    path = built[(arch, 3)]
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    # transformers builds no multi-token-prediction layer (model.layers.2 here): its keys are
    # unexpected, as with real DeepSeek-V3 checkpoints
    mtp = "model.layers.2." if arch.endswith("_mtp") else "-"
    assert not info["missing_keys"]
    assert not [k for k in info["unexpected_keys"] if not k.startswith(mtp)]
    if arch.endswith("_mtp"):
        assert any(k.startswith(f"{mtp}eh_proj") for k in info["unexpected_keys"])
    assert not info["mismatched_keys"] and not info["error_msgs"]
    ckpt = load_tensors(path)
    for name, value in model.state_dict().items():
        match = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)$", name)
        if name in ckpt:
            expected = ckpt[name]
        elif name == "lm_head.weight":
            expected = ckpt["model.embed_tokens.weight"]
        elif match and match[2] == "gate_up_proj":
            expected = torch.stack(
                [
                    torch.cat(
                        [
                            ckpt[f"{match[1]}.{e}.gate_proj.weight"],
                            ckpt[f"{match[1]}.{e}.up_proj.weight"],
                        ]
                    )
                    for e in range(value.shape[0])
                ]
            )
        else:
            assert match, name
            expected = torch.stack(
                [ckpt[f"{match[1]}.{e}.down_proj.weight"] for e in range(value.shape[0])]
            )
        assert torch.equal(value.float(), expected.float()), name


def test_deterministic_and_dtype(tmp_path: pathlib.Path) -> None:
    """Same seed gives the same tensors; dtype and seed are honoured."""
    a = load_tensors(build_checkpoint(tmp_path / "a", "llama", seed=3))
    b = load_tensors(build_checkpoint(tmp_path / "b", "llama", seed=3))
    c = load_tensors(build_checkpoint(tmp_path / "c", "llama", seed=4, dtype=torch.float32))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(t.dtype == torch.float32 for t in c.values())
    assert not torch.equal(a["lm_head.weight"].float(), c["lm_head.weight"])


def test_write_checkpoint_custom(tmp_path: pathlib.Path) -> None:
    """Low-level writer with odd shapes and an explicit assignment."""
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(100, 72, dtype=torch.bfloat16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(36, 72, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(72),
    }
    assignment = {
        "model.layers.0.self_attn.q_proj.weight": 1,
        "model.layers.0.self_attn.k_proj.weight": 0,
        "model.norm.weight": 0,
    }
    config = {"model_type": "llama"}
    path = write_checkpoint(tmp_path / "odd", tensors, config, assignment=assignment)
    weight_map = _weight_map(path)
    q_file = weight_map["model.layers.0.self_attn.q_proj.weight"]
    assert q_file == "model-00002-of-00002.safetensors"
    assert _split_sets(weight_map) == ["0:model.layers.0.self_attn"]
    loaded = load_tensors(path)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert json.loads((path / "config.json").read_text()) == config
    for side in SIDE_FILES:
        assert (path / side).is_file(), side
    with pytest.raises(ValueError):
        write_checkpoint(tmp_path / "bad", tensors, {}, assignment={"model.norm.weight": 0})
