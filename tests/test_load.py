"""transformers loads ptqflow's output, and computes what the reference-quantized model computes."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint, load_tensors
from tests.helpers import FUSED, IGNORE, default_groups, quantize_folder, scheme_of
from tests.reference import reference_fake_quant

pytestmark = pytest.mark.slow  # Prefect servers, workers, subprocesses

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

WEIGHT_ONLY = ["W4A16", "W8A16", "NVFP4A16", "MXFP4A16", "MXFP8A16"]
DYNAMIC_ACTIVATIONS = ["FP8_BLOCK", "FP8_DYNAMIC", "INT8", "W4AFP8"]


def reference_model(src, name):
    """The source model with each quantized weight replaced by compressed-tensors' fake-quant."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tensors = load_tensors(src)
    sets = defaultdict(list)
    for n in default_groups(tensors, scheme_of(name)):
        parent, leaf = n[: -len(".weight")].rsplit(".", 1)
        key = next((f for f in FUSED if leaf in f), None) if "NVFP4" in name else None
        sets[(parent, key) if key else (n,)].append(n)
    state = model.state_dict()
    replaced = {}
    for members in sets.values():
        fake = reference_fake_quant([tensors[m] for m in members], scheme_of(name))
        replaced.update(zip(members, fake, strict=True))
    replaced = fuse_experts(replaced, state)
    assert set(replaced) <= set(state)
    state.update(replaced)
    model.load_state_dict(state)
    return model, replaced


def fuse_experts(weights: dict, state: dict) -> dict:
    """Per-expert weights stacked into transformers-v5's 3-D expert parameters."""
    out = {k: v for k, v in weights.items() if ".experts." not in k}
    for key in state:
        prefix, _, param = key.rpartition(".experts.")
        if param == "gate_up_proj":
            n = state[key].shape[0]
            pair = [
                [weights[f"{prefix}.experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj")]
                for e in range(n)
            ]
            out[key] = torch.stack([torch.cat(p) for p in pair])
        elif param == "down_proj":
            n = state[key].shape[0]
            out[key] = torch.stack(
                [weights[f"{prefix}.experts.{e}.down_proj.weight"] for e in range(n)]
            )
    return out


@pytest.mark.parametrize(
    ("arch", "name"),
    [("llama", n) for n in WEIGHT_ONLY + DYNAMIC_ACTIVATIONS]
    + [("qwen3_moe", n) for n in ("W4A16", "MXFP4A16")]
    + [
        # transformers 5.x fuses experts into 3-D parameters while loading; its converter
        # for compressed-tensors experts mishandles these formats (the bytes are
        # compressed-tensors' own, see test_reference). Strict: a fixed transformers shows up.
        pytest.param(
            "qwen3_moe",
            "NVFP4A16",
            marks=pytest.mark.xfail(
                strict=True, reason="transformers ignores weight_global_scale of fused experts"
            ),
        ),
        pytest.param(
            "qwen3_moe",
            "FP8_BLOCK",
            marks=pytest.mark.xfail(
                strict=True, reason="transformers cannot convert block scales of fused experts"
            ),
        ),
    ],
)
def test_transformers_loads_output(tmp_path, arch, name):
    src = build_checkpoint(tmp_path / "src", arch, shards=2)
    quantize_folder(src, tmp_path / "out", resolve_config(name, ignore=IGNORE))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.bfloat16, output_loading_info=True
    )
    assert not any(info.values()), info
    ref, replaced = reference_model(src, name)
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    loaded = model.state_dict()
    for n, w in replaced.items():
        assert torch.equal(loaded[n].to(w.dtype), w), n
    if name in WEIGHT_ONLY:
        assert torch.equal(got, want)
    else:  # transformers also fake-quantizes activations on the fly; weights are exact above
        assert torch.allclose(got.float(), want.float(), atol=0.15)
