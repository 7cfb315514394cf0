"""Pre-quantized sources: FP8 block, compressed-tensors, ModelOpt NVFP4 and AutoAWQ.

Re-quantizing must give exactly what dequantizing the whole checkpoint with
compressed-tensors' converters and quantizing that BF16 copy gives, and
`dequantize` exactly the converters' output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage.errors import PtqflowError
from tasks.core.planner import plan_checkpoint
from tasks.core.schemes import resolve_config
from tasks.core.verify import verify
from tests import prequantized as pq
from tests.checkpoints import load_tensors, write_checkpoint
from tests.helpers import IGNORE, ROOT, assert_same_bytes, files, quantize_folder

DEQUANTIZE = {"config_groups": {}}
SOURCES = {
    "fp8-block": pq.fp8_block,
    "compressed-tensors-W4A16": lambda p: pq.compressed(p, "W4A16"),
    "compressed-tensors-NVFP4A16": lambda p: pq.compressed(p, "NVFP4A16"),
    # FP8 weights keep the name `weight`, like the unquantized tensors beside them
    "compressed-tensors-FP8_DYNAMIC": lambda p: pq.compressed(p, "FP8_DYNAMIC", "llama"),
    "modelopt-nvfp4": pq.modelopt_nvfp4,
    "awq": pq.awq,
}


def source_config(src: Path) -> dict:
    return json.loads((src / "config.json").read_text())


def bf16_copy(src: Path, work: Path) -> Path:
    """The BF16 checkpoint compressed-tensors' converters make of `src`."""
    config = source_config(src)
    config.pop("quantization_config")
    return write_checkpoint(work / "bf16", pq.converter_dequantize(src, work / "ct"), config)


@pytest.mark.parametrize("kind", SOURCES)
def test_dequantize_equals_the_converters_output(tmp_path, kind):
    src = SOURCES[kind](tmp_path / "src")
    if kind == "modelopt-nvfp4":  # older ModelOpt exports describe themselves in this file
        (src / "hf_quant_config.json").write_text('{"producer": {"name": "modelopt"}}')
    quantize_folder(src, tmp_path / "out", resolve_config(config=DEQUANTIZE))
    plan, _ = plan_checkpoint(str(src), resolve_config(config=DEQUANTIZE))
    assert_same_bytes(load_tensors(tmp_path / "out"), pq.converter_dequantize(src, tmp_path / "c"))
    config = source_config(tmp_path / "out")
    want = source_config(src)
    want.pop("quantization_config")
    assert config == want
    assert not (tmp_path / "out" / "hf_quant_config.json").exists()
    expected = "compressed-tensors" if kind.startswith("compressed-tensors") else kind
    assert plan.source_format.name == expected


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "NVFP4A16"])
@pytest.mark.parametrize("kind", SOURCES)
def test_requantize_equals_dequantize_then_quantize(tmp_path, kind, scheme):
    src = SOURCES[kind](tmp_path / "src")
    config = resolve_config(scheme, ignore=IGNORE)
    quantize_folder(src, tmp_path / "out", config)
    quantize_folder(
        bf16_copy(src, tmp_path), tmp_path / "want", resolve_config(scheme, ignore=IGNORE)
    )
    assert_same_bytes(load_tensors(tmp_path / "out"), load_tensors(tmp_path / "want"))
    got, want = source_config(tmp_path / "out"), source_config(tmp_path / "want")
    assert got["quantization_config"] == want["quantization_config"]  # only the new scheme
    assert list(got["quantization_config"]["config_groups"]) == [scheme]


