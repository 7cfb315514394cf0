"""Run llm-compressor's `model_free_ptq` once and print its timings as one JSON line.

    PYTHON benchmarks/run_llmcompressor.py SOURCE DEST SCHEME [--max-workers N] [--ignore M]
        [--observer NAME]

Runs under llm-compressor's own interpreter (see setup_llmcompressor.sh), so it
imports nothing from ptqflow. Per-stage seconds come from timers wrapped around
the functions `model_free_ptq` calls per shard: loading the shard's tensors
(read), the converter (quantize) and `save_file` (write); with several workers
they are summed over the worker threads.
"""

from __future__ import annotations

import argparse
import json
import threading
import time


def timed(fn, stages: dict, stage: str, lock: threading.Lock):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                stages[stage] += time.perf_counter() - start

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("scheme")
    p.add_argument("--max-workers", type=int, default=1)
    p.add_argument("--ignore", action="append", default=[])
    p.add_argument("--observer", help="weight observer of the preset (as its config group sets it)")
    a = p.parse_args()

    import compressed_tensors
    import llmcompressor
    import llmcompressor.entrypoints.model_free as mf
    from llmcompressor.entrypoints.model_free.converter import ModelFreePtqConverter

    stages = dict.fromkeys(("read", "quantize", "write"), 0.0)
    lock = threading.Lock()
    load = mf.load_tensors_from_inverse_weight_map

    def read(iwm, device="cpu"):
        if str(device) == "meta":  # the validation pass reads headers only
            return load(iwm, device)
        return timed(load, stages, "read", lock)(iwm, device)

    mf.load_tensors_from_inverse_weight_map = read
    mf.save_file = timed(mf.save_file, stages, "write", lock)
    ModelFreePtqConverter.process = timed(ModelFreePtqConverter.process, stages, "quantize", lock)

    scheme = a.scheme
    if a.observer:
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(a.scheme, ["Linear"])
        scheme.weights.observer = a.observer
    start = time.perf_counter()
    mf.model_free_ptq(
        model_stub=a.source,
        save_directory=a.dest,
        scheme=scheme,
        ignore=a.ignore,
        max_workers=a.max_workers,
        device="cpu",
    )
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "stages": stages,
                "version": f"llmcompressor {llmcompressor.__version__}, "
                f"compressed-tensors {compressed_tensors.__version__}",
            }
        )
    )


if __name__ == "__main__":
    main()
