"""Multi-token-prediction layers and the KV-cache scheme, as vLLM loads them.

DeepSeek-V3 and GLM-4.5 ship `num_nextn_predict_layers` MTP layers after the
main ones. vLLM's MTP drafter builds their eh_proj as a plain Linear,
shared_head.head as an LM head and embed_tokens as an embedding, so those stay
unquantized by default; everything else in the layer is quantized like the
main model's (tests/test_vllm.py loads the outputs with vLLM itself).
"""

from __future__ import annotations

import json

import pytest
import torch

from tasks.core.planner import plan_checkpoint
from tasks.core.schemes import KV_CACHE_WARNING, resolve_config
from tasks.core.verify import verify
from tests.checkpoints import build_checkpoint, load_tensors
from tests.helpers import IGNORE, quantize_folder

KEPT = ("eh_proj", "shared_head.head", "embed_tokens")


@pytest.fixture(scope="module", params=["deepseek_v3_mtp", "glm4_moe_mtp"])
def source(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(request.param) / "src", request.param)


def test_mtp_modules_vllm_builds_unquantized_stay_as_they_are(source, tmp_path):
    config = resolve_config("NVFP4A16", ignore=IGNORE)
    plan, report = plan_checkpoint(source, config.model_copy(deep=True))
    kept = [f"model.layers.2.{leaf}" for leaf in KEPT]
    assert any(all(m in c for m in kept) for c in report.callouts), report.callouts
    quantize_folder(source, tmp_path / "out", config)
    got, want = load_tensors(tmp_path / "out"), load_tensors(source)
    for m in kept:
        assert torch.equal(got[f"{m}.weight"], want[f"{m}.weight"]), m
        assert not any(n.startswith(f"{m}.weight_") for n in got), m
    # the rest of the MTP layer is quantized like the main model's layers
    quantized = {n for n in got if n.startswith("model.layers.2.") and n.endswith("weight_packed")}
    assert "model.layers.2.self_attn.o_proj.weight_packed" in quantized
    assert "model.layers.2.mlp.experts.0.down_proj.weight_packed" in quantized
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert set(kept) <= set(written["ignore"])
    assert not verify(str(source), str(tmp_path / "out")).problems


def test_a_target_naming_an_mtp_module_quantizes_it_and_verify_says_vllm_rejects_it(
    source, tmp_path
):
    config = resolve_config("FP8_DYNAMIC", ignore=IGNORE)
    config.config_groups["FP8_DYNAMIC"].targets = ["Linear", "re:.*eh_proj$"]
    quantize_folder(source, tmp_path / "out", config)
    got = load_tensors(tmp_path / "out")
    assert got["model.layers.2.eh_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.2.shared_head.head.weight_scale" not in got
    problems = verify(str(source), str(tmp_path / "out")).problems
    assert any(p.startswith("model.layers.2.eh_proj: stored quantized") for p in problems), problems
    assert not any("shared_head" in p for p in problems), problems


def test_a_checkpoint_without_mtp_layers_is_unchanged(tmp_path):
    source = build_checkpoint(tmp_path / "src", "deepseek_v3")
    _, report = plan_checkpoint(source, resolve_config("FP8_DYNAMIC", ignore=IGNORE))
    assert not any("multi-token" in c for c in report.callouts)


def test_kv_cache_scheme_is_written_without_scales_and_said_so(tmp_path):
    source = build_checkpoint(tmp_path / "src", "llama")
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
    }
    config = {"config_groups": {"group_0": group}, "kv_cache_scheme": kv, "ignore": ["lm_head"]}
    with pytest.warns(UserWarning, match="vLLM uses a scale of 1.0"):
        resolved = resolve_config(config=config)
    _, report = plan_checkpoint(source, resolved.model_copy(deep=True))
    assert KV_CACHE_WARNING in report.callouts
    quantize_folder(source, tmp_path / "out", resolved)
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert {k: written["kv_cache_scheme"][k] for k in kv} == kv
    assert not any(n.endswith(("k_scale", "v_scale")) for n in load_tensors(tmp_path / "out"))
    assert not verify(str(source), str(tmp_path / "out")).problems
