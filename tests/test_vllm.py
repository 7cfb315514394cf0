"""vLLM's own loader accepts every output: the `vllm` tier.

Llama, Qwen3-MoE, and DeepSeek-V3 and GLM-4.5 with a multi-token-prediction
layer are quantized in every data-free scheme (and some rotated), then one vLLM 0.33 process
(benchmarks/vllm_load.py, in the environment benchmarks/setup_vllm.sh makes)
builds each model, and for MTP checkpoints the drafter speculative decoding
builds, and loads every tensor: nothing may be refused, no parameter left
unwritten, and vLLM's pinned compressed-tensors must parse the config. Without
that environment the tier is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint
from tests.helpers import IGNORE, ROOT, SCHEMES, quantize_folder

VLLM_PYTHON = Path(os.environ.get("PTQFLOW_VLLM_PYTHON", ROOT / "benchmarks/.venv-vllm/bin/python"))
if not VLLM_PYTHON.exists():
    pytest.skip(
        f"no vLLM environment at {VLLM_PYTHON}: bash benchmarks/setup_vllm.sh",
        allow_module_level=True,
    )
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ARCHS = ("llama", "qwen3_moe", "deepseek_v3_mtp", "glm4_moe_mtp")
ROTATED = ("qwen3_moe", "deepseek_v3", "tied")
# MLA's q_a_proj and kv_a_proj_with_mqa (384 and 576 rows) do not fit FP8_BLOCK's 128-row blocks
# in vLLM, so they are ignored as in ../shared/reference/model_free_ptq.md
MLA = ["re:.*kv_a_proj_with_mqa$", "re:.*q_a_proj$"]
KV_FP8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
CLEAN = {"error": None, "rejected": {}, "unwritten": []}


def _outputs(root: Path) -> dict[tuple[str, str], Path]:
    out = {}
    for arch in ARCHS:
        src = build_checkpoint(root / arch, arch)
        for scheme in SCHEMES:
            out[arch, scheme] = dst = root / f"{arch}-{scheme}"
            quantize_folder(src, dst, resolve_config(scheme, ignore=IGNORE + MLA))
    # MLA's q_a/kv_a quantized: one fused layer in the main model and in the drafter
    src = root / "deepseek_v3_mtp"
    out["deepseek_v3_mtp", "NVFP4A16 with MLA"] = dst = root / "deepseek-nvfp4-mla"
    quantize_folder(src, dst, resolve_config("NVFP4A16", ignore=IGNORE))
    # an FP8 KV cache, written without scales
    group = resolve_config("FP8_DYNAMIC").config_groups["FP8_DYNAMIC"]
    config = {"config_groups": {"g": group.model_dump()}, "kv_cache_scheme": KV_FP8}
    out["deepseek_v3_mtp", "FP8 KV cache"] = dst = root / "deepseek-kv"
    with pytest.warns(UserWarning, match="kv_cache_scheme"):
        quantize_folder(src, dst, resolve_config(config=config, ignore=IGNORE + MLA))
    # rotated (--rotate hadamard): nothing at run time, a tied lm_head untied
    for arch in ROTATED:
        made = root / arch if arch in ARCHS else build_checkpoint(root / arch, arch)
        if arch == "deepseek_v3":  # the routing keys real configs have (see tests/checkpoints.py)
            config = json.loads((made / "config.json").read_text())
            config.update(topk_method="noaux_tc", scoring_func="sigmoid")
            (made / "config.json").write_text(json.dumps(config))
        out[arch, "W4A16 rotated"] = dst = root / f"{arch}-rotated"
        config = resolve_config("W4A16", ignore=IGNORE + MLA)
        quantize_folder(made, dst, config, rotate="hadamard")
    # what vLLM refuses must be named: an MTP eh_proj quantized by a target naming it ...
    eh = resolve_config("FP8_DYNAMIC", ignore=IGNORE + MLA)
    eh.config_groups["FP8_DYNAMIC"].targets = ["Linear", "re:.*eh_proj$"]
    out["broken", "eh_proj"] = dst = root / "broken-eh"
    quantize_folder(src, dst, eh)
    # ... and a scale missing from the checkpoint
    out["broken", "missing"] = dst = root / "broken-missing"
    quantize_folder(root / "llama", dst, resolve_config("FP8_DYNAMIC", ignore=IGNORE))
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale"]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict[tuple[str, str], dict]:
    outputs = _outputs(tmp_path_factory.mktemp("vllm"))
    run = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "benchmarks/vllm_load.py"), *map(str, outputs.values())],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    reports = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    by_dir = {r.pop("checkpoint"): r for r in reports}
    return {key: by_dir[str(path)] for key, path in outputs.items()}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_loads_every_tensor_of_the_model_and_its_drafter(loaded, arch, scheme):
    report = dict(loaded[arch, scheme])
    assert report.pop("config")["error"] is None
    assert set(report) == ({"main", "drafter"} if arch.endswith("_mtp") else {"main"})
    assert report == dict.fromkeys(report, CLEAN)


@pytest.mark.parametrize("case", ["NVFP4A16 with MLA", "FP8 KV cache"])
def test_vllm_loads_fused_mla_layers_and_a_kv_cache_scheme(loaded, case):
    report = dict(loaded["deepseek_v3_mtp", case])
    assert report.pop("config")["error"] is None
    assert report == {"main": CLEAN, "drafter": CLEAN}


@pytest.mark.parametrize("arch", ROTATED)
def test_vllm_loads_rotated_outputs_with_no_transform(loaded, arch):
    report = dict(loaded[arch, "W4A16 rotated"])
    assert report.pop("config")["error"] is None
    assert report == {"main": CLEAN}


def test_the_config_parses_with_the_compressed_tensors_vllm_pins(loaded):
    versions = {r["config"]["compressed_tensors"] for r in loaded.values()}
    assert versions == {"0.17.0"}, versions


def test_the_loader_names_what_vllm_refuses(loaded):
    eh = loaded["broken", "eh_proj"]
    assert eh["main"] == CLEAN
    refused = set(eh["drafter"]["rejected"])
    assert "model.layers.2.eh_proj.weight_scale" in refused, eh["drafter"]
    missing = loaded["broken", "missing"]["main"]
    assert missing["unwritten"] == ["model.layers.0.self_attn.o_proj.weight_scale"], missing
