"""The Prefect flows, `model_free_ptq` and the `ptqflow` command, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint, load_tensors
from tests.helpers import (
    CLI,
    IGNORE,
    ROOT,
    assert_same_bytes,
    files,
    hold_lease,
    quantize_folder,
    run_cli,
)


@pytest.mark.slow  # starts a Prefect server
def test_model_free_ptq_runs_the_flow(tmp_path, prefect_server):
    from flows import model_free_ptq

    src = build_checkpoint(tmp_path / "src", "deepseek_v3", shards=3)
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    (src / "original").mkdir()
    (src / "original" / "consolidated.pth").write_bytes(b"old weights")
    result = model_free_ptq(
        model_stub=src,
        save_directory=tmp_path / "out",
        scheme="NVFP4A16",
        ignore=IGNORE,
        max_workers=2,
        device="cpu",
    )
    assert len(result.shards) == 3
    quantize_folder(src, tmp_path / "plain", resolve_config("NVFP4A16", ignore=IGNORE))
    got = files(tmp_path / "out")
    assert got == files(tmp_path / "plain")
    assert "pytorch_model.bin" not in got and not any(f.startswith("original/") for f in got)
    for name in ("tokenizer_config.json", "chat_template.jinja", "assets/readme.txt"):
        assert got[name] == (src / name).read_bytes()
    config = json.loads(got["config.json"])
    source_config = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source_config
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors",
        "nvfp4-pack-quantized",
        "compressed",
    )
    assert qc["ignore"] == IGNORE and list(qc["config_groups"]) == ["NVFP4A16"]
    assert not list((tmp_path / "out").glob(".*.partial"))


@pytest.mark.slow
def test_include_other_weights_and_tied_embeddings(tmp_path, prefect_server):
    from flows.quantize import run_quantize

    src = build_checkpoint(tmp_path / "src", "tied", shards=2)
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    run_quantize(
        source=str(src),
        destination=str(tmp_path / "out"),
        scheme="W4A16",
        include_other_weights=True,
        device="cpu",
    )
    assert (tmp_path / "out" / "pytorch_model.bin").read_bytes() == b"old weights"
    out, source = load_tensors(tmp_path / "out"), load_tensors(src)
    # the tied embedding is kept bit for bit, and recorded as ignored
    assert torch.equal(out["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert "lm_head.weight" not in out
    qc = json.loads((tmp_path / "out/config.json").read_text())["quantization_config"]
    assert "model.embed_tokens" in qc["ignore"]


@pytest.mark.slow
def test_reindex_fused_weights(tmp_path, prefect_server):
    from flows.reindex import reindex_fused_weights
    from tasks.core.loaders import fused_sets

    src = build_checkpoint(tmp_path / "src", "deepseek_v3", shards=3)
    source_index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    modules = [n[: -len(".weight")] for n in source_index if n.endswith(".weight")]
    sets = fused_sets(modules)
    assert any(len({source_index[f"{m}.weight"] for m in s}) > 1 for s in sets)

    reindex_fused_weights(str(src), str(tmp_path / "re"), num_workers=2)
    index = json.loads((tmp_path / "re/model.safetensors.index.json").read_text())
    for s in sets:
        assert len({index["weight_map"][f"{m}.weight"] for m in s}) == 1, s
    out = load_tensors(tmp_path / "re")
    assert_same_bytes(out, load_tensors(src))
    for shard in set(index["weight_map"].values()):
        from safetensors import safe_open

        with safe_open(tmp_path / "re" / shard, "pt") as f:
            assert sorted(f.keys()) == sorted(
                k for k, v in index["weight_map"].items() if v == shard
            )
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in out.values())

    config = resolve_config("NVFP4A16", ignore=IGNORE)
    quantize_folder(src, tmp_path / "a", config)
    quantize_folder(tmp_path / "re", tmp_path / "b", resolve_config("NVFP4A16", ignore=IGNORE))
    assert_same_bytes(load_tensors(tmp_path / "b"), load_tensors(tmp_path / "a"))


@pytest.mark.slow
def test_cli_quantize_end_to_end(tmp_path):
    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=2)
    proc = run_cli(
        "quantize",
        str(src),
        str(tmp_path / "out"),
        "--scheme",
        "FP8_BLOCK",
        "--ignore",
        "lm_head",
        "--ignore",
        "re:.*mlp.gate$",
        "--ignore",
        "model.embed_tokens",
        "--max-workers",
        "2",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    quantize_folder(src, tmp_path / "plain", resolve_config("FP8_BLOCK", ignore=IGNORE))
    assert files(tmp_path / "out") == files(tmp_path / "plain")


@pytest.mark.slow
def test_the_cli_plans_once(tmp_path, prefect_server, monkeypatch):
    """The CLI plans for its checks before Prefect starts; the flow's plan task takes that
    plan rather than reading every header again (from the Hub, a request per shard)."""
    import tasks.core.planner
    from flows.cli import main

    planned, load_source = [], tasks.core.planner.load_source

    def counted(folder):  # every plan reads the source's headers through it
        planned.append(folder.url)
        return load_source(folder)

    monkeypatch.setattr(tasks.core.planner, "load_source", counted)
    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=2)
    argv = ["quantize", str(src), str(tmp_path / "out"), "--scheme", "W4A16"]
    argv += [x for pattern in IGNORE for x in ("--ignore", pattern)]
    assert main(argv) == 0
    assert planned == [str(src)]
    assert main(argv) == 0  # the next command plans afresh
    assert planned == [str(src)] * 2
    quantize_folder(src, tmp_path / "plain", resolve_config("W4A16", ignore=IGNORE))
    assert files(tmp_path / "out") == files(tmp_path / "plain")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["FP8_BLOCK", "NVFP4A16"])
def test_memory_does_not_grow_with_shard_size(tmp_path, scheme):
    """Peak RSS while writing one shard is bounded by a tensor, not by the shard."""
    # Peak RSS of the write alone: /proc's high-water mark, reset just before it (getrusage's
    # maxrss would start at the peak of the process that spawned this one).
    script = """
