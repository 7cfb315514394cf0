"""Throughput, peak memory and stage times of ptqflow (and llm-compressor) per scheme.

    python benchmarks/bench.py [--schemes FP8_BLOCK,FP8_DYNAMIC,W4A16,NVFP4A16] [--repeat 3]
        [--max-workers 1] [--size-gb 1.6 --shard-gb 0.4 --hidden 4096] [--flow]
        [--observer memoryless_mse] [--llmcompressor-python benchmarks/.venv-llmc/bin/python]
        [--json FILE]

Builds a synthetic Llama-style checkpoint once (benchmarks/make_checkpoint.py,
kept under benchmarks/.data/), then quantizes it per scheme, each run in a fresh
process: ptqflow through its plain functions (plan_checkpoint, then write_shard
over a pool of --max-workers threads, each shard's upload (hash) on one more
thread as the flow chains it, then finalize), with --flow also through
`ptqflow quantize` (Prefect server start-up and task overhead included), and
llm-compressor's `model_free_ptq` when an interpreter that has it is found
(--llmcompressor-python, else benchmarks/.venv-llmc from setup_llmcompressor.sh,
else this one). Runs of the tools alternate, so load from elsewhere hits them
alike; the median of --repeat runs is printed. Peak RSS is the run's own
(os.wait4; the parent never imports torch, since a child's peak starts at its
parent's RSS). Finally the outputs of ptqflow and llm-compressor are compared
tensor by tensor and every difference is listed. Stage seconds are summed over
shards (over worker threads when --max-workers > 1); upload (the shard's hash)
overlaps the next shard's stages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from flows.server import server_process  # noqa: E402  (no Prefect: the parent stays small)
from tasks.core.devices import usable_cpus  # noqa: E402  (no torch either)

DEFAULT_SCHEMES = "FP8_BLOCK,FP8_DYNAMIC,W4A16,NVFP4A16"
STAGES = ("read", "quantize", "write", "upload")


# --- one run, in a fresh process ---------------------------------------------------------


def child_plain(
    src: str, dst: str, scheme: str, max_workers: int, ignore: list[str], observer: str | None
) -> dict:
    """ptqflow without Prefect: the core pipeline (plan, write_shard on threads, finalize)."""
    import importlib

    from tasks.core.pipeline import quantize
    from tasks.core.schemes import resolve_config

    # imported before the clock starts, as run_llmcompressor.py imports llm-compressor
    importlib.import_module("compressed_tensors.compressors")
    start = time.perf_counter()
    config = resolve_config(scheme, ignore=ignore, observer=observer)
    summary = quantize(src, dst, config, max_workers=max_workers)
    stages = {k: sum(m.stages[k] for m in summary.shards) for k in STAGES}
    return {"seconds": time.perf_counter() - start, "stages": stages}


def child_flow(
    src: str, dst: str, scheme: str, max_workers: int, ignore: list[str], observer: str | None
) -> dict:
    """`ptqflow quantize`, as a user runs it (against the server bench.py keeps running).

    Besides the whole process, it reports when the CLI handed over to the flow
    (`called`, epoch seconds: imports and checks before it) and the flow's own
    seconds from its start to finalize's end (`flow`)."""
    import flows.quantize
    from flows.cli import main

    run, seen = flows.quantize.run_quantize, {}

    def timed_run(**params):
        seen["called"] = time.time()
        seen["summary"] = run(**params)
        return seen["summary"]

    flows.quantize.run_quantize = timed_run  # cmd_quantize imports it when it runs
    argv = ["quantize", src, dst, "--scheme", scheme, "--max-workers", str(max_workers)]
    argv += ["--observer", observer] if observer else []
    start = time.perf_counter()
    rc = main(argv + [x for m in ignore for x in ("--ignore", m)])
    if rc:
        raise SystemExit(rc)
    shards = seen["summary"].shards
    return {
        "seconds": time.perf_counter() - start,
        "stages": {k: sum(m.stages.get(k, 0.0) for m in shards) for k in STAGES},
        "called": seen["called"],
        "flow": seen["summary"].seconds,
    }