@pytest.mark.slow
def test_plan_shows_the_detected_format_and_override(tmp_path):
    src = pq.fp8_block(tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def plan(*args):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "plan",
                str(src),
                "--scheme",
                "NVFP4A16",
                "--ignore",
                "lm_head",
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    shown = plan()
    assert shown.returncode == 0, shown.stderr
    assert "source format: fp8-block" in shown.stdout
    report = json.loads(plan("--json").stdout)
    assert report["source_format"] == "fp8-block"
    plain = plan("--source-format", "plain", "--json")
    assert plain.returncode == 1
    assert any("F8_E4M3, not a float weight" in p for p in json.loads(plain.stdout)["problems"])


def test_override_when_config_does_not_say(tmp_path):
    src = pq.fp8_block(tmp_path / "src")
    config = resolve_config("FP8_BLOCK", ignore=IGNORE)
    quantize_folder(src, tmp_path / "want", config)
    bare = source_config(src)
    del bare["quantization_config"]
    (src / "config.json").write_text(json.dumps(bare))
    with pytest.raises(PtqflowError, match=r"weight_scale_inv.*--source-format"):
        plan_checkpoint(str(src), config)
    quantize_folder(src, tmp_path / "out", config, source_format="fp8-block")
    plan, _ = plan_checkpoint(str(src), config, source_format="fp8-block")
    assert plan.source_format.name == "fp8-block"
    assert_same_bytes(load_tensors(tmp_path / "out"), load_tensors(tmp_path / "want"))


def test_missing_scale_is_named_before_any_work(tmp_path):
    src = pq.compressed(tmp_path / "src", "W4A16", arch="llama")
    tensors = load_tensors(src)
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    broken = write_checkpoint(tmp_path / "broken", tensors, source_config(src))
    with pytest.raises(PtqflowError) as e:
        plan_checkpoint(str(broken), resolve_config("FP8_BLOCK", ignore=IGNORE))
    assert "model.layers.1.mlp.up_proj" in str(e.value) and "compressed-tensors" in str(e.value)


def test_keep_source_quantization_for_ignored_fp8_block(tmp_path):
    src = pq.fp8_block(tmp_path / "src")
    ignore = [*IGNORE, "re:.*self_attn.*"]
    config = resolve_config("NVFP4A16", ignore=ignore)
    quantize_folder(src, tmp_path / "out", config, keep_source_quantization=True)
    got, source = load_tensors(tmp_path / "out"), load_tensors(src)
    attention = sorted(
        n.removesuffix(".weight_scale_inv")
        for n in source
        if ".self_attn." in n and n.endswith("weight_scale_inv")
    )
    assert attention
    for m in attention:  # the source's FP8 blocks, as compressed-tensors names them
        assert torch.equal(
            got[f"{m}.weight"].view(torch.uint8), source[f"{m}.weight"].view(torch.uint8)
        )
        assert torch.equal(got[f"{m}.weight_scale"], source[f"{m}.weight_scale_inv"])
    # the rest is what quantizing the converters' BF16 copy gives
    quantize_folder(
        bf16_copy(src, tmp_path), tmp_path / "want", resolve_config("NVFP4A16", ignore=ignore)
    )
    want = load_tensors(tmp_path / "want")
    assert_same_bytes(
        {n: t for n, t in got.items() if ".self_attn." not in n or "norm" in n},
        {n: t for n, t in want.items() if ".self_attn." not in n or "norm" in n},
    )
    qc = source_config(tmp_path / "out")["quantization_config"]
    assert qc["format"] == "mixed-precision"
    kept = qc["config_groups"]["source_group_0"]
    assert kept["targets"] == attention and kept["format"] == "float-quantized"
    assert kept["weights"]["strategy"] == "block" and kept["weights"]["block_structure"] == [
        128,
        128,
    ]
    assert qc["config_groups"]["NVFP4A16"]["targets"] == ["Linear"]
    assert not set(qc["ignore"]) & set(attention) and "lm_head" in qc["ignore"]
    assert all(not p.startswith("re:") for p in qc["ignore"])


def test_an_fp8_mtp_eh_proj_becomes_bf16_even_when_ignored_layers_keep_fp8(tmp_path):
    """DeepSeek-V3's FP8 checkpoint stores its MTP eh_proj in FP8 blocks; vLLM's drafter
    builds it unquantized, so it is dequantized, not kept, even with ignore + keep."""
    src = pq.fp8_block(tmp_path / "src", arch="deepseek_v3_mtp")
    source = load_tensors(src)
    assert source["model.layers.2.eh_proj.weight"].dtype == torch.float8_e4m3fn
    config = resolve_config("NVFP4A16", ignore=[*IGNORE, "re:.*eh_proj$"])
    quantize_folder(src, tmp_path / "out", config, keep_source_quantization=True)
    got = load_tensors(tmp_path / "out")
    want = load_tensors(bf16_copy(src, tmp_path))
    assert torch.equal(got["model.layers.2.eh_proj.weight"], want["model.layers.2.eh_proj.weight"])
    assert "model.layers.2.eh_proj.weight_scale" not in got
    assert not verify(str(src), str(tmp_path / "out")).problems


def test_keep_source_quantization_for_ignored_compressed_tensors(tmp_path):
    src = pq.compressed(tmp_path / "src", "W4A16")
    ignore = [*IGNORE, "re:.*mlp.experts.*"]
    config = resolve_config("FP8_BLOCK", ignore=ignore)
    quantize_folder(src, tmp_path / "out", config, keep_source_quantization=True)
    got, source = load_tensors(tmp_path / "out"), load_tensors(src)
    experts = {n: t for n, t in source.items() if ".experts." in n}
    assert experts and all(".weight_packed" not in n for n in got if ".experts." not in n)
    assert_same_bytes({n: t for n, t in got.items() if ".experts." in n}, experts)
    qc = source_config(tmp_path / "out")["quantization_config"]
    groups = {g: s["targets"] for g, s in qc["config_groups"].items()}
    assert set(groups) == {"FP8_BLOCK", "source_W4A16"}
    assert groups["source_W4A16"] == sorted({n.rpartition(".")[0] for n in experts})
    assert qc["config_groups"]["source_W4A16"]["format"] == "pack-quantized"


@pytest.mark.slow
def test_pipeline_from_a_remote_fp8_source_caches_and_resumes(tmp_path, prefect_server):
    from tests.helpers import run, upload_folder

    src = pq.fp8_block(tmp_path / "src")
    config = resolve_config("NVFP4A16", ignore=IGNORE)
    quantize_folder(src, tmp_path / "want", config)
    upload_folder(src, "memory://prequantized/src")
    out, dl = tmp_path / "out", str(tmp_path / "dl")
    first = run("memory://prequantized/src", str(out), max_workers=2, cache_dir=dl)
    assert (first.quantized, first.cached) == (3, 0)
    assert files(out) == files(tmp_path / "want")
    again = run("memory://prequantized/src", str(out), cache_dir=dl)
    assert (again.quantized, again.cached) == (0, 3)
    # attention kept in the source's FP8: redone are the shards holding attention weights
    ignore = [*IGNORE, "re:.*layers.1.self_attn.*"]
    keep = resolve_config("NVFP4A16", ignore=ignore)
    quantize_folder(src, tmp_path / "keep", keep, keep_source_quantization=True)
    plan, _ = plan_checkpoint(str(src), keep, keep_source_quantization=True)
    kept = run(
        "memory://prequantized/src",
        str(out),
        ignore=ignore,
        cache_dir=dl,
        keep_source_quantization_for_ignored=True,
    )
    holders = {
        s.name
        for s in plan.shards
        for u in s.units
        for w in u.weights
        if "layers.1.self_attn" in w.name
    }
    assert 0 < len(holders) < 3
    assert {m.name for m in kept.shards if not m.cached} == holders
    assert files(out) == files(tmp_path / "keep")


@pytest.mark.slow
def test_cli_dequantize(tmp_path, prefect_server):
    from tests.helpers import run_cli

    src = pq.modelopt_nvfp4(tmp_path / "src")
    proc = run_cli("dequantize", str(src), str(tmp_path / "out"), "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    quantize_folder(src, tmp_path / "want", resolve_config(config=DEQUANTIZE))
    assert files(tmp_path / "out") == files(tmp_path / "want")
    assert "quantization_config" not in source_config(tmp_path / "out")


@pytest.mark.parametrize("kind", ["fp8-block", "awq"])
def test_verify_against_a_prequantized_source(tmp_path, kind):

    src = SOURCES[kind](tmp_path / "src")
    out = tmp_path / "out"
    quantize_folder(src, out, resolve_config("NVFP4A16", ignore=IGNORE))
    v = verify(str(src), str(out))
    assert v.ok, v.failures()
    assert not v.notes, v.notes
    assert {t.status for t in v.tensors} >= {"quantized", "ignored"}
    # a flipped byte in a re-quantized weight is found, named
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.down_proj.weight_packed"
    shard = out / index[name]
    from storage.safetensors import read_header

    with open(shard, "rb") as f:
        header = read_header(f, shard.stat().st_size, shard.name)
    info = header.tensors[name]
    data = bytearray(shard.read_bytes())
    data[header.data_start + info.start] ^= 0x11
    shard.write_bytes(bytes(data))
    bad = verify(str(src), str(out))
    assert not bad.ok and any(name in f for f in bad.failures())


@pytest.mark.slow
def test_model_free_ptq_with_a_converter(tmp_path, prefect_server):
    """The converter's own weight_block_size is used: here config.json says a wrong one."""
    from compressed_tensors.entrypoints.convert.converters import FP8BlockDequantizer

    from flows import model_free_ptq

    src = pq.fp8_block(tmp_path / "src")
    quantize_folder(src, tmp_path / "want", resolve_config("FP8_BLOCK", ignore=IGNORE))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(PtqflowError):
        quantize_folder(src, tmp_path / "wrong", resolve_config("FP8_BLOCK", ignore=IGNORE))
    for i, converter in enumerate(
        [FP8BlockDequantizer(weight_block_size=(128, 128)), [FP8BlockDequantizer()]]
    ):
        model_free_ptq(
            src, tmp_path / f"out{i}", scheme="FP8_BLOCK", ignore=IGNORE, converter=converter
        )
        assert files(tmp_path / f"out{i}") == files(tmp_path / "want")


def test_converters_name_the_source_format_and_settings():
    from compressed_tensors.entrypoints.convert import converters as c

    from flows.quantize import converter_source

    assert converter_source(c.FP8BlockDequantizer(weight_block_size=(64, 32))) == (
        "fp8-block",
        {"weight_block_size": [64, 32]},
    )
    awq = c.AutoAWQConverter(bits=4, group_size=64, zero_point=False)
    settings = {"bits": 4, "group_size": 64, "zero_point": False, "version": "gemm"}
    assert converter_source(awq) == ("awq", settings)
    dequantizer = c.CompressedTensorsDequantizer.__new__(c.CompressedTensorsDequantizer)
    assert converter_source([awq, dequantizer]) == ("awq", settings)
    pruner = c.MagnitudeExpertPruner.__new__(c.MagnitudeExpertPruner)
    with pytest.raises(PtqflowError, match="MagnitudeExpertPruner is not supported"):
        converter_source(pruner)
    with pytest.raises(PtqflowError, match="optionally followed by a CompressedTensorsDequantizer"):
        converter_source([awq, c.FP8BlockDequantizer()])


def test_dequantize_refuses_a_plain_source(tmp_path):
    from tests.checkpoints import build_checkpoint

    src = build_checkpoint(tmp_path / "src", "llama")
    with pytest.raises(PtqflowError, match="is not quantized: there is nothing to dequantize"):
        plan_checkpoint(str(src), resolve_config(config=DEQUANTIZE))


# source, target scheme, layers ignored (kept), tensor marking a quantized module, kept format
KEEP_CONVERTED = {
    "modelopt-nvfp4": (
        pq.modelopt_nvfp4,
        "FP8_BLOCK",
        "re:.*self_attn.*",
        "weight_scale_2",
        "nvfp4-pack-quantized",
    ),
    "awq": (pq.awq, "W8A16", "re:.*mlp.down_proj$", "qweight", "pack-quantized"),
}


@pytest.mark.parametrize("kind", KEEP_CONVERTED)
def test_keep_source_quantization_for_ignored_through_a_converter(tmp_path, kind):
    """ModelOpt and AutoAWQ layers are kept as compressed-tensors' converters write them."""
    from compressed_tensors.entrypoints.convert.converters import (
        AutoAWQConverter,
        ModelOptNvfp4Converter,
    )

    make, scheme, pattern, marker, fmt = KEEP_CONVERTED[kind]
    src = make(tmp_path / "src")
    quantize_folder(
        src,
        tmp_path / "out",
        resolve_config(scheme, ignore=[*IGNORE, pattern]),
        keep_source_quantization=True,
    )
    got, source = load_tensors(tmp_path / "out"), load_tensors(src)
    quantized = {n.removesuffix(f".{marker}") for n in source if n.endswith(f".{marker}")}
    modules = sorted(m for m in quantized if re.match(pattern[3:], m))
    assert modules
    if kind == "awq":
        convert = AutoAWQConverter.from_pretrained(str(src))
    else:
        convert = ModelOptNvfp4Converter(targets=modules)
    for m in modules:  # KV-cache scales are not kept: that scheme is not carried over
        own = {
            n: t
            for n, t in source.items()
            if n.startswith(f"{m}.") and not n.endswith(("k_scale", "v_scale"))
        }
        want = convert.process(own)
        assert_same_bytes({n: got[n] for n in want}, want)
    qc = source_config(tmp_path / "out")["quantization_config"]
    kept = qc["config_groups"]["source_config_group_0"]
    assert kept["targets"] == modules and kept["format"] == fmt
    if kind == "modelopt-nvfp4":  # W4A4: served with its input global scale
        assert kept["input_activations"] is not None
        assert all(f"{m}.input_global_scale" in got for m in modules)
    assert not any(n.endswith(("k_scale", "v_scale")) for n in got)