import sys
import torch
from storage.dest import open_dest
from storage.source import Folder
from tasks.core.quant.compress import quantize_weights
from tasks.core.shard import write_shard
from tasks.core.planner import plan_checkpoint
from tasks.core.schemes import resolve_config

def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key))
    return int(line.split()[1]) * 1024

config = resolve_config(sys.argv[2], ignore=["lm_head", "model.embed_tokens"])
plan, _ = plan_checkpoint(sys.argv[1], config)
dest = open_dest(sys.argv[1] + "-out")
dest.prepare(plan.source)
(shard,) = plan.shards
for scheme in config.config_groups.values():  # numba starts once per process (~80 MB)
    quantize_weights([torch.randn(256, 1024).to(torch.bfloat16)], scheme)
rss = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
write_shard(shard, Folder(plan.source).open, dest.staging, config.config_groups)
print(status("VmHWM:") - rss)
"""
    from benchmarks.make_checkpoint import make_checkpoint

    def peak(src) -> int:
        out = subprocess.run(
            [sys.executable, "-c", script, str(src), scheme],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout.split()
        return int(out[0])

    growth = []
    for size in (0.12, 0.24):
        # built here, so the measuring process never held a whole shard
        src = make_checkpoint(tmp_path / f"m{size}", size_gb=size, shard_gb=10, hidden=1024)
        # the least of two runs: when worker threads free what they allocated varies from
        # run to run by about one layer (~20 MB), in either direction
        growth.append(min(peak(src), peak(src)))
    # the shard doubles by ~120 MB; the peak may not follow (one layer is ~27 MB),
    # and the larger shard (~240 MB) is never held whole
    assert growth[1] - growth[0] < 12 * 2**20, growth
    assert growth[1] < 120 * 2**20, growth


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True])
def test_a_failure_inside_the_flow_ends_in_one_message(
    capfd, tmp_path, prefect_server, monkeypatch, debug
):
    """The flow itself meets DEST's lease held by another process (the CLI's early check is
    skipped): the terminal gets Prefect's lines without a traceback, then one message."""
    from flows.cli import main
    from storage.dest import Dest

    monkeypatch.setenv("PTQFLOW_DEBUG", "0")
    src = build_checkpoint(tmp_path / "src", "llama")
    monkeypatch.setattr(Dest, "check", lambda self, source, overwrite=False: None)
    argv = ["quantize", str(src), str(tmp_path / "out"), "--scheme", "W4A16"]
    with hold_lease(tmp_path / "out") as holder:
        capfd.readouterr()
        rc = main(["--debug", *argv] if debug else argv)
        err = capfd.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("ptqflow: error: destination") and f"pid {holder.pid}" in last, err
    assert ("Traceback" in err) == debug, err


