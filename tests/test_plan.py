"""`ptqflow plan`: per-shard counts, predicted size, suggestions and call-outs.

Expected values are computed here from tensor names and shard files alone, and the
predicted size is checked against what the real shard writer produces.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from storage.dest import open_dest
from storage.source import Folder
from tasks.core.finalize import finalize
from tasks.core.planner import plan_checkpoint
from tasks.core.schemes import resolve_config
from tasks.core.shard import write_shard
from tests.checkpoints import build_checkpoint, load_tensors, write_checkpoint

INDEX = "model.safetensors.index.json"
ROUTER = r"re:model\.layers\.\d+\.mlp\.gate$"
ROW = re.compile(r"^(\S+\.safetensors)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)$")
# Fused sets whose members share an NVFP4 global scale: (set key, first member's name).
FUSED = (
    (re.compile(r"^(.*\.self_attn)\.[qkv]_proj\.weight$"), "{}.q_proj.weight"),
    (
        re.compile(r"^(.*\.mlp(?:\.experts\.\d+)?)\.(?:gate|up)_proj\.weight$"),
        "{}.gate_proj.weight",
    ),
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        arch: build_checkpoint(root / arch, arch, shards=3)
        for arch in ("llama", "qwen3_moe", "tied", "fused_experts")
    }


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def expected_counts(
    wmap: dict[str, str], ignore: set[str] = frozenset(), move_fused: bool = False
) -> dict[str, dict[str, int]]:
    """Per output shard: quantized (targeted *.weight), ignored (in `ignore`), kept (the rest).

    With `move_fused`, members of a q/k/v or gate/up set go to the shard of the first one.
    """
    home = dict(wmap)
    if move_fused:
        for name in wmap:
            for pattern, first in FUSED:
                if m := pattern.match(name):
                    home[name] = wmap[first.format(m[1])]
    counts = {f: {"quantized": 0, "ignored": 0, "kept": 0} for f in sorted(set(wmap.values()))}
    for name, file in home.items():
        module, _, param = name.rpartition(".")
        if param != "weight" or module.endswith("norm"):
            kind = "kept"
        elif module in ignore:
            kind = "ignored"
        else:
            kind = "quantized"
        counts[file][kind] += 1
    return counts


def run_plan(capsys, source: Path, scheme: str, ignore=(), as_json: bool = False):
    argv = ["plan", str(source), "--scheme", scheme]
    for p in ignore:
        argv += ["--ignore", p]
    if as_json:
        argv.append("--json")
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert err == ""
    return rc, (json.loads(out) if as_json else out)


COUNT_CASES = [
    ("FP8_DYNAMIC", [], False),
    ("NVFP4A16", ["lm_head", "model.embed_tokens"], True),  # global scale: sets move
    ("W4A16", ["lm_head"], False),
]


@pytest.mark.parametrize("scheme, ignore, move", COUNT_CASES)
def test_counts_per_shard(capsys, ckpts, scheme, ignore, move):
    src = ckpts["llama"]
    wmap = weight_map(src)
    expected = expected_counts(wmap, set(ignore), move)
    if move:  # the builder splits a fused set across shards, so moving changes the counts
        assert expected != expected_counts(wmap, set(ignore), False)

    rc, report = run_plan(capsys, src, scheme, ignore, as_json=True)
    assert rc == 0
    assert report["shards"] == expected
    assert report["problems"] == []

    rc, text = run_plan(capsys, src, scheme, ignore)
    assert rc == 0
    rows = {m[1]: m.groups()[1:4] for line in text.splitlines() if (m := ROW.match(line))}
    assert rows == {
        f: (str(c["quantized"]), str(c["ignored"]), str(c["kept"])) for f, c in expected.items()
    }
    assert "predicted output size:" in text and "(3 shards, 4 other files)" in text


def _data_bytes(path: Path) -> tuple[int, int]:
    """(header length, sum of tensor byte ranges) of a safetensors file, parsed by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])
    meta.pop("__metadata__", None)
    return n, sum(e["data_offsets"][1] - e["data_offsets"][0] for e in meta.values())