def run_child(cmd: list[str]) -> dict:
    """Run one benchmark process; its last stdout line (JSON) plus its own peak RSS in bytes.

    The child is reaped with os.wait4, whose rusage is that child's alone
    (RUSAGE_CHILDREN would give the largest of all children so far).
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        spawned, start = time.time(), time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            tail = "\n".join(err.read().splitlines()[-25:])
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
        result = json.loads(out.read().strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024
    result["wall"] = wall  # the whole process: interpreter, imports, exit
    if "called" in result:  # the product path: what a user waits for is the whole process
        result["startup"], result["seconds"] = result.pop("called") - spawned, wall
    return result


# --- the benchmark -----------------------------------------------------------------------


def checkpoint(a: argparse.Namespace) -> Path:
    """The source checkpoint: --checkpoint, or a synthetic one built once and reused."""
    if a.checkpoint:
        return Path(a.checkpoint).resolve()
    path = HERE / ".data" / f"llama-{a.size_gb:g}gb-{a.shard_gb:g}gb-h{a.hidden}"
    if not (path / "model.safetensors.index.json").exists():
        print(f"building {path} ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                str(HERE / "make_checkpoint.py"),
                str(path),
                "--size-gb",
                str(a.size_gb),
                "--shard-gb",
                str(a.shard_gb),
                "--hidden",
                str(a.hidden),
            ],
            check=True,
        )
    return path


def find_llmcompressor(a: argparse.Namespace) -> str | None:
    """An interpreter that has llm-compressor, or None."""
    import importlib.util

    if a.no_llmcompressor:
        return None
    if a.llmcompressor_python:
        return a.llmcompressor_python
    venv = HERE / ".venv-llmc" / "bin" / "python"
    if venv.exists():
        return str(venv)
    return sys.executable if importlib.util.find_spec("llmcompressor") else None


def tool_commands(a, llmc: str | None) -> dict[str, list[str]]:
    """Command (without SOURCE DEST SCHEME) of each tool to run."""
    tail = ["--max-workers", str(a.max_workers)] + [x for m in a.ignore for x in ("--ignore", m)]
    tail += ["--observer", a.observer] if a.observer else []
    cmds = {"ptqflow": [sys.executable, str(HERE / "bench.py"), "--child", "plain"]}
    if a.flow:
        cmds["ptqflow-flow"] = [sys.executable, str(HERE / "bench.py"), "--child", "flow"]
    if llmc:
        cmds["llmcompressor"] = [llmc, str(HERE / "run_llmcompressor.py")]
    return {k: (v, tail) for k, v in cmds.items()}


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of `folder` that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / f for name, f in weight_map.items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as g:
            out.update(dict.fromkeys(g.keys(), f))
    return out


def compare(ours: Path, theirs: Path) -> tuple[int, list[str]]:
    """(tensors compared, differences) between two checkpoints, tensor by tensor, in bytes."""
    from contextlib import ExitStack

    import torch
    from safetensors import safe_open

    a, b = tensor_files(ours), tensor_files(theirs)
    problems = [f"{n}: only in ptqflow's output" for n in sorted(set(a) - set(b))]
    problems += [f"{n}: only in llm-compressor's output" for n in sorted(set(b) - set(a))]
    with ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(f, "pt")) for f in {*a.values(), *b.values()}}
        for name in sorted(set(a) & set(b)):
            x, y = files[a[name]].get_tensor(name), files[b[name]].get_tensor(name)
            if (x.dtype, x.shape) != (y.dtype, y.shape):
                problems.append(
                    f"{name}: ptqflow {x.dtype} {tuple(x.shape)}, "
                    f"llm-compressor {y.dtype} {tuple(y.shape)}"
                )
                continue
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
            xi = x.reshape(-1).view(bits[x.element_size()])
            yi = y.reshape(-1).view(bits[y.element_size()])
            differ = int((xi != yi).sum())
            if differ:
                where = int((xi != yi).nonzero()[0])
                problems.append(
                    f"{name} ({x.dtype}): {differ} of {x.numel()} elements differ, first at "
                    f"flat index {where}: ptqflow {x.reshape(-1)[where].item()!r}, "
                    f"llm-compressor {y.reshape(-1)[where].item()!r}"
                )
    return len(set(a) & set(b)), problems


def run_scheme(scheme: str, src: Path, work: Path, cmds: dict, repeat: int, size: int) -> dict:
    """Every tool `repeat` times, alternating; per tool the medians, then the ratios
    and the comparison of ptqflow's output with llm-compressor's."""
    runs: dict[str, list[dict]] = {tool: [] for tool in cmds}
    for i in range(repeat):
        for tool, (cmd, tail) in cmds.items():
            dst = work / f"{tool}-{scheme}"
            shutil.rmtree(dst, ignore_errors=True)
            result = run_child(cmd + [str(src), str(dst), scheme] + tail)
            runs[tool].append(result)
            print(
                f"  {scheme:<12} {tool:<14} run {i + 1}/{repeat}: {result['seconds']:7.2f} s, "
                f"peak RSS {result['peak_rss'] / 2**20:7.0f} MiB",
                flush=True,
            )
    r = {"tools": {tool: summarize(rs, size) for tool, rs in runs.items()}}
    if "llmcompressor" in runs:
        ours, theirs = r["tools"]["ptqflow"], r["tools"]["llmcompressor"]
        r["ratios"] = {
            "throughput": ours["gb_per_s"] / theirs["gb_per_s"],
            "peak_rss": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        }
        pair = [str(work / f"{tool}-{scheme}") for tool in ("ptqflow", "llmcompressor")]
        c = run_child([sys.executable, str(HERE / "bench.py"), "--child", "compare", *pair])
        r["compared"], r["differences"] = c["compared"], c["differences"]
        r["identical"] = not r["differences"]
    if "ptqflow-flow" in runs:
        pair = [str(work / f"{tool}-{scheme}") for tool in ("ptqflow-flow", "ptqflow")]
        c = run_child([sys.executable, str(HERE / "bench.py"), "--child", "compare", *pair])
        r["flow_identical"] = not c["differences"]
    for tool in cmds:
        shutil.rmtree(work / f"{tool}-{scheme}", ignore_errors=True)
    return r


def summarize(runs: list[dict], source_bytes: int) -> dict:
    """Medians over runs: seconds, GB/s, peak RSS (MiB), per-stage seconds, the whole
    process's seconds and, for the product path, its start-up and flow seconds."""
    seconds = statistics.median(r["seconds"] for r in runs)
    stages = {
        k: statistics.median(r["stages"][k] for r in runs)
        for k in STAGES
        if all(k in r["stages"] for r in runs)
    }
    return {
        "seconds": seconds,
        "gb_per_s": source_bytes / 1e9 / seconds,
        "peak_rss_mib": statistics.median(r["peak_rss"] for r in runs) / 2**20,
        "stages": stages,
        **{
            k: statistics.median(r[k] for r in runs)
            for k in ("wall", "startup", "flow")
            if k in runs[0]
        },
        "runs": runs,
    }


