"""`ptqflow` command line: quantize, dequantize, plan, reindex-fused-weights, verify.

Heavy modules (torch, prefect, compressed-tensors) are imported inside the
commands, so `ptqflow --help` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from tasks.errors import PtqflowError


def _scheme_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--scheme", help="compressed-tensors preset, e.g. FP8_BLOCK, NVFP4A16, W4A16")
    g.add_argument("--config", help="YAML/JSON QuantizationConfig with config_groups")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="MODULE",
        help="module name or 're:' regex to leave unquantized (repeatable)",
    )


def _source_format_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source-format", default="auto",
        choices=("auto", "plain", "fp8-block", "compressed-tensors", "modelopt-nvfp4", "awq"),
        help="how SOURCE stores its weights (default: from config.json's quantization_config)",
    )  # fmt: skip


def _run_args(q: argparse.ArgumentParser) -> None:
    """Options of the commands that run the quantize-checkpoint flow."""
    _source_format_arg(q)
    q.add_argument("--max-workers", type=int, default=1, help="shards processed in parallel")
    q.add_argument(
        "--device", help="cpu, cuda:N or cuda:0,cuda:1,... (default: cuda:0 if present, else cpu)"
    )
    q.add_argument("--overwrite", action="store_true", help="delete what DEST holds first")
    q.add_argument(
        "--task-runner", choices=("threads", "dask"), default="threads",
        help="run shards on threads here, or on Dask workers",
    )  # fmt: skip
    q.add_argument("--dask-address", help="existing Dask scheduler (default: a LocalCluster)")
    q.add_argument(
        "--verify",
        action="store_true",
        help="verify DEST against SOURCE at the end (ptqflow verify)",
    )
    q.add_argument("--revision", help="Hub source: branch, tag or commit (default: main)")
    q.add_argument("--private", action="store_true", help="hf:// DEST: create the repo private")
    q.add_argument("--cache-dir", help="where remote source shards are downloaded")
    q.add_argument(
        "--result-storage", help="folder for cached shard results (default: DEST/.ptqflow)"
    )
    q.add_argument(
        "--max-downloaded", type=int, default=2,
        help="shards downloaded but not yet quantized, at most (bounds disk use)",
    )  # fmt: skip
    q.add_argument(
        "--delete-source", action="store_true",
        help="delete each downloaded source shard once its outputs are stored",
    )  # fmt: skip
    q.add_argument(
        "--include-other-weights",
        action="store_true",
        help="also copy *.bin / *.pth / original/ weight files",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptqflow",
        description="Quantize LLM safetensors checkpoints into compressed-tensors format.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize SOURCE into DEST (flow quantize-checkpoint)")
    q.add_argument("source", help="checkpoint folder, Hub repo id or fsspec URL")
    q.add_argument("dest", help="output folder, hf://org/name or fsspec URL")
    _scheme_args(q)
    _run_args(q)
    q.add_argument(
        "--keep-source-quantization-for-ignored", action="store_true",
        help="pre-quantized SOURCE: ignored layers keep its quantization (mixed-precision "
        "config) instead of becoming BF16",
    )  # fmt: skip
    d = sub.add_parser(
        "dequantize", help="write a pre-quantized SOURCE as a BF16 checkpoint in DEST"
    )
    d.add_argument("source", help="checkpoint folder, Hub repo id or fsspec URL")
    d.add_argument("dest", help="output folder, hf://org/name or fsspec URL")
    _run_args(d)

    p = sub.add_parser("plan", help="dry run: read headers, show what would be done")
    p.add_argument("source")
    p.add_argument("--revision", help="Hub source: branch, tag or commit")
    _scheme_args(p)
    _source_format_arg(p)
    p.add_argument(
        "--keep-source-quantization-for-ignored", action="store_true",
        help="plan ignored layers of a pre-quantized SOURCE in its own quantization",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    r = sub.add_parser(
        "reindex-fused-weights", help="rewrite SOURCE so fused sets (q/k/v, gate/up) share a shard"
    )
    r.add_argument("source")
    r.add_argument("dest")
    r.add_argument("--num-workers", type=int, default=1)
    r.add_argument("--revision", help="Hub source: branch, tag or commit")
    r.add_argument("--cache-dir", help="where remote source shards are downloaded")
    r.add_argument("--overwrite", action="store_true")
    v = sub.add_parser(
        "verify", help="check QUANTIZED against SOURCE: complete, byte-exact, accurate, loadable"
    )
    v.add_argument("source", help="the checkpoint QUANTIZED was made from")
    v.add_argument("quantized", help="ptqflow's output: folder, Hub repo id or fsspec URL")
    v.add_argument(
        "--report", metavar="DIR",
        help="where report.md, tensors.csv and errors.png go "
        "(default: QUANTIZED/.ptqflow/verify, or under PREFECT_HOME for a remote QUANTIZED)",
    )  # fmt: skip
    v.add_argument("--max-workers", type=int, default=1, help="shards checked in parallel")
    v.add_argument("--device", help="where to re-quantize: cpu or cuda:N (default: cuda:0 if any)")
    v.add_argument(
        "--load", action="store_true",
        help="also load both with transformers and compare logits (small models only)",
    )  # fmt: skip
    v.add_argument("--revision", help="Hub SOURCE: branch, tag or commit (default: main)")
    v.add_argument("--cache-dir", help="where remote shards are downloaded")
    sv = sub.add_parser(
        "serve", help="serve the flows as deployments 'quantize' and 'reindex' (no work pool)"
    )
    sv.add_argument("--limit", type=int, default=1, help="flow runs at once")
    return parser


def cmd_serve(a: argparse.Namespace) -> int:
    """flow.serve for users who want the simplest server setup: this process runs the flows."""
    from prefect import serve

    from flows.quantize import quantize_checkpoint
    from flows.reindex import reindex_fused_weights

    serve(
        quantize_checkpoint.to_deployment(name="quantize", tags=["ptqflow"]),
        reindex_fused_weights.to_deployment(name="reindex", tags=["ptqflow"]),
        limit=a.limit,
    )
    return 0


DEQUANTIZE = {"config_groups": {}}  # a config that quantizes nothing: only dequantize


def cmd_quantize(a: argparse.Namespace) -> int:
    from flows.quantize import run_quantize
    from flows.server import prefect_server
    from storage.dest import Dest
    from tasks.planner import plan_checkpoint
    from tasks.schemes import resolve_config

    scheme, config, ignore = (None, DEQUANTIZE, []) if a.command == "dequantize" else (
        a.scheme, a.config, a.ignore)  # fmt: skip
    keep = getattr(a, "keep_source_quantization_for_ignored", False)
    # Check everything that can be checked from headers before Prefect starts.
    plan, _ = plan_checkpoint(
        a.source, resolve_config(scheme, config, ignore), revision=a.revision,
        source_format=a.source_format, keep_source_quantization=keep,
    )  # fmt: skip
    Dest(a.dest).check(plan.source, a.overwrite)
    with prefect_server():
        result = run_quantize(
            max_workers=a.max_workers,
            source=a.source,
            destination=a.dest,
            scheme=scheme,
            config=config,
            ignore=ignore,
            device=a.device,
            overwrite=a.overwrite,
            include_other_weights=a.include_other_weights,
            cache_dir=a.cache_dir,
            result_storage=a.result_storage,
            max_downloaded=a.max_downloaded,
            delete_source=a.delete_source,
            revision=a.revision,
            private=a.private,
            task_runner=a.task_runner,
            dask_address=a.dask_address,
            verify=a.verify,
            source_format=a.source_format,
            keep_source_quantization_for_ignored=keep,
        )
    print_summary(result)
    return 0


def print_summary(result: dict) -> None:
    print(f"{'shard':<40} {'status':>9} {'MB in':>9} {'MB out':>9} {'seconds':>8}")
    for m in result["shards"]:
        status = "cached" if m["cached"] else "quantized"
        print(f"{m['name']:<40} {status:>9} {m.get('bytes_in', 0) / 1e6:>9.1f} "
              f"{m['size'] / 1e6:>9.1f} {m.get('seconds', 0.0):>8.1f}")  # fmt: skip
    print(f"{result['quantized']} quantized, {result['cached']} cached, "
          f"{result['total_size'] / 1e9:.3f} GB in {result['destination']}, "
          f"{result['seconds']:.1f} s")  # fmt: skip


def cmd_plan(a: argparse.Namespace) -> int:
    from tasks.planner import plan_checkpoint
    from tasks.schemes import resolve_config

    plan, report = plan_checkpoint(
        a.source, resolve_config(a.scheme, a.config, a.ignore), strict=False,
        revision=a.revision, source_format=a.source_format,
        keep_source_quantization=a.keep_source_quantization_for_ignored,
    )  # fmt: skip
    if a.json:
        print(
            json.dumps(
                {
                    "source_format": report.source_format,
                    "shards": report.counts,
                    "output_bytes": plan.total_size,
                    "problems": report.problems,
                    "fixes": report.fixes,
                    "suggested_ignore": report.suggestions,
                    "callouts": report.callouts,
                },
                indent=2,
            )
        )
        return 1 if report.problems else 0
    print(f"source format: {report.source_format}")
    print(f"{'shard':<40} {'quantized':>9} {'ignored':>8} {'kept':>6} {'output MB':>10}")
    for s in plan.shards:
        c = report.counts[s.name]
        print(
            f"{s.name:<40} {c['quantized']:>9} {c['ignored']:>8} {c['kept']:>6} "
            f"{s.nbytes / 1e6:>10.1f}"
        )
    print(
        f"predicted output size: {plan.total_size / 1e9:.3f} GB "
        f"({len(plan.shards)} shards, {len(plan.other_files)} other files)"
    )
    for line in report.callouts:
        print(f"note: {line}")
    for line in report.problems:
        print(f"problem: {line}")
    for label, patterns in (
        ("to skip the problems", report.fixes),
        ("usually left unquantized", report.suggestions),
    ):
        if patterns:
            print(f"suggested ({label}): " + " ".join(f"--ignore '{p}'" for p in patterns))
    return 1 if report.problems else 0


def cmd_reindex(a: argparse.Namespace) -> int:
    from flows.reindex import run_reindex
    from flows.server import prefect_server

    with prefect_server():
        result = run_reindex(a.source, a.dest, a.num_workers, overwrite=a.overwrite,
                             revision=a.revision, cache_dir=a.cache_dir)  # fmt: skip
    print(f"wrote {len(result['shards'])} shard(s) to {result['destination']}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from flows.server import prefect_server
    from flows.verify import run_verify
    from storage.source import open_source
    from tasks.verify import check_integrity, open_quantized

    # What makes verification impossible (no SOURCE, no quantization_config) before Prefect.
    check_integrity(open_source(a.source, a.revision), open_quantized(a.quantized))
    with prefect_server():
        result = run_verify(source=a.source, quantized=a.quantized, report_dir=a.report,
                            max_workers=a.max_workers, device=a.device, load=a.load,
                            revision=a.revision, cache_dir=a.cache_dir)  # fmt: skip
    c, worst = result["counts"], result["worst"]
    print(f"verified {result['quantized']}: {c.get('quantized', 0)} quantized, "
          f"{c.get('ignored', 0)} ignored and {c.get('copied', 0)} copied weights, every byte "
          f"as SOURCE gives it; {result['size_in'] / 1e9:.3f} GB -> "
          f"{result['size_out'] / 1e9:.3f} GB")  # fmt: skip
    if worst:
        print(f"worst relative error {worst[0]['rel_error']:.4g} (limit {worst[0]['limit']:.4g})"
              f": {worst[0]['tensor']}")  # fmt: skip
    if result["logits"]:
        print("logits vs SOURCE: " + ", ".join(f"{k} {x:.4g}" for k, x in result["logits"].items()))
    print(f"report: {result['report']}")
    return 0


COMMANDS = {
    "quantize": cmd_quantize,
    "dequantize": cmd_quantize,
    "plan": cmd_plan,
    "reindex-fused-weights": cmd_reindex,
    "serve": cmd_serve,
    "verify": cmd_verify,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        return COMMANDS[args.command](args)
    except PtqflowError as e:
        print(f"ptqflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ptqflow: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def run() -> None:
    """The `ptqflow` command: main(), then exit.

    Everything is frozen out of the garbage collector first, so the
    interpreter's last collections at exit skip the millions of objects that
    torch, transformers and Prefect create on import (about 1 s on 2 cores).
    """
    rc = main()
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    run()
