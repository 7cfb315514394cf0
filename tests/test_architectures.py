"""The architecture tier: every architecture of tests/architectures.py, built by transformers'
own classes, quantized with W4A16, NVFP4A16 and FP8_BLOCK ignoring only what `ptqflow plan`
suggests, and checked three ways:

* every quantized weight, dequantized by compressed-tensors, is within the scheme's bound of
  its source slice, found by name and by how the architecture's transformers forward pass
  uses its fused experts (tests/architectures.py `source_slice`, not ptqflow's layouts);
* transformers loads it (nothing missing or unexpected) with logits near the BF16 model's,
  except where transformers 5 cannot load compressed experts at all (`transformers_cannot`:
  then only the weights are compared, and the test checks transformers still cannot);
* vLLM 0.33's own loader (benchmarks/vllm_load.py, the `vllm` tier) refuses no tensor and
  leaves no parameter unwritten, for the main model and its MTP drafter.

`python -m tests.architectures` runs the same checks and writes docs/architectures.md.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.architectures import (
    ARCHS,
    BOUNDS,
    SCHEMES,
    build,
    quantize_as_planned,
    transformers_cannot,
    transformers_logits,
    weight_errors,
)
from tests.helpers import ROOT

pytestmark = pytest.mark.slow
CASES = [(a, s) for a in ARCHS for s in SCHEMES]
# logits of the tiny random models move this much under 4-bit weights (FP8: ~0.1); a weight
# from the wrong slice, or left random, moves them by ~1
LOGITS = {"W4A16": 0.6, "NVFP4A16": 0.6, "FP8_BLOCK": 0.25}


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    outputs = {}
    for arch in ARCHS:
        src = build(root / arch, arch)
        for scheme in SCHEMES:
            outputs[arch, scheme] = (src, root / f"{arch}-{scheme}")
            quantize_as_planned(src, outputs[arch, scheme][1], scheme)
    return outputs


@pytest.mark.parametrize(("arch", "scheme"), CASES)
def test_every_quantized_weight_is_its_source_slice(tier, arch, scheme):
    src, dst = tier[arch, scheme]
    errors = weight_errors(src, dst)
    assert errors, "nothing was quantized"
    bad = {k: v for k, v in errors.items() if not v <= BOUNDS[scheme]}
    assert not bad, bad


@pytest.mark.parametrize(("arch", "scheme"), CASES)
def test_transformers_loads_it_with_logits_near_the_source(tier, arch, scheme):
    src, dst = tier[arch, scheme]
    want, before = transformers_logits(src)
    assert set(before) <= {"unexpected_keys"}, before  # transformers builds no MTP layer
    cannot = transformers_cannot(dst)
    try:
        got, info = transformers_logits(dst)
    except Exception as e:  # noqa: BLE001 - what transformers raises is the finding
        assert cannot, f"transformers cannot load it: {e}"
        return
    mtp = {k.rpartition(".")[0] for k in before.get("unexpected_keys", [])}
    info["unexpected_keys"] = [
        k for k in info.get("unexpected_keys", []) if k.rpartition(".")[0] not in mtp
    ]
    info = {k: v for k, v in info.items() if v}
    error = float((got - want).norm() / want.norm())
    if cannot:  # still true of transformers? then the weights test alone speaks for it
        assert info or error > LOGITS[scheme], (cannot, error)
        return
    assert not info, info
    assert error < LOGITS[scheme]


@pytest.fixture(scope="module")
def vllm_loaded(tier):
    from tests.test_vllm import VLLM_PYTHON

    folders = [str(p) for pair in tier.values() for p in pair]
    run = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "benchmarks/vllm_load.py"), *sorted(set(folders))],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {r.pop("checkpoint"): r for r in reports}


@pytest.mark.vllm
@pytest.mark.parametrize(("arch", "scheme"), CASES)
def test_vllm_loads_the_source_and_the_output(vllm_loaded, tier, arch, scheme):
    clean = {"error": None, "rejected": {}, "unwritten": []}
    for folder in tier[arch, scheme]:
        report = dict(vllm_loaded[str(folder)])
        assert report.pop("config")["error"] is None
        assert report == dict.fromkeys(report, clean), folder.name


def test_bounds_tell_a_wrong_slice_from_a_right_one(tier):
    """A gpt-oss expert cut along the wrong axis has the error of an unrelated weight."""
    src, _ = tier["gpt_oss", "W4A16"]
    from safetensors.torch import load_file

    gate_up = load_file(src / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"][0]
    right, wrong = gate_up.T.float(), gate_up.reshape(-1, gate_up.shape[0]).float()
    assert float((wrong - right).norm() / right.norm()) > 4 * max(BOUNDS.values())
    assert torch.equal(gate_up[:, ::2].T, right[0::2].to(gate_up.dtype))