def print_table(results: dict, source_bytes: int) -> None:
    print(f"\nsource {source_bytes / 1e9:.2f} GB; medians; stage seconds summed over shards")
    head = (
        f"{'scheme':<12} {'tool':<14} {'GB/s':>7} {'peak RSS MiB':>13} {'seconds':>8} "
        f"{'read s':>7} {'quant s':>8} {'write s':>8} {'upload s':>9}"
    )
    print(head)
    print("-" * len(head))
    for scheme, r in results.items():
        for tool, s in r["tools"].items():
            st = [f"{s['stages'][k]:.2f}" if k in s["stages"] else "-" for k in STAGES]
            print(
                f"{scheme:<12} {tool:<14} {s['gb_per_s']:>7.3f} {s['peak_rss_mib']:>13.0f} "
                f"{s['seconds']:>8.2f} {st[0]:>7} {st[1]:>8} {st[2]:>8} {st[3]:>9}"
            )
        if "ratios" in r:
            q = r["ratios"]
            print(f"{'':<12} {'ptqflow/llmc':<14} {q['throughput']:>6.2f}x {q['peak_rss']:>12.2f}x")
        if "identical" in r:
            verdict = "bit-identical" if r["identical"] else "DIFFERENT"
            print(f"{'':<12} outputs vs llm-compressor: {verdict} ({r['compared']} tensors)")
            for line in r["differences"][:20]:
                print(f"{'':<14} {line}")
            if len(r["differences"]) > 20:
                print(f"{'':<14} ... {len(r['differences']) - 20} more")