@pytest.mark.slow
def test_ctrl_c_prints_one_line_exits_130_and_the_rerun_resumes(tmp_path):
    """SIGINT to the CLI's whole process group, as a terminal's Ctrl-C: the temporary Prefect
    server (its own session) outlives the interrupt, so the run ends with one line."""
    import os
    import signal
    import threading

    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=3)
    argv = [*CLI, "quantize", str(src), str(tmp_path / "out"), "--scheme", "NVFP4A16"]
    argv += ["--observer", "nvfp4_expanded_mse", "--ignore", "lm_head"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(run.stderr))
    reader.start()
    started = threading.Event()
    while not any("Task run 'download" in line for line in lines) and run.poll() is None:
        started.wait(0.05)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(timeout=120) == 130, "".join(lines)
    reader.join()
    err = "".join(lines)
    assert "Traceback" not in err, err
    assert lines[-1] == "ptqflow: interrupted; run the same command again to resume\n", err
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    again = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    config = resolve_config("NVFP4A16", ignore=["lm_head"], observer="nvfp4_expanded_mse")
    quantize_folder(src, tmp_path / "want", config)
    assert files(tmp_path / "out") == files(tmp_path / "want")


SWALLOWING_CLI = """
import sys
import flows.quantize
from flows.cli import run

real = flows.quantize.run_shards

def swallowing(*args, **kwargs):  # code on the main thread that catches the KeyboardInterrupt
    while True:
        try:
            return real(*args, **kwargs)
        except KeyboardInterrupt:
            print("swallowed", file=sys.stderr, flush=True)

flows.quantize.run_shards = swallowing
sys.argv = ["ptqflow", *sys.argv[1:]]
run()
"""


@pytest.mark.slow
def test_ctrl_c_ends_the_command_even_when_the_interrupt_is_swallowed(tmp_path):
    """Ctrl-C ends the command with the one line and 130 within seconds even if code on the
    main thread catches the KeyboardInterrupt and the run goes on (to its end, or until the
    timer ends it)."""
    import os
    import signal
    import threading
    import time

    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=3)
    argv = ["quantize", str(src), str(tmp_path / "out"), "--scheme", "NVFP4A16"]
    argv += ["--observer", "nvfp4_expanded_mse", "--ignore", "lm_head"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", SWALLOWING_CLI, *argv]
    run = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(run.stderr))
    reader.start()
    while not any("Task run 'download" in line for line in lines) and run.poll() is None:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGINT)
    sent = time.monotonic()
    assert run.wait(timeout=120) == 130, "".join(lines)
    assert time.monotonic() - sent < 15
    reader.join()
    assert "swallowed\n" in lines, "".join(lines)
    assert lines[-1] == "ptqflow: interrupted; run the same command again to resume\n"


@pytest.mark.slow
def test_a_shard_finished_but_not_recorded_is_kept_not_rewritten(tmp_path, prefect_server):
    """A kill after a shard got its final name, before its result was stored (here: the
    result store and the finalize step are undone): the rerun keeps every finished file
    as it is (inode, mtime) and ends identical to an uninterrupted run."""
    import shutil

    from tests.helpers import run

    src = build_checkpoint(tmp_path / "src", "llama", shards=3)
    out = tmp_path / "out"
    run(str(src), str(out), scheme="W4A16")

    def stats() -> dict:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")}

    before = stats()
    assert len(before) == 3
    shutil.rmtree(out / ".ptqflow" / "results")
    for name in ("config.json", "model.safetensors.index.json"):
        (out / name).unlink()
    summary = run(str(src), str(out), scheme="W4A16")
    assert stats() == before and summary.cached == 3
    quantize_folder(src, tmp_path / "want", resolve_config("W4A16", ignore=IGNORE))
    assert files(out) == files(tmp_path / "want")
