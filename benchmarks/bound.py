"""Which of disk, PCIe and compute bounds quantizing on a device, and how close ptqflow gets.

    python benchmarks/bound.py [--device cuda:0] [--scheme FP8_BLOCK] [--checkpoint DIR]
        [--size-gb 1.6 --shard-gb 0.4 --hidden 4096] [--json FILE]

Measures, on the benchmark checkpoint (built once by make_checkpoint.py, as
bench.py does) or --checkpoint, each stage alone in GB of source per second:
  disk     reading the source files (page cache included, as a run sees them)
           into pinned memory on a GPU, plain memory on the CPU;
  PCIe     copying pinned host memory to the GPU (and results back), GPU only;
  compute  quantize_weights on weights already on the device, one unit at a
           time (bytes of the quantized weights);
then ptqflow's write_shard end to end on every shard (reads, copies and
quantization overlapped on a GPU). The slowest stage is the bound; the
end-to-end figure is printed as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def disk_rate(src: Path, plan, pin: bool) -> float:
    """GB/s reading every source byte the plan reads into one reused (pinned) buffer."""
    import torch

    chunk = 64 << 20
    buf = torch.empty(chunk, dtype=torch.uint8, pin_memory=pin)
    view = memoryview(buf.numpy())
    total, t0 = 0, time.perf_counter()
    for name in sorted({f for s in plan.shards for f in s.files}):
        with open(src / name, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total / (time.perf_counter() - t0) / 1e9


def pcie_rates(device, size: int = 1 << 30, repeat: int = 3) -> tuple[float, float]:
    """GB/s of pinned host -> device and device -> pinned host copies."""
    import torch

    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    rates = []
    for dst, srcbuf in ((dev, host), (host, dev)):
        dst.copy_(srcbuf, non_blocking=True)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeat):
            dst.copy_(srcbuf, non_blocking=True)
        sync(device)
        rates.append(size * repeat / (time.perf_counter() - t0) / 1e9)
    return rates[0], rates[1]


def compute_rate(src: Path, plan, schemes: dict, device) -> float:
    """GB/s of quantize_weights on weights already on `device`, unit by unit."""
    import torch

    from tasks.core.codecs import Codec
    from tasks.core.quant.compress import quantize_weights
    from tasks.core.shard import read_unit

    for scheme in schemes.values():  # numba's start (~0.5 s once per process) is not a rate
        quantize_weights([torch.randn(256, 512).to(torch.bfloat16).to(device)], scheme)
    total, seconds = 0, 0.0
    for shard in plan.shards:
        files = {f: open(src / f, "rb") for f in shard.files}
        codec = Codec(shard.source_format) if shard.source_format else None
        try:
            for unit in shard.units:
                if unit.group is None:
                    continue
                tensors = [t.to(device) for t in read_unit(unit, files, codec, device)]
                if device.type == "cpu":
                    tensors = [t.clone() for t in tensors]  # not timing page faults of the mapping
                sync(device)
                t0 = time.perf_counter()
                states = quantize_weights(tensors, schemes[unit.group])
                sync(device)
                seconds += time.perf_counter() - t0
                total += sum(t.numel() * t.element_size() for t in tensors)
                del states, tensors
        finally:
            for f in files.values():
                f.close()
    return total / seconds / 1e9


def end_to_end(src: Path, plan, schemes: dict, device) -> float:
    """GB/s of write_shard over every shard, as a quantize task runs it."""
    from tasks.core.shard import write_shard

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        for shard in plan.shards:
            write_shard(shard, lambda f: open(src / f, "rb"), Path(out), schemes, device)
        sync(device)
        return source_bytes(plan) / (time.perf_counter() - t0) / 1e9


def source_bytes(plan) -> int:
    return sum(s.bytes_in for s in plan.shards)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--scheme", default="FP8_BLOCK")
    p.add_argument("--checkpoint", help="measure this checkpoint folder instead")
    p.add_argument("--size-gb", type=float, default=1.6)
    p.add_argument("--shard-gb", type=float, default=0.4)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--json", help="also write the figures as JSON")
    a = p.parse_args(argv)

    import torch

    from benchmarks.bench import checkpoint
    from tasks.core.planner import plan_checkpoint
    from tasks.core.schemes import resolve_config

    a.flow = False
    src = checkpoint(a)
    device = torch.device(a.device)
    config = resolve_config(a.scheme)
    plan, _ = plan_checkpoint(str(src), config)
    gpu = device.type == "cuda"
    rates = {"disk": disk_rate(src, plan, pin=gpu)}
    if gpu:
        rates["PCIe"], rates["PCIe back"] = pcie_rates(device)
    rates["compute"] = compute_rate(src, plan, config.config_groups, device)
    rates["end to end"] = end_to_end(src, plan, config.config_groups, device)
    bounds = {k: v for k, v in rates.items() if k in ("disk", "PCIe", "compute")}
    bound = min(bounds, key=bounds.get)
    from tasks.core.devices import usable_cpus

    name = torch.cuda.get_device_name(device) if gpu else f"{usable_cpus()} usable CPUs"
    print(f"{a.scheme} on {device} ({name}), source {source_bytes(plan) / 1e9:.2f} GB ({src.name})")
    for k, v in rates.items():
        print(f"  {k:<11} {v:8.2f} GB/s")
    share = rates["end to end"] / bounds[bound]
    print(f"{bound}-bound: end to end runs at {share:.0%} of the {bound} rate")
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "device": str(device),
                    "name": name,
                    "scheme": a.scheme,
                    "rates": rates,
                    "bound": bound,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
