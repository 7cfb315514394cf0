"""--rotate hadamard: the rotated checkpoint computes the same function; what cannot be proved
is refused; rotated quantized outputs verify, and resume under their own keys."""

from __future__ import annotations

import json
import math

import pytest
import torch

from storage.errors import PtqflowError
from tasks.core.keys import shard_key
from tasks.core.planner import plan_checkpoint
from tasks.core.records import ROTATION_KEY, Rotation
from tasks.core.rotate import block_of, rotate
from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint, load_tensors
from tests.helpers import IGNORE, quantize_folder

NO_QUANTIZATION = {"config_groups": {}}


def logits(path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


ARCHS = ("llama", "qwen3", "qwen3_moe", "deepseek_v3", "fused_experts", "tied")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_rotated_checkpoint_computes_the_same_function(tmp_path, arch):
    """transformers models built from SOURCE and from the rotated BF16 checkpoint give the same
    logits within BF16 rounding (each rotated weight is rounded once: ~2^-8 relative), while
    every weight on the residual stream changed and every norm became 1."""
    src = build_checkpoint(tmp_path / "src", arch, shards=2)
    out = tmp_path / "rotated"
    quantize_folder(src, out, resolve_config(config=NO_QUANTIZATION), rotate="hadamard")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    want, got = logits(src, ids), logits(out, ids)
    assert float((got - want).norm() / want.norm()) < 1e-2
    before, after = load_tensors(src), load_tensors(out)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(after["model.norm.weight"], torch.ones_like(before["model.norm.weight"]))
    config = json.loads((out / "config.json").read_text())
    assert config[ROTATION_KEY]["kind"] == "hadamard"
    if arch == "tied":  # untied: lm_head is the embedding with the final norm folded in
        assert config["tie_word_embeddings"] is False and "lm_head.weight" in after


def test_rotation_is_orthogonal_and_folds_the_norm():
    size = 7168  # DeepSeek-V3 / Kimi-K2: 7 blocks of 1024
    block = block_of(size)
    assert block == 1024
    x, w, norm = torch.randn(3, size), torch.randn(5, size), torch.rand(size) + 0.5
    into, out_of = Rotation("in", size, block), Rotation("out", size, block)
    xq = rotate(x, into)
    assert torch.allclose(xq.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert torch.allclose(xq @ rotate(w, into, norm).T, (x * norm) @ w.T, atol=1e-3)
    h, v = torch.randn(3, 11), torch.randn(size, 11)
    assert torch.allclose(h @ rotate(v, out_of).T, rotate(h @ v.T, into), atol=1e-3)
    # Q = diag(s)·B: a block Hadamard, one ±1 per channel, the same on every run
    q = rotate(torch.eye(size)[:block], into)[:, :block] * math.sqrt(block)
    assert torch.equal(q.abs(), torch.ones(block, block))


def test_rotation_gives_the_same_bits_whatever_the_threads():
    """Elementwise stages, no reductions: resume and verify re-derive the same bytes."""
    w = torch.randn(512, 4096).to(torch.bfloat16)
    norm = (torch.rand(4096) + 0.5).to(torch.bfloat16)
    into, out_of = Rotation("in", 4096, 4096), Rotation("out", 4096, 4096)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((rotate(w, into, norm), rotate(w.T.contiguous(), out_of)))
    finally:
        torch.set_num_threads(threads)
    (a, b), (c, d) = results
    assert torch.equal(a.view(torch.int16), c.view(torch.int16))
    assert torch.equal(b.view(torch.int16), d.view(torch.int16))


@pytest.mark.parametrize(
    ("arch", "edit", "named"),
    [
        ("deepseek_v3_mtp", None, "model.layers.2 is a multi-token-prediction layer"),
        ("llama", {"model_type": "gemma"}, "model_type 'gemma'"),
        ("llama", {"hidden_size": 96 * 3}, "hidden size 288"),
    ],
)
def test_what_rotation_cannot_prove_is_refused(tmp_path, arch, edit, named):
    src = build_checkpoint(tmp_path / "src", arch, shards=1)
    if edit:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(PtqflowError, match=named):
        plan_checkpoint(str(src), resolve_config("W4A16", ignore=IGNORE), rotate="hadamard")


def test_a_tensor_of_unknown_place_is_named(tmp_path):
    """A norm with a bias (LayerNorm, not RMSNorm): its place in the stream is not known."""
    from safetensors.torch import load_file, save_file

    src = build_checkpoint(tmp_path / "src", "llama", shards=1)
    (shard,) = src.glob("*.safetensors")
    tensors = load_file(shard)
    tensors["model.layers.0.input_layernorm.bias"] = torch.zeros(256, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(PtqflowError, match=r"model\.layers\.0\.input_layernorm\.bias"):
        plan_checkpoint(str(src), resolve_config("W4A16", ignore=IGNORE), rotate="hadamard")


def test_rotated_quantized_outputs_verify_and_have_their_own_keys(tmp_path):
    from tasks.core.verify import verify

    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=2)
    config = resolve_config("W4A16", ignore=IGNORE)
    out = tmp_path / "out"
    quantize_folder(src, out, config, rotate="hadamard")
    result = verify(str(src), str(out))
    assert result.failures() == []
    assert any(t.status == "quantized" for t in result.tensors)
    plain, _ = plan_checkpoint(str(src), config.model_copy(deep=True))
    rotated, _ = plan_checkpoint(str(src), config.model_copy(deep=True), rotate="hadamard")
    for a, b in zip(plain.shards, rotated.shards, strict=True):  # a resume never mixes them
        assert shard_key(plain, a, "d") != shard_key(rotated, b, "d")


def test_a_config_file_can_ask_for_the_rotation(tmp_path, capsys):
    """`rotate: hadamard` in a YAML config is --rotate hadamard; it stays out of the
    quantization_config the output's config.json gets."""
    import yaml

    from flows.cli import main
    from tasks.core.schemes import chosen_rotation

    src = build_checkpoint(tmp_path / "src", "llama", shards=1)
    group = resolve_config("W4A16").config_groups["W4A16"].model_dump(mode="json")
    path = tmp_path / "w4a16-rotated.yaml"
    path.write_text(yaml.safe_dump({"config_groups": {"g": group}, "rotate": "hadamard"}))
    assert chosen_rotation(None, str(path)) == "hadamard"
    assert chosen_rotation("none", {"rotate": "hadamard"}) == "hadamard"
    assert chosen_rotation(None, {"config_groups": {}}) == "none"
    assert main(["plan", str(src), "--config", str(path), "--ignore", "lm_head"]) == 0
    printed = capsys.readouterr().out
    assert "note: the residual stream is rotated (hadamard, blocks of 256)" in printed
    plan, _ = plan_checkpoint(str(src), resolve_config(config=str(path)), rotate="hadamard")
    assert "rotate" not in plan.config
