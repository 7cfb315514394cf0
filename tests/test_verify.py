"""`ptqflow verify`: passes on good outputs of every scheme, names what is wrong in bad ones."""

from __future__ import annotations

import csv
import json
import math
import shutil
import struct

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save_file

from storage.errors import PtqflowError
from storage.safetensors import read_file_header
from tasks.core.quant.compress import meta_outputs
from tasks.core.quant.kinds import scheme_format
from tasks.core.schemes import resolve_config
from tasks.core.verify import verify, vllm_layout, write_report
from tests.checkpoints import build_checkpoint, load_tensors
from tests.helpers import IGNORE, SCHEMES, default_groups, quantize_folder, scheme_of, split_experts
from tests.reference import reference_fake_quant

VERIFIED = [s for s in SCHEMES if s not in ("W8A8", "MXFP4", "MXFP8")]
ARCHS = ["llama", "qwen3_moe", "deepseek_v3"]
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tensors are tiny: one thread is as fast, and does not spin against other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """(source, quantized) folders for an arch and a scheme, each made once per module."""
    root = tmp_path_factory.mktemp("verify")
    made: dict = {}

    def get(arch: str, scheme: str):
        src = root / arch
        if arch not in made:
            made[arch] = build_checkpoint(src, arch, shards=3)
        out = root / f"{arch}-{scheme}"
        if (arch, scheme) not in made:
            made[arch, scheme] = quantize_folder(src, out, resolve_config(scheme, ignore=IGNORE))
        return src, out

    return get


@pytest.fixture
def copy_of(output, tmp_path):
    """A copy of a good output, for a test to damage."""

    def get(arch: str, scheme: str):
        src, out = output(arch, scheme)
        return src, shutil.copytree(out, tmp_path / "damaged")

    return get


def locate(folder, name: str) -> tuple:
    """(shard path, absolute offset, byte size) of tensor `name`."""
    shard = folder / json.loads((folder / INDEX).read_text())["weight_map"][name]
    header = read_file_header(shard)
    info = header.tensors[name]
    return shard, header.data_start + info.start, info.nbytes


