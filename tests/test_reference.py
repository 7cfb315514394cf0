"""Output bytes equal compressed-tensors' own compression, weight by weight and checkpoint-wide."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
import yaml

from tasks.core.quant.compress import quantize_weights
from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint, load_tensors
from tests.helpers import (
    FUSED,
    IGNORE,
    SCHEMES,
    assert_same_bytes,
    default_groups,
    quantize_folder,
    scheme_of,
    split_experts,
)
from tests.reference import reference_compress


@pytest.mark.parametrize("name", SCHEMES + ["W2A16", "W3A16", "W6A16"])
@pytest.mark.parametrize("shape", [(256, 256), (576, 512), (128, 384)])
def test_weight_matches_compressed_tensors(name, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    w[0, :64] = 0  # an all-zero group/block must keep its epsilon scale
    (got,) = quantize_weights([w], scheme_of(name))
    (want,) = reference_compress([w], scheme_of(name))
    assert_same_bytes(got, want)


@pytest.mark.parametrize("shape", [(576, 256), (300, 200), (100, 130)])
@pytest.mark.parametrize("name", ["FP8_BLOCK", "FP8_DYNAMIC", "INT8"])
def test_partial_blocks_match_compressed_tensors(name, shape):
    """576 rows and widths not divisible by 128 are padded as compressed-tensors pads them."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    (got,) = quantize_weights([w], scheme_of(name))
    (want,) = reference_compress([w], scheme_of(name))
    assert_same_bytes(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["FP8_BLOCK", "NVFP4A16", "W4A16_ASYM"])
def test_other_source_dtypes(name, dtype):
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert_same_bytes(
        quantize_weights([w], scheme_of(name))[0], reference_compress([w], scheme_of(name))[0]
    )


def test_fused_set_shares_one_global_scale():
    g = torch.Generator().manual_seed(4)
    ws = [(torch.randn(256, 256, generator=g) * s).to(torch.bfloat16) for s in (1.0, 3.0, 0.2)]
    got = quantize_weights(ws, scheme_of("NVFP4A16"))
    for a, b in zip(got, reference_compress(ws, scheme_of("NVFP4A16")), strict=True):
        assert_same_bytes(a, b)
    assert len({bytes(s["weight_global_scale"].view(torch.uint8)) for s in got}) == 1
    alone = quantize_weights(ws[:1], scheme_of("NVFP4A16"))[0]["weight_global_scale"]
    assert not torch.equal(alone, got[0]["weight_global_scale"])


# --- whole checkpoints -------------------------------------------------------------------


def expected_output(source: dict[str, torch.Tensor], groups: dict[str, object], fused: bool):
    """Reference output tensors: `groups` maps weight name -> scheme for quantized weights."""
    sets: dict[tuple, list[str]] = defaultdict(list)
    for name in groups:
        parent, leaf = name[: -len(".weight")].rsplit(".", 1)
        key = next((f for f in FUSED if leaf in f), None) if fused else None
        sets[(parent, key) if key else (name,)].append(name)
    out = {k: v for k, v in source.items() if k not in groups}
    for members in sets.values():
        states = reference_compress([source[m] for m in members], groups[members[0]])
        for m, state in zip(members, states, strict=True):
            for k, v in state.items():
                out[f"{m[: -len('weight')]}{k}"] = v
    return out


# the fast tier covers llama; the other architectures run in the full suite
ARCHS = ["llama"] + [
    pytest.param(a, marks=pytest.mark.slow)
    for a in ("qwen3_moe", "deepseek_v3", "fused_experts", "tied")
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SCHEMES)
def test_checkpoint_matches_reference(tmp_path, arch, name):
    src = build_checkpoint(tmp_path / "src", arch, shards=3)
    config = resolve_config(name, ignore=IGNORE)
    quantize_folder(src, tmp_path / "out", config)
    source = split_experts(load_tensors(src))
    scheme = scheme_of(name)
    want = expected_output(source, default_groups(source, scheme), fused="NVFP4" in name)
    assert_same_bytes(load_tensors(tmp_path / "out"), want)

    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in want.values())
    qc = json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["quantization_status"] == "compressed"
    assert (
        qc["format"] == scheme_of(name).format
        or qc["format"] == qc["config_groups"][name]["format"]
    )
    assert qc["ignore"][: len(IGNORE)] == IGNORE


@pytest.mark.slow
def test_config_file_first_matching_group_wins(tmp_path):
    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=2)
    attn, rest = scheme_of("NVFP4A16"), scheme_of("FP8_DYNAMIC")
    cfg = {
        "config_groups": {
            "attention": {
                "targets": [r"re:.*self_attn\.(q|k|v|o)_proj$"],
                "weights": attn.weights.model_dump(),
            },
            "experts": {
                "targets": [r"re:.*experts\.\d+\..*"],
                "weights": rest.weights.model_dump(),
                "input_activations": rest.input_activations.model_dump(),
            },
            "everything": {"targets": ["Linear"], "weights": attn.weights.model_dump()},
        },
        "ignore": ["lm_head", "re:.*mlp.gate$"],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str)), sort_keys=False))
    config = resolve_config(config=str(path), ignore=["model.embed_tokens"])
    quantize_folder(src, tmp_path / "out", config)
    source = load_tensors(src)
    groups = {}
    for n in default_groups(source, attn):
        groups[n] = attn if "self_attn" in n else rest if ".experts." in n else attn
    assert_same_bytes(load_tensors(tmp_path / "out"), expected_output(source, groups, fused=True))
    qc = json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    assert sorted(qc["config_groups"]) == ["attention", "everything", "experts"]