@pytest.mark.parametrize(
    "arch, scheme, ignore",
    [
        ("llama", "FP8_DYNAMIC", []),
        ("llama", "FP8_BLOCK", ["lm_head"]),
        ("llama", "W4A16_ASYM", []),
        ("llama", "NVFP4A16", ["model.embed_tokens"]),
        ("qwen3_moe", "W4A16", [ROUTER]),
        ("fused_experts", "FP8_BLOCK", []),
        ("tied", "W4A16", []),
    ],
)
def test_predicted_size_is_what_gets_written(capsys, tmp_path, ckpts, arch, scheme, ignore):
    src = ckpts[arch]
    config = resolve_config(scheme, ignore=ignore)
    plan, report = plan_checkpoint(src, config)
    assert report.problems == []
    rc, cli = run_plan(capsys, src, scheme, ignore, as_json=True)
    assert rc == 0 and cli["output_bytes"] == plan.total_size

    folder = Folder(plan.source)
    dest = tmp_path / "out"
    open_dest(dest).prepare(plan.source)
    manifests = [write_shard(s, folder.open, dest, config.config_groups) for s in plan.shards]
    index = finalize(plan, folder, open_dest(dest), manifests)

    assert sorted(p.name for p in dest.glob("*.safetensors")) == sorted(s.name for s in plan.shards)
    total = 0
    for shard, manifest in zip(plan.shards, manifests, strict=True):
        path = dest / shard.name
        header_len, data = _data_bytes(path)
        assert data == shard.nbytes, shard.name
        assert path.stat().st_size == 8 + header_len + shard.nbytes == manifest.size
        assert len(load_file(str(path))) == len(shard.specs)
        total += data
    assert total == plan.total_size == index["metadata"]["total_size"]
    on_disk = json.loads((dest / INDEX).read_text())
    assert on_disk["metadata"]["total_size"] == total


def test_suggestions_llama(capsys, ckpts):
    rc, report = run_plan(capsys, ckpts["llama"], "FP8_DYNAMIC", as_json=True)
    assert rc == 0
    assert sorted(report["suggested_ignore"]) == ["lm_head", "model.embed_tokens"]
    # each says vLLM would refuse it quantized, with the ignore that keeps it
    assert sorted(report["callouts"]) == [
        f"{m} will be quantized, but vLLM builds it unquantized (an LM head or embedding) and "
        f"would refuse the checkpoint; pass --ignore '{m}'"
        for m in ("lm_head", "model.embed_tokens")
    ]


def test_suggestions_qwen3_moe_router(capsys, ckpts):
    src = ckpts["qwen3_moe"]
    rc, report = run_plan(capsys, src, "FP8_DYNAMIC", as_json=True)
    assert rc == 0
    assert sorted(report["suggested_ignore"]) == sorted(["model.embed_tokens", "lm_head", ROUTER])
    rc, text = run_plan(capsys, src, "FP8_DYNAMIC")
    (line,) = [line for line in text.splitlines() if line.startswith("suggested (usually")]
    assert sorted(re.findall(r"--ignore '([^']+)'", line)) == sorted(report["suggested_ignore"])

    # Applying the suggestions ignores exactly the two routers, the embedding and lm_head.
    plan, rep = plan_checkpoint(
        src, resolve_config("FP8_DYNAMIC", ignore=report["suggested_ignore"])
    )
    specs = {s.name: s for sh in plan.shards for s in sh.specs}
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    for name in [*routers, "model.embed_tokens.weight", "lm_head.weight"]:
        assert specs[name].dtype == "BF16" and f"{name}_scale" not in specs
    assert sum(c["ignored"] for c in rep.counts.values()) == 4
    assert specs["model.layers.0.mlp.experts.0.gate_proj.weight"].dtype == "F8_E4M3"
    assert rep.suggestions == []  # nothing left to suggest


