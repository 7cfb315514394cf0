"""Start-up times: `ptqflow --help`, `ptqflow plan`, and a cached rerun against Prefect's own.

    python benchmarks/startup.py [--repeat 5] [--checkpoint DIR]

The checkpoint is bench.py's synthetic one (1.6 GB, built if missing). It is
quantized once (FP8_BLOCK, untimed); then every command below runs --repeat
times in a fresh process, alternating, and the median is printed:

  help         ptqflow --help
  plan         ptqflow plan SRC --scheme FP8_BLOCK
  import X     python -c "import X": torch; compressed_tensors (which imports torch
               and transformers, whatever is used of it); prefect; all three
  first shard  ptqflow quantize SRC NEW --scheme FP8_BLOCK until its first shard
               file appears in NEW (the run then goes on to the end, untimed)
  prefect      a flow with one task: Prefect's own start-up
  rerun        ptqflow quantize SRC OUT --scheme FP8_BLOCK (every shard cached)

`first shard`, `prefect` and `rerun` run against a Prefect server kept running (one
is started here unless PREFECT_API_URL is set); `prefect` and `rerun` also with no
PREFECT_API_URL, when Prefect starts a temporary server and ptqflow its own.
"""

from __future__ import annotations

import argparse
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
TRIVIAL_FLOW = """
from prefect import flow, task
@task
def one():
    return 1
@flow
def trivial():
    return one()
trivial()
"""


def timed(cmd: list[str], env: dict, first_file_in: Path | None = None) -> float:
    """Seconds `cmd` runs; with `first_file_in`, until a file appears in that new folder."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    seconds = None
    while first_file_in is not None and proc.poll() is None:
        if any(first_file_in.glob("*.safetensors*")):
            seconds = time.perf_counter() - start
            break
        time.sleep(0.01)
    if proc.wait():
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    if first_file_in is not None:
        shutil.rmtree(first_file_in)
    return seconds if seconds is not None else time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--checkpoint", help="default: bench.py's synthetic 1.6 GB checkpoint")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench import checkpoint, parse_args
    from flows.server import prefect_server

    src = str(checkpoint(parse_args(["--checkpoint", a.checkpoint] if a.checkpoint else [])))
    work = Path(tempfile.mkdtemp(prefix="ptqflow-startup-"))
    out = str(work / "out")
    py, cli = sys.executable, [sys.executable, "-m", "flows.cli"]
    quantize = [*cli, "quantize", src, out, "--scheme", "FP8_BLOCK", "--ignore", "lm_head"]
    base = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    base.pop("PREFECT_API_URL", None)
    os.environ.update(base)
    (work / "trivial.py").write_text(TRIVIAL_FLOW)
    with prefect_server() as url:
        running = {**base, "PREFECT_API_URL": url}
        subprocess.run(quantize, cwd=ROOT, env=running, check=True, capture_output=True)
        new = work / "new"
        first = [*cli, "quantize", src, str(new), "--scheme", "FP8_BLOCK", "--ignore", "lm_head"]
        commands = {
            "help": ([*cli, "--help"], base),
            "plan": ([*cli, "plan", src, "--scheme", "FP8_BLOCK"], base),
            "import torch": ([py, "-c", "import torch"], base),
            "import compressed_tensors": ([py, "-c", "import compressed_tensors"], base),
            "import prefect": ([py, "-c", "import prefect"], base),
            "imports": ([py, "-c", "import prefect, torch, compressed_tensors"], base),
            "first shard, running server": (first, running, new),
            "prefect, running server": ([py, str(work / "trivial.py")], running),
            "rerun, running server": (quantize, running),
            "prefect, temporary server": ([py, str(work / "trivial.py")], base),
            "rerun, own server": (quantize, base),
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(a.repeat):
            for name, (cmd, env, *folder) in commands.items():
                times[name].append(timed(cmd, env, *folder))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'command':<30} {'median s':>9}   runs")
    for name, values in times.items():
        print(f"{name:<30} {med[name]:>9.2f}   {' '.join(f'{x:.2f}' for x in values)}")
    for mode, prefect in (
        ("running server", "prefect, running server"),
        ("own server", "prefect, temporary server"),
    ):
        rerun = "rerun, running server" if mode == "running server" else "rerun, own server"
        print(f"cached rerun beyond Prefect's start-up ({mode}): {med[rerun] - med[prefect]:.2f} s")


if __name__ == "__main__":
    main()