def write_bytes(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("scheme", VERIFIED)
@pytest.mark.parametrize("arch", ARCHS)
def test_good_output_passes(output, arch, scheme):
    src, out = output(arch, scheme)
    v = verify(str(src), str(out))
    assert v.failures() == []
    source = split_experts(load_tensors(src))
    by_status: dict[str, set] = {"quantized": set(), "ignored": set(), "copied": set()}
    for t in v.tensors:
        by_status[t.status].add(t.name)
    # every source tensor accounted for: the reference's quantized set, the rest kept
    assert by_status["quantized"] == set(default_groups(source, None))
    assert set().union(*by_status.values()) == set(source)
    assert "lm_head.weight" in by_status["ignored"]
    assert v.size_in == sum(t.nbytes for t in source.values())
    assert v.size_out == sum(t.nbytes for t in load_tensors(out).values())
    # the error verify reports is the error of compressed-tensors' own fake-quantization
    name = "model.layers.1.self_attn.o_proj.weight"
    (fake,) = reference_fake_quant([source[name]], scheme_of(scheme))
    (result,) = [t for t in v.tensors if t.name == name]
    assert result.rel_error == pytest.approx(rel_error(fake, source[name]), rel=1e-2)
    assert all(0 < t.rel_error < t.limit for t in v.tensors if t.status == "quantized")


@pytest.mark.parametrize("scheme", VERIFIED)
def test_vllm_layout_agrees_with_compressed_tensors(scheme):
    """The vLLM loader layouts, written down separately, match compressed-tensors' output."""
    s = scheme_of(scheme)
    for shape in [(576, 512), (256, 384)]:
        got = {k: (dtype, shape) for k, dtype, shape in meta_outputs(shape, "BF16", s)}
        want = vllm_layout(scheme_format(s), s.weights, *shape)
        assert sorted(got) == sorted(want)
        for k, (dtypes, shp) in want.items():
            assert got[k][0] in dtypes and got[k][1] == shp, (k, got[k], want[k])


def test_layout_vllm_would_not_load_is_named(output, monkeypatch):
    import tasks.core.verify.layout

    real = tasks.core.verify.layout.vllm_layout

    def packed_along_rows(fmt, args, rows, cols):
        return {**real(fmt, args, rows, cols), "weight_packed": (("I32",), (rows // 8, cols))}

    monkeypatch.setattr(tasks.core.verify.layout, "vllm_layout", packed_along_rows)
    src, out = output("llama", "W4A16")
    failures = verify(str(src), str(out)).failures()
    m = "model.layers.0.self_attn.k_proj"
    want = f"{m}.weight_packed: vLLM's pack-quantized loader expects I32 [16, 256], QUANTIZED"
    assert f"{want} holds I32 [128, 32]" in failures
    assert len(failures) == 14  # one per quantized weight


@pytest.mark.parametrize(
    ("scheme", "tensor"),
    [
        ("W4A16_ASYM", "model.layers.1.mlp.down_proj.weight_zero_point"),
        ("W4A16_ASYM", "model.layers.0.self_attn.o_proj.weight_packed"),
        ("NVFP4A16", "model.layers.1.mlp.up_proj.weight_scale"),
        ("NVFP4A16", "model.layers.0.self_attn.k_proj.weight_global_scale"),
        ("FP8_BLOCK", "model.layers.1.self_attn.o_proj.weight_scale"),
        ("FP8_DYNAMIC", "model.layers.0.mlp.gate_proj.weight"),
        ("W4A16", "model.norm.weight"),
    ],
)
def test_flipped_byte_is_named(copy_of, scheme, tensor):
    src, out = copy_of("llama", scheme)
    shard, offset, size = locate(out, tensor)
    at = offset + size // 2
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    failures = verify(str(src), str(out)).failures()
    assert any(f.startswith(f"{tensor}: 1 of {size} bytes differ") for f in failures), failures
    module = tensor.rpartition(".")[0]
    assert all(module in f for f in failures), failures  # nothing else is blamed
    if tensor.endswith("weight_global_scale"):  # one global scale per fused set, as vLLM loads
        assert any("q_proj.weight_global_scale: differs within fused set" in f for f in failures), (
            failures
        )


def test_nan_scale_is_named(copy_of):
    src, out = copy_of("llama", "W4A16")
    name = "model.layers.0.mlp.down_proj"
    shard, offset, _ = locate(out, f"{name}.weight_scale")
    write_bytes(shard, offset, struct.pack("<H", 0x7FC0))  # bf16 NaN in the first group
    v = verify(str(src), str(out))
    failures = v.failures()
    assert any(
        f.startswith(f"{name}.weight_scale: 2 of ") and "stored nan" in f for f in failures
    ), failures
    # the first group of 128 weights of row 0 dequantizes to NaN
    assert f"{name}.weight: 128 of 131072 values are NaN or Inf after dequantizing" in failures
    (result,) = [t for t in v.tensors if t.name == f"{name}.weight"]
    assert math.isnan(result.rel_error)


def test_truncated_shard_names_the_cut_off_tensors(copy_of):
    src, out = copy_of("llama", "FP8_BLOCK")
    index = json.loads((out / INDEX).read_text())["weight_map"]
    last = sorted(set(index.values()))[-1]
    header = read_file_header(out / last)
    cut = max(header.tensors, key=lambda n: header.tensors[n].end)
    with open(out / last, "r+b") as f:
        f.truncate(header.file_size - 10)
    v = verify(str(src), str(out))
    failures = v.failures()
    assert f"{cut}: cut off, {last} is truncated" in failures
    assert any(f.startswith(f"{last} is not a valid safetensors file (truncated") for f in failures)
    # the rest of that shard is still checked
    module = cut.rpartition(".")[0]
    rest = [t for t in v.tensors if t.shard == last and t.status == "quantized"]
    assert [t.name for t in rest if t.rel_error is None] == [f"{module}.weight"]
    assert len(rest) > 1


def test_missing_tensor_is_named(copy_of):
    src, out = copy_of("llama", "W4A16")
    name = "model.layers.1.mlp.down_proj.weight_scale"
    shard, _, _ = locate(out, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((out / INDEX).read_text())
    del index["weight_map"][name]
    index["metadata"]["total_size"] -= 256 * 4 * 2
    (out / INDEX).write_text(json.dumps(index))
    v = verify(str(src), str(out))
    assert v.failures() == [f"{name}: missing from QUANTIZED"]


def test_index_pointing_at_the_wrong_shard_is_named(copy_of):
    src, out = copy_of("qwen3_moe", "NVFP4A16")
    index = json.loads((out / INDEX).read_text())
    name = "model.layers.0.mlp.experts.1.down_proj.weight_packed"
    right = index["weight_map"][name]
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != right)
    index["weight_map"][name] = wrong
    (out / INDEX).write_text(json.dumps(index))
    failures = verify(str(src), str(out)).failures()
    assert failures == [f"{name}: {INDEX} says {wrong}, but it is in {right}"]


@pytest.mark.parametrize("change", ["unignore lm_head", "ignore down_proj"])
def test_ignore_list_that_disagrees_with_the_tensors_is_named(copy_of, change):
    src, out = copy_of("llama", "W4A16")
    config = json.loads((out / "config.json").read_text())
    ignore = config["quantization_config"]["ignore"]
    if change == "unignore lm_head":
        ignore.remove("lm_head")
        want = (
            "lm_head: config.json quantizes it (group W4A16) but QUANTIZED holds it "
            "unquantized (lm_head.weight)"
        )
    else:
        ignore.append("model.layers.1.mlp.down_proj")
        m = "model.layers.1.mlp.down_proj"
        want = (
            f"{m}: QUANTIZED holds it quantized ({m}.weight_packed, {m}.weight_scale, "
            f"{m}.weight_shape) but config.json leaves it unquantized "
            "(it is ignored)"
        )
    (out / "config.json").write_text(json.dumps(config))
    assert verify(str(src), str(out)).failures() == [want]


def test_output_without_a_quantization_config_is_refused(copy_of):
    src, out = copy_of("llama", "W4A16")
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(PtqflowError, match="has no compressed-tensors quantization_config"):
        verify(str(src), str(out))


def test_report_holds_the_figures(copy_of, tmp_path):
    from matplotlib.image import imread

    src, out = copy_of("deepseek_v3", "NVFP4A16")
    bad = "model.layers.1.mlp.experts.2.gate_proj"
    shard, offset, _ = locate(out, f"{bad}.weight_scale")
    write_bytes(shard, offset + 5, b"\x7f")  # fp8 e4m3 NaN
    v = verify(str(src), str(out))
    paths = write_report(v, tmp_path / "report")
    md = paths["markdown"].read_text()
    assert md.startswith("# ptqflow verify: FAILED")
    assert f"* {bad}.weight_scale: 1 of " in md
    assert f"| `{bad}.weight` | NVFP4A16 | [256, 256] | nan |" in md  # worst first
    quantized = [t for t in v.tensors if t.status == "quantized"]
    errors = sorted(t.rel_error for t in quantized if not math.isnan(t.rel_error))
    assert f"| {errors[len(errors) // 2]:.4g} | nan |" in md  # median and worst per group
    with open(paths["csv"]) as f:
        rows = {r["tensor"]: r for r in csv.DictReader(f)}
    assert set(rows) == {t.name for t in v.tensors}
    for t in quantized:
        assert float(rows[t.name]["rel_error"]) == pytest.approx(t.rel_error, nan_ok=True)
        assert float(rows[t.name]["limit"]) == pytest.approx(t.limit)
    assert rows[f"{bad}.weight"]["problems"].count(bad) == 2
    image = imread(paths["plot"])
    assert image.shape[0] > 400 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_verify_returns_a_record_that_travels(copy_of, tmp_path):
    """What the verify flow returns and the CLI prints: a frozen VerifyResult, the worst
    weight first, that Prefect's result serializer (cloudpickle) carries unchanged."""
    import dataclasses

    import cloudpickle

    from tasks.core.verify import VerifyResult, summary

    src, out = copy_of("llama", "W4A16")
    name = "model.layers.0.mlp.down_proj"
    shard, offset, _ = locate(out, f"{name}.weight_scale")
    write_bytes(shard, offset, struct.pack("<H", 0x7FC0))  # bf16 NaN in the first group
    v = verify(str(src), str(out))
    result = summary(v, write_report(v, tmp_path / "report"))
    assert isinstance(result, VerifyResult) and not result.ok
    assert result.message.startswith(f"{out} failed verification against {src}: 2 problem(s)")
    assert result.problems == 2 and result.worst[0].name == f"{name}.weight"
    assert result.counts["quantized"] == sum(t.status == "quantized" for t in v.tensors)
    assert result.report == str(tmp_path / "report" / "report.md")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.ok = True
    again = cloudpickle.loads(cloudpickle.dumps(result))
    assert again.message == result.message and again.worst[0].name == result.worst[0].name


def test_remote_folders_are_downloaded_shard_by_shard(output, tmp_path):
    src, out = output("llama", "MXFP4A16")
    memory = fsspec.filesystem("memory")
    for local, remote in ((src, "/verify-src"), (out, "/verify-out")):
        memory.put(str(local), remote, recursive=True)
    v = verify(
        "memory://verify-src",
        "memory://verify-out",
        cache_dir=str(tmp_path / "cache"),
        max_workers=2,
    )
    assert v.failures() == []
    local = verify(str(src), str(out))
    assert [(t.name, t.rel_error) for t in v.tensors] == [
        (t.name, t.rel_error) for t in local.tensors
    ]
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert cached == sorted(2 * [p.name for p in src.glob("*.safetensors")])  # SOURCE's, ours


def test_load_compares_logits(output):
    src, out = output("llama", "W8A16")
    v = verify(str(src), str(out), load=True)
    assert v.failures() == []
    assert v.logits["cosine"] > 0.99 and v.logits["top1_agreement"] > 0.9
    assert 0 < v.logits["max_abs_diff"] < 0.2


@pytest.mark.slow
def test_cli_runs_the_flow_and_fails_naming_the_tensor(output, copy_of, capsys, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.cli import main

    src, out = output("llama", "INT8")
    assert main(["verify", str(src), str(out), "--report", str(out.parent / "r")]) == 0
    printed = capsys.readouterr().out
    assert "14 quantized, 2 ignored and 5 copied weights" in printed
    assert (out.parent / "r" / "report.md").read_text().startswith("# ptqflow verify: PASSED")
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["verify-report"]))
        )
    art = max(arts, key=lambda a: a.created)
    assert art.data.startswith("# ptqflow verify: PASSED") and "errors.png" in art.data

    src, bad = copy_of("llama", "INT8")
    name = "model.layers.1.mlp.up_proj.weight_scale"
    shard, offset, _ = locate(bad, name)
    write_bytes(shard, offset, b"\x00\x00")
    assert main(["verify", str(src), str(bad)]) == 2
    err = capsys.readouterr().err  # Prefect's log lines first, when its console handler is set
    assert "\nptqflow: error: " in "\n" + err, err
    assert f"\n  {name}: " in err.split("ptqflow: error: ", 1)[1]
    assert "Traceback" not in err
    report = bad / ".ptqflow" / "verify" / "report.md"
    assert f"report: {report}" in err and name in report.read_text()


@pytest.mark.slow
def test_quantize_with_verify_runs_it_last(tmp_path, prefect_server):
    from flows.quantize import run_quantize
    from tests.checkpoints import build_checkpoint

    src = build_checkpoint(tmp_path / "src", "llama", shards=2)
    result = run_quantize(
        source=str(src),
        destination=str(tmp_path / "out"),
        scheme="W4A16",
        ignore=["lm_head", "model.embed_tokens"],
        device="cpu",
        verify=True,
    )
    assert result.verify.ok is True
    assert (tmp_path / "out" / ".ptqflow" / "verify" / "report.md").exists()