def print_product(results: dict) -> None:
    """`ptqflow quantize` (--flow) beside the direct path, and where its extra time goes:
    start-up (process start to the flow: interpreter, imports, planning, checks), the flow
    (its start to finalize's end, against the direct path's same work) and the rest (the
    flow run's creation and end, exit); then its whole process against llm-compressor's."""
    print("\nproduct path: `ptqflow quantize`, a Prefect server running; whole processes; medians")
    head = (
        f"{'scheme':<12} {'direct s':>9} {'flow s':>7} {'flow/direct':>12} {'start-up s':>11} "
        f"{'rest s':>7} {'product s':>10} {'llmc s':>7} {'llmc/product':>13} "
        f"{'above start-up':>15} {'RSS ratio':>10} {'same bytes':>10}"
    )
    print(head)
    print("-" * len(head))
    for scheme, r in results.items():
        direct, product = r["tools"]["ptqflow"], r["tools"]["ptqflow-flow"]
        rest = product["wall"] - product["startup"] - product["flow"]
        llmc = r["tools"].get("llmcompressor")
        # above start-up: llm-compressor's in-call seconds (after its imports) against the
        # product's whole process less its start-up, the time that grows with the checkpoint
        theirs = (
            f"{llmc['wall']:>7.2f} {llmc['wall'] / product['wall']:>12.2f}x "
            f"{llmc['seconds'] / (product['wall'] - product['startup']):>14.2f}x "
            f"{product['peak_rss_mib'] / llmc['peak_rss_mib']:>9.2f}x"
            if llmc
            else f"{'-':>7} {'-':>13} {'-':>15} {'-':>10}"
        )
        print(
            f"{scheme:<12} {direct['seconds']:>9.2f} {product['flow']:>7.2f} "
            f"{product['flow'] / direct['seconds']:>11.2f}x {product['startup']:>11.2f} "
            f"{rest:>7.2f} {product['wall']:>10.2f} {theirs} "
            f"{'yes' if r['flow_identical'] else 'NO':>10}"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--schemes", default=DEFAULT_SCHEMES, help="comma-separated presets")
    p.add_argument("--max-workers", type=int, default=1, help="shards quantized at once")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool and scheme (median)")
    p.add_argument("--size-gb", type=float, default=1.6, help="synthetic checkpoint size")
    p.add_argument("--shard-gb", type=float, default=0.4, help="synthetic shard size")
    p.add_argument("--hidden", type=int, default=4096, help="synthetic hidden size")
    p.add_argument("--checkpoint", help="benchmark this checkpoint folder instead")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="MODULE",
        help="passed to both tools (repeatable)",
    )
    p.add_argument("--flow", action="store_true", help="also run `ptqflow quantize` (Prefect)")
    p.add_argument(
        "--observer",
        help="weight observer for both tools, e.g. memoryless_mse, nvfp4_expanded_mse",
    )
    p.add_argument(
        "--llmcompressor-python",
        metavar="PATH",
        help="interpreter with llm-compressor (default: benchmarks/.venv-llmc)",
    )
    p.add_argument("--no-llmcompressor", action="store_true", help="run ptqflow only")
    p.add_argument("--work-dir", help="where outputs go (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    src = checkpoint(a)
    source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    llmc = find_llmcompressor(a)
    cmds = tool_commands(a, llmc)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="ptqflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))
    print(
        f"source {src} ({source_bytes / 1e9:.2f} GB), {usable_cpus()} usable CPUs "
        f"(of {os.cpu_count()}), "
        f"max_workers {a.max_workers}, observer {a.observer or 'min-max'}, "
        f"tools: {', '.join(cmds)}" + (f" ({llmc})" if llmc else " (llm-compressor not found)"),
        flush=True,
    )
    results = {}
    with contextlib.ExitStack() as stack:
        if not a.work_dir:
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        if a.flow and not os.environ.get("PREFECT_API_URL"):
            # as the README advises users: one server kept running, not one per command
            os.environ["PREFECT_API_URL"] = stack.enter_context(server_process())
        for scheme in a.schemes.split(","):
            results[scheme] = run_scheme(scheme, src, work, cmds, a.repeat, source_bytes)
    print_table(results, source_bytes)
    if a.flow:
        print_product(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))


def child_main(argv: list[str]) -> None:
    """`bench.py --child plain|flow SOURCE DEST SCHEME ...`: one run; prints a JSON line.

    `--child compare OURS THEIRS` compares two outputs. Everything that imports
    torch runs in a child: a child's peak RSS (ru_maxrss) starts at its parent's
    RSS when it forks, so the parent stays small.
    """
    if argv[0] == "compare":
        compared, differences = compare(Path(argv[1]), Path(argv[2]))
        print(json.dumps({"compared": compared, "differences": differences}))
        return
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["plain", "flow"])
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("scheme")
    p.add_argument("--max-workers", type=int, default=1)
    p.add_argument("--ignore", action="append", default=[])
    p.add_argument("--observer")
    a = p.parse_args(argv)
    fn = child_plain if a.mode == "plain" else child_flow
    result = fn(a.source, a.dest, a.scheme, a.max_workers, a.ignore, a.observer)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
    else:
        main()
