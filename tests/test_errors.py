"""User errors: one clear message, exit status 2, no traceback, found before any work.

Every case runs ``flows.cli.main`` in-process. The Prefect flow module is replaced by a
stub (`flow_calls`), so a case that wrongly gets past planning shows up as a recorded
flow start instead of a slow Prefect run; the user errors below must all be raised
before the flow would start, and DEST must never look like a finished checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from flows.cli import main
from storage.dest import LEASE, MARKER, open_dest
from storage.errors import PtqflowError
from tasks.core.planner import plan_checkpoint
from tasks.core.records import Summary
from tasks.core.schemes import resolve_config
from tests.checkpoints import write_checkpoint


def prepare_dest(dest, source, overwrite=False) -> Path:
    """Prepare a local DEST the way the flow does, and return its path."""
    open_dest(dest).prepare(source, overwrite)
    return Path(dest)


REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
SHARDS = [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
HIDDEN = 256
KV = 128


def tiny_llama(
    path: Path,
    *,
    attn: tuple[int, ...] = (256, 256),
    inter: tuple[int, ...] = (512, 512),
    replace: dict[str, torch.Tensor] | None = None,
    shards: int = 1,
    config: dict | None = None,
) -> Path:
    """A llama-named checkpoint built by hand; layer i has q width attn[i], MLP width inter[i].

    With 3 shards the layout is fixed: shard 1 = embeddings + layer 0 (but down_proj),
    shard 2 = layer 0 down_proj + layer 1 attention, shard 3 = the rest.
    """
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (0.02 * torch.randn(*shape, generator=gen)).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": rand(512, HIDDEN)}
    for i, (a, m) in enumerate(zip(attn, inter, strict=True)):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = rand(HIDDEN)
        t[p + "self_attn.q_proj.weight"] = rand(a, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = rand(KV, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = rand(KV, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = rand(HIDDEN, a)
        t[p + "post_attention_layernorm.weight"] = rand(HIDDEN)
        t[p + "mlp.gate_proj.weight"] = rand(m, HIDDEN)
        t[p + "mlp.up_proj.weight"] = rand(m, HIDDEN)
        t[p + "mlp.down_proj.weight"] = rand(HIDDEN, m)
    t["model.norm.weight"] = rand(HIDDEN)
    t["lm_head.weight"] = rand(512, HIDDEN)
    for name, tensor in (replace or {}).items():
        assert name in t, name
        t[name] = tensor
    assignment = None
    if shards == 3:
        assignment = {}
        for n in t:
            if n.startswith("model.layers.0.mlp.down_proj") or n.startswith(
                "model.layers.1.self_attn"
            ):
                assignment[n] = 1
            elif n.startswith(("model.embed_tokens", "model.layers.0.")):
                assignment[n] = 0
            else:
                assignment[n] = 2
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "num_hidden_layers": len(inter),
        "vocab_size": 512,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        **(config or {}),
    }
    return write_checkpoint(path, t, cfg, shards=shards, assignment=assignment)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 3-shard checkpoint; tests corrupt copies of it."""
    root = tiny_llama(tmp_path_factory.mktemp("src") / "sharded", shards=3)
    index = json.loads((root / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == SHARDS
    return root


@pytest.fixture
def copy_of(sharded: Path, tmp_path: Path):
    def make(name: str = "src") -> Path:
        return Path(shutil.copytree(sharded, tmp_path / name))

    return make


@pytest.fixture(autouse=True)
def flow_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace the Prefect flow with a recorder: nothing here may reach it unless noted."""
    calls: list[dict] = []

    def run_quantize(max_workers: int = 1, **params):
        calls.append(params)
        return Summary(params["destination"], [], 0, 0.0)

    fake = types.ModuleType("flows.quantize")
    fake.run_quantize = run_quantize
    monkeypatch.setitem(sys.modules, "flows.quantize", fake)
    return calls


def assert_not_complete(dest: Path) -> None:
    """DEST holds nothing that looks like a finished (or finished-shard) checkpoint."""
    if not dest.exists():
        return
    assert not (dest / "config.json").exists()
    assert not (dest / INDEX).exists()
    assert sorted(p.name for p in dest.rglob("*.safetensors")) == []


def user_error(capsys, argv: list[str], flow_calls: list[dict]) -> str:
    """Run the CLI, expect exit 2 with one `ptqflow: error:` message; return the message."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert flow_calls == [], "the flow started although the input is invalid"
    assert err.startswith("ptqflow: error: "), err
    assert err.count("ptqflow: error:") == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    return err.removeprefix("ptqflow: error: ")


def quantize_error(capsys, tmp_path, flow_calls, src, *args) -> str:
    dest = tmp_path / "dest"
    msg = user_error(capsys, ["quantize", src, dest, *args], flow_calls)
    assert_not_complete(dest)
    return msg


def suggested_patterns(message: str) -> list[str]:
    return re.findall(r"--ignore '([^']+)'", message)


# --- shapes the scheme cannot represent ---------------------------------------------------

# attn width 200 makes o_proj [256, 200]; MLP width 200 makes down_proj [256, 200].
BAD_200 = [
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.1.self_attn.o_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
]
BAD_200_PATTERNS = {
    r"re:model\.layers\.\d+\.self_attn\.o_proj$",
    r"re:model\.layers\.\d+\.mlp\.down_proj$",
}


@pytest.fixture(scope="module")
def cols200(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(
        tmp_path_factory.mktemp("src") / "cols200", attn=(200, 200), inter=(200, 200), shards=3
    )


@pytest.mark.slow  # over 10 s on 2 cores
@pytest.mark.parametrize("scheme, group", [("W4A16", 128), ("NVFP4A16", 16)])
def test_unrepresentable_shapes_listed_in_one_message(
    capsys, tmp_path, flow_calls, cols200, scheme, group
):
    msg = quantize_error(capsys, tmp_path, flow_calls, cols200, "--scheme", scheme)
    problem_lines = [line for line in msg.splitlines() if "cannot be" in line]
    # Exactly the four [256, 200] weights, each once, with its shape and the reason.
    assert sorted(problem_lines) == sorted(
        f"  {n} [256, 200] cannot be {scheme}: 200 columns are not divisible by group size {group}"
        for n in BAD_200
    )
    patterns = suggested_patterns(msg)
    assert BAD_200_PATTERNS <= set(patterns), msg

    # The suggested patterns, as printed, make planning (and the CLI's pre-flow check) pass.
    ignore = [a for p in patterns for a in ("--ignore", p)]
    capsys.readouterr()
    rc = main(["quantize", str(cols200), str(tmp_path / "ok"), "--scheme", scheme, *ignore])
    assert rc == 0, capsys.readouterr().err
    assert len(flow_calls) == 1 and flow_calls[0]["ignore"] == patterns

    # The `re:` patterns alone skip exactly the four bad weights.
    plan, report = plan_checkpoint(cols200, resolve_config(scheme, ignore=BAD_200_PATTERNS))
    assert report.problems == []
    assert sum(c["ignored"] for c in report.counts.values()) == 4
    kept_as_is = {s.name for sh in plan.shards for s in sh.specs if s.dtype == "BF16"}
    assert set(BAD_200) <= kept_as_is


def test_shape_error_suggests_only_patterns_for_the_failing_tensors(
    capsys, tmp_path, flow_calls, cols200
):
    msg = quantize_error(capsys, tmp_path, flow_calls, cols200, "--scheme", "W4A16")
    assert set(suggested_patterns(msg)) == BAD_200_PATTERNS


@pytest.mark.slow  # over 10 s on 2 cores
def test_fp8_block_pads_partial_blocks(capsys, tmp_path, flow_calls):
    """576 output rows (4.5 blocks of 128) and 200 input columns are quantized padded, as
    compressed-tensors does; but vLLM loads gate_proj and up_proj as one layer and refuses
    FP8 blocks that do not fill every part but the last, so a run refuses them before any
    work, and runs with the ignores it names."""
    from storage.safetensors import read_file_header
    from storage.source import Folder
    from tasks.core.shard import write_shard

    src = tiny_llama(tmp_path / "src", inter=(576, 200))
    config = resolve_config("FP8_BLOCK")
    plan, report = plan_checkpoint(src, config, strict=False)
    assert [p.split(" [")[0] for p in report.problems] == [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
    ]
    assert "partitions of [576, 576] rows" in report.problems[0]
    specs = {s.name: s for sh in plan.shards for s in sh.specs}
    expected = {
        "model.layers.0.mlp.gate_proj": ((576, 256), (5, 2)),
        "model.layers.0.mlp.down_proj": ((256, 576), (2, 5)),
        "model.layers.1.mlp.gate_proj": ((200, 256), (2, 2)),
        "model.layers.1.mlp.down_proj": ((256, 200), (2, 2)),
    }
    for module, (shape, scale) in expected.items():
        assert (specs[f"{module}.weight"].dtype, specs[f"{module}.weight"].shape) == (
            "F8_E4M3",
            shape,
        )
        assert specs[f"{module}.weight_scale"].shape == scale

    # The real quantization agrees with the plan.
    (shard,) = plan.shards
    dest = prepare_dest(tmp_path / "out", plan.source)
    write_shard(shard, Folder(plan.source).open, dest, config.config_groups)
    header = read_file_header(dest / shard.name)
    for module, (shape, scale) in expected.items():
        assert header.tensors[f"{module}.weight"].shape == shape
        assert header.tensors[f"{module}.weight_scale"].shape == scale

    msg = quantize_error(capsys, tmp_path, flow_calls, src, "--scheme", "FP8_BLOCK")
    assert "vLLM loads gate_proj, up_proj as one layer" in msg
    fixes = [a for f in report.fixes for a in ("--ignore", f)]
    argv = ["quantize", str(src), str(tmp_path / "d"), "--scheme", "FP8_BLOCK", *fixes]
    assert main(argv) == 0
    assert len(flow_calls) == 1


# --- broken source files ----------------------------------------------------------------


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


def _huge_header_length(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)


def _garbage_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"garbage!" + data[16:])


@pytest.mark.parametrize(
    "damage, why",
    [
        (_truncate, "truncated"),
        (_huge_header_length, "header length"),
        (_garbage_header, "header is not JSON"),
    ],
)
def test_damaged_shard_is_named(capsys, tmp_path, flow_calls, copy_of, damage, why):
    src = copy_of()
    damage(src / SHARDS[1])
    msg = quantize_error(capsys, tmp_path, flow_calls, src, "--scheme", "FP8_DYNAMIC")
    assert SHARDS[1] in msg and SHARDS[0] not in msg and SHARDS[2] not in msg
    assert "not a valid safetensors file" in msg and why in msg


def test_truncated_single_file_checkpoint(capsys, tmp_path, flow_calls):
    src = tiny_llama(tmp_path / "src")
    _truncate(src / "model.safetensors")
    msg = quantize_error(capsys, tmp_path, flow_calls, src, "--scheme", "W4A16")
    assert msg.startswith("model.safetensors is not a valid safetensors file (truncated")


def test_missing_shard_is_named(capsys, tmp_path, flow_calls, copy_of):
    src = copy_of()
    (src / SHARDS[2]).unlink()
    msg = quantize_error(capsys, tmp_path, flow_calls, src, "--scheme", "FP8_DYNAMIC")
    assert SHARDS[2] in msg and INDEX in msg
    assert SHARDS[0] not in msg and SHARDS[1] not in msg


def test_tensor_in_wrong_file_names_tensor_and_both_files(capsys, tmp_path, flow_calls, copy_of):
    src = copy_of()
    index = json.loads((src / INDEX).read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    assert index["weight_map"][name] == SHARDS[1]
    index["weight_map"][name] = SHARDS[2]
    (src / INDEX).write_text(json.dumps(index))
    msg = quantize_error(capsys, tmp_path, flow_calls, src, "--scheme", "FP8_DYNAMIC")
    (line,) = [line for line in msg.splitlines() if name in line]
    assert SHARDS[2] in line and SHARDS[1] in line
    assert line.index(SHARDS[2]) < line.index(SHARDS[1])  # "index says X, found in Y"


def test_non_float_weight_is_named(capsys, tmp_path, flow_calls):
    name = "model.layers.0.self_attn.q_proj.weight"
    int8 = torch.zeros(256, HIDDEN, dtype=torch.int8)
    src = tiny_llama(tmp_path / "src", replace={name: int8})
    msg = quantize_error(capsys, tmp_path, flow_calls, src, "--scheme", "W4A16")
    problems = [line for line in msg.splitlines() if line.startswith("  ")]
    assert len(problems) == 1 and name in problems[0] and "I8" in problems[0]
    # Not quantizing it (with its fused partners) is fine: the error is about quantizing it.
    ignore = r"re:model\.layers\.0\.self_attn\.[qkv]_proj$"
    _, report = plan_checkpoint(src, resolve_config("W4A16", ignore=[ignore]))
    assert report.problems == []


# --- DEST that holds something else ---------------------------------------------------------


def _foreign(dest: Path, source: str) -> None:
    dest.mkdir()
    (dest / "notes.txt").write_text("mine\n")


def _other_ptqflow_output(dest: Path, source: str) -> None:
    prepare_dest(dest, source + "-other")
    (dest / "config.json").write_text("{}\n")
    (dest / INDEX).write_text('{"weight_map": {}}\n')
    (dest / "model.safetensors").write_bytes(b"\0" * 16)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "occupy, whose", [(_foreign, "did not write"), (_other_ptqflow_output, "-other")]
)
def test_prepare_dest_refuses_occupied_dest(tmp_path, sharded, occupy, whose):
    dest = tmp_path / "dest"
    occupy(dest, str(sharded))
    before = _snapshot(dest)
    with pytest.raises(PtqflowError, match="--overwrite") as info:
        prepare_dest(dest, str(sharded))
    assert str(dest) in str(info.value) and whose in str(info.value)
    assert _snapshot(dest) == before  # refused before touching anything


@pytest.mark.parametrize("occupy", [_foreign, _other_ptqflow_output])
def test_prepare_dest_overwrite_accepts_occupied_dest(tmp_path, sharded, occupy):
    dest = tmp_path / "dest"
    occupy(dest, str(sharded))
    assert prepare_dest(dest, str(sharded), overwrite=True) == dest
    assert _snapshot(dest) == {MARKER: json.dumps({"source": str(sharded)}).encode()}


def test_prepare_dest_resumes_own_output(tmp_path, sharded):
    dest = prepare_dest(tmp_path / "dest", str(sharded))
    (dest / "config.json").write_text("{}\n")
    (dest / INDEX).write_text("{}\n")
    (dest / "model-00001-of-00003.safetensors").write_bytes(b"\0" * 8)
    prepare_dest(dest, str(sharded))
    # A rerun keeps finished shards but drops config.json and the index until it ends.
    assert {p.name for p in dest.iterdir()} == {".ptqflow", "model-00001-of-00003.safetensors"}


def test_rerun_with_same_source_spelled_differently_resumes(tmp_path, sharded, monkeypatch):
    config = resolve_config("FP8_DYNAMIC")
    first, _ = plan_checkpoint(str(sharded), config)
    dest = prepare_dest(tmp_path / "dest", first.source)
    monkeypatch.chdir(sharded.parent)
    for spelling in (f"{sharded}/", sharded.name):
        again, _ = plan_checkpoint(spelling, resolve_config("FP8_DYNAMIC"))
        prepare_dest(dest, again.source)  # the same SOURCE: resume, do not refuse


@pytest.mark.parametrize("occupy", [_foreign, _other_ptqflow_output])
def test_cli_refuses_occupied_dest_before_the_flow(capsys, tmp_path, flow_calls, sharded, occupy):
    dest = tmp_path / "dest"
    occupy(dest, str(sharded))
    before = _snapshot(dest)
    msg = user_error(capsys, ["quantize", sharded, dest, "--scheme", "FP8_DYNAMIC"], flow_calls)
    assert "--overwrite" in msg and str(dest) in msg
    assert _snapshot(dest) == before


def test_overwrite_never_deletes_the_source(copy_of):
    src = copy_of()
    try:
        with pytest.raises(PtqflowError):
            prepare_dest(src, str(src), overwrite=True)
    finally:
        assert (src / "config.json").exists(), "SOURCE was deleted"


# --- schemes and configs ----------------------------------------------------------------------


def test_unknown_scheme_lists_valid_ones(capsys, tmp_path, flow_calls, sharded):
    msg = quantize_error(capsys, tmp_path, flow_calls, sharded, "--scheme", "W5A5X")
    assert msg.startswith("unknown scheme 'W5A5X'; valid schemes: ")
    valid = msg.strip().split("valid schemes: ")[1].split(", ")
    assert {"W4A16", "W8A16", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16"} <= set(valid)
    assert not {"FP8", "NVFP4"} & set(valid)  # they need calibration
    for name in valid:  # every scheme offered is accepted
        resolve_config(name)


@pytest.mark.parametrize(
    "scheme, instead",
    [("FP8", ["FP8_DYNAMIC", "FP8_BLOCK"]), ("nvfp4", ["NVFP4A16"])],
)
def test_static_activation_presets_refused(capsys, tmp_path, flow_calls, sharded, scheme, instead):
    msg = quantize_error(capsys, tmp_path, flow_calls, sharded, "--scheme", scheme)
    assert msg.startswith(f"scheme {scheme.upper()} needs calibrated static input activations")
    assert "calibration data" in msg
    for alt in instead:
        assert alt in msg


@pytest.mark.parametrize("scheme", ["NVFP4A16", "FP8_BLOCK"])
def test_ignore_that_splits_a_fused_set(capsys, tmp_path, flow_calls, sharded, scheme):
    msg = quantize_error(
        capsys,
        tmp_path,
        flow_calls,
        sharded,
        "--scheme",
        scheme,
        "--ignore",
        "model.layers.0.self_attn.k_proj",
    )
    (line,) = [line for line in msg.splitlines() if "fused set" in line]
    members = [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"]
    assert f"fused set {', '.join(members)} would be split" in line
    assert "model.layers.0.self_attn.k_proj: unquantized" in line
    assert "model.layers.1" not in msg


def test_config_that_splits_a_fused_set(capsys, tmp_path, flow_calls, sharded):
    from compressed_tensors.quantization import preset_name_to_scheme

    groups = {
        "gate": preset_name_to_scheme("W4A16", [r"re:.*mlp\.gate_proj$"]),
        "rest": preset_name_to_scheme("W8A16", ["Linear"]),
    }
    path = tmp_path / "config.json"
    cfg = {"config_groups": {k: v.model_dump(mode="json") for k, v in groups.items()}}
    path.write_text(json.dumps(cfg))
    msg = quantize_error(capsys, tmp_path, flow_calls, sharded, "--config", path)
    lines = [line for line in msg.splitlines() if "fused set" in line]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert (
            f"model.layers.{i}.mlp.gate_proj, model.layers.{i}.mlp.up_proj would be split" in line
        )


# --- SOURCE that is not a plain checkpoint --------------------------------------------------------


def test_source_without_config_json(capsys, tmp_path, flow_calls, copy_of):
    src = copy_of()
    (src / "config.json").unlink()
    msg = quantize_error(capsys, tmp_path, flow_calls, src, "--scheme", "FP8_DYNAMIC")
    assert str(src) in msg and "config.json" in msg


def test_missing_source(capsys, tmp_path, flow_calls):
    msg = quantize_error(capsys, tmp_path, flow_calls, tmp_path / "nope", "--scheme", "W4A16")
    assert str(tmp_path / "nope") in msg and "does not exist" in msg


def test_source_quantized_by_an_unsupported_method(capsys, tmp_path, flow_calls, copy_of):
    src = copy_of()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    msg = quantize_error(capsys, tmp_path, flow_calls, src, "--scheme", "FP8_DYNAMIC")
    assert "'gptq'" in msg and "compressed-tensors" in msg and "--source-format plain" in msg


# --- the real console: no traceback --------------------------------------------------------------


@pytest.mark.slow
def test_subprocess_user_error_has_no_traceback(tmp_path, cols200):
    dest = tmp_path / "dest"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "quantize", str(cols200), str(dest)]
        + ["--scheme", "W4A16", "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("ptqflow: error: cannot quantize as asked:"), proc.stderr
    for name in BAD_200:
        assert name in proc.stderr
    assert proc.stdout == ""
    assert_not_complete(dest)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ignore", "re:["], r"'re:\[' is not a valid regular expression"),
        (["--device", "gpu"], r"--device 'gpu' is not a device; use cpu, cuda:N"),
        (["--device", "cpu,cuda:7"], r"--device cuda:7: this machine has 2 GPU\(s\), cuda:0 to "),
        (["--device", "mps"], r"--device mps: ptqflow runs on cpu or cuda:N"),
        (["--source-settings", "{block: 1}"], r"--source-settings is not JSON \(Expecting"),
        (["--source-settings", "[128]"], r"--source-settings must be a JSON object, like \{"),
    ],
)
def test_bad_options_named_before_any_work(capsys, tmp_path, flow_calls, sharded, args, message):
    import torch

    with pytest.MonkeyPatch.context() as mp:  # a machine with two GPUs
        mp.setattr(torch.cuda, "device_count", lambda: 2)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        msg = user_error(
            capsys, ["quantize", sharded, tmp_path / "out", "--scheme", "W4A16", *args], flow_calls
        )
    assert re.search(message, msg), msg
    assert not (tmp_path / "out").exists()


def test_cuda_device_without_a_gpu(capsys, tmp_path, flow_calls, sharded, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv = ["quantize", sharded, tmp_path / "out", "--scheme", "W4A16", "--device", "cuda:0"]
    assert "no CUDA GPU that torch can use; use --device cpu" in user_error(
        capsys, argv, flow_calls
    )


def test_config_json_that_is_not_json(capsys, tmp_path, flow_calls, copy_of):
    src = copy_of()
    (src / "config.json").write_text('{"model_type": "llama",')
    msg = user_error(capsys, ["plan", src, "--scheme", "W4A16"], flow_calls)
    assert msg.startswith(f"{src}/config.json is not valid JSON"), msg
    (src / "config.json").write_text("[1, 2]")
    msg = user_error(capsys, ["plan", src, "--scheme", "W4A16"], flow_calls)
    assert "holds no JSON object" in msg


def test_destination_that_cannot_be_created(capsys, tmp_path, flow_calls, sharded):
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a folder")
    for dest, why in [
        (blocked / "out", "is not a folder"),
        ("/proc/ptqflow/out", "cannot be created"),
    ]:
        argv = ["quantize", sharded, dest, "--scheme", "W4A16"]
        msg = user_error(capsys, argv, flow_calls)
        assert msg.startswith(f"destination {dest}") and why in msg, msg


def test_hub_source_while_offline_or_unreachable(capsys, flow_calls, monkeypatch):
    """No network here: HF_HUB_OFFLINE (set by conftest) and a failing connection each give
    one message. (Nothing is faked but the connection error, which is raised in its place.)"""
    from huggingface_hub import HfApi, constants

    argv = ["plan", "someorg/somemodel", "--scheme", "W4A16"]
    if constants.HF_HUB_OFFLINE:
        assert "HF_HUB_OFFLINE is set" in user_error(capsys, argv, flow_calls)

    class ConnectError(Exception):  # how httpx names a refused connection
        pass

    def unreachable(self, *args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    msg = user_error(capsys, argv, flow_calls)
    assert msg.startswith("cannot reach the Hugging Face Hub for Hub repo someorg/somemodel"), msg


def test_a_second_writer_of_a_dest_is_refused_naming_the_first(
    capsys, tmp_path, flow_calls, sharded
):
    """A real second process holds DEST's lease: the CLI refuses before any work, naming its
    pid; killed with -9, its lease is taken over at once and the run completes."""
    from tests.helpers import hold_lease, quantize_folder

    dest = tmp_path / "out"
    with hold_lease(dest) as holder:
        msg = user_error(capsys, ["quantize", sharded, dest, "--scheme", "W4A16"], flow_calls)
        assert f"is being written by another ptqflow run (pid {holder.pid} on" in msg, msg
        with pytest.raises(PtqflowError, match=f"pid {holder.pid}"):
            quantize_folder(sharded, dest, resolve_config("W4A16"), overwrite=True)
        assert (dest / LEASE).exists()  # --overwrite deleted nothing of the other run's
    quantize_folder(sharded, dest, resolve_config("W4A16"))
    assert (dest / INDEX).exists() and not (dest / LEASE).exists()


def test_a_lease_whose_machine_died_is_taken_over_after_its_heartbeat_times_out(tmp_path):
    from storage.lease import TIMEOUT

    lease = open_dest(tmp_path / "out").lease()
    lease.path.parent.mkdir(parents=True)
    other = {"owner": "x", "host": "elsewhere", "pid": 1, "since": time.time()}
    lease.path.write_text(json.dumps({**other, "heartbeat": time.time() - TIMEOUT + 5}))
    with pytest.raises(PtqflowError, match="pid 1 on elsewhere"):
        lease.acquire()
    lease.path.write_text(json.dumps({**other, "heartbeat": time.time() - TIMEOUT - 1}))
    with lease:
        assert json.loads(lease.path.read_text())["owner"] == lease.record["owner"]
    assert not lease.path.exists()