@pytest.mark.parametrize(
    "name", ["model.layers.0.mlp.experts.w13_weight", "model.layers.0.mlp.experts.weight"]
)
def test_unexpected_3d_tensor_is_called_out(capsys, tmp_path, ckpts, name):
    src = ckpts["llama"]
    tensors = load_tensors(src)
    tensors[name] = torch.zeros(4, 512, 256, dtype=torch.bfloat16)
    config = json.loads((src / "config.json").read_text())
    path = write_checkpoint(tmp_path / "src", tensors, config)

    rc, report = run_plan(capsys, path, "FP8_DYNAMIC", as_json=True)
    assert rc == 0 and report["problems"] == []
    (callout,) = [c for c in report["callouts"] if name in c]
    assert callout.startswith(f"{name} [4, 512, 256] stay BF16")
    assert "3-D" in callout
    # It is kept: 5 norms + the 3-D tensor; everything else quantized.
    assert report["shards"] == {"model.safetensors": {"quantized": 16, "ignored": 0, "kept": 6}}
    plan, _ = plan_checkpoint(path, resolve_config("FP8_DYNAMIC"))
    specs = {s.name: s for s in plan.shards[0].specs}
    assert (specs[name].dtype, specs[name].shape) == ("BF16", (4, 512, 256))
    assert not any(n.startswith(f"{name}_") for n in specs)

    rc, text = run_plan(capsys, path, "FP8_DYNAMIC")
    assert f"warning: {callout}" in text.splitlines()


def test_tied_embeddings_called_out_and_kept(capsys, ckpts):
    src = ckpts["tied"]
    wmap = weight_map(src)
    assert "lm_head.weight" not in wmap
    rc, report = run_plan(capsys, src, "NVFP4A16", as_json=True)
    assert rc == 0 and report["problems"] == []
    (callout,) = [c for c in report["callouts"] if "tie_word_embeddings" in c]
    assert "model.embed_tokens" in callout
    assert "model.embed_tokens" not in report["suggested_ignore"]
    assert "lm_head" not in report["suggested_ignore"]
    quantized = sum(c["quantized"] for c in report["shards"].values())
    assert quantized == 14  # 7 projections x 2 layers, not the embedding
    assert sum(sum(c.values()) for c in report["shards"].values()) == len(wmap)

    plan, _ = plan_checkpoint(src, resolve_config("NVFP4A16"))
    specs = {s.name: s for sh in plan.shards for s in sh.specs}
    embed = specs["model.embed_tokens.weight"]
    assert (embed.dtype, embed.shape) == ("BF16", (512, 256))
    assert not any(n.startswith("model.embed_tokens.weight_") for n in specs)
    assert "model.embed_tokens" in plan.config["ignore"]

    rc, text = run_plan(capsys, src, "NVFP4A16")
    assert f"warning: {callout}" in text.splitlines()


def test_plan_reports_problems_with_exit_1(capsys, tmp_path, ckpts):
    src = ckpts["llama"]
    tensors = load_tensors(src)
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = torch.zeros(256, 200).bfloat16()
    config = json.loads((src / "config.json").read_text())
    path = write_checkpoint(tmp_path / "src", tensors, config)
    rc, report = run_plan(capsys, path, "W4A16", as_json=True)
    assert rc == 1
    assert [p.split(" ")[0] for p in report["problems"]] == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)
    ]
    assert r"re:model\.layers\.\d+\.mlp\.down_proj$" in report["fixes"]
    rc, text = run_plan(capsys, path, "W4A16")
    assert rc == 1
    assert sum(line.startswith("problem: ") for line in text.splitlines()) == 2


def test_the_flow_takes_the_plan_the_cli_made_for_an_equal_request(ckpts):
    """The CLI builds its PlanRequest from the flow's parameters as the flow does; the plan it
    made for its checks is the flow's (tasks/plan.py `planned`), keyed by the request, which
    planning leaves as it was (a tied checkpoint adds to the config's ignore list)."""
    import cloudpickle

    from flows import options
    from flows.cli import build_parser
    from tasks.plan import plan, planned

    argv = ["quantize", str(ckpts["tied"]), "out", "--scheme", "W4A16", "--ignore", "lm_head"]
    params = options.QUANTIZE.values(build_parser().parse_args(argv))
    request = options.plan_request(**params)
    flows_own = options.plan_request(
        str(ckpts["tied"]), "W4A16", None, ["lm_head"], max_workers=1, device=None
    )
    assert flows_own.key() == request.key() == cloudpickle.loads(cloudpickle.dumps(request)).key()
    made = plan(request)
    assert request.key() == flows_own.key()  # the tied embedding went into a copy's ignores
    assert "model.embed_tokens" in made[0].config["ignore"]
    with planned(request, made):
        assert plan(flows_own) is made
        other = options.plan_request(str(ckpts["tied"]), "FP8_BLOCK")
        assert plan(other) is not made
    assert plan(flows_own) is not made
