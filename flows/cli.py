"""`ptqflow` command line: quantize, dequantize, plan, reindex-fused-weights, verify, serve.

Every option is described once, in flows/options.py; the parser is built from
it and each command passes `{name: value}` from it to its flow. Heavy modules
(torch, prefect, compressed-tensors) are imported inside the commands, so
`ptqflow --help` answers at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import threading
import traceback

from flows import options
from storage.errors import PtqflowError
from tasks.core.devices import limit_malloc_arenas


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptqflow",
        description="Quantize LLM safetensors checkpoints into compressed-tensors format.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show Python tracebacks (also PTQFLOW_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in options.COMMANDS.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def freeze_and_resume_gc() -> None:
    """Called by each long-running command before its work: `main` starts it without the
    cyclic garbage collector, so imports and checks run without its sweeps over the millions
    of objects that torch, transformers and Prefect create (0.65 s of compressed-tensors' 4.3 s
    import here). What exists now is frozen out of every later collection, which resumes."""
    gc.freeze()
    gc.enable()


def cmd_serve(a: argparse.Namespace) -> int:
    """flow.serve for users who want the simplest server setup: this process runs the flows."""
    from prefect import serve

    from flows.quantize import quantize_checkpoint
    from flows.reindex import reindex_fused_weights
    from flows.verify import verify_checkpoint

    freeze_and_resume_gc()
    serve(
        quantize_checkpoint.to_deployment(name="quantize", tags=["ptqflow"]),
        reindex_fused_weights.to_deployment(name="reindex", tags=["ptqflow"]),
        verify_checkpoint.to_deployment(name="verify", tags=["ptqflow"]),
        limit=a.limit,
    )
    return 0


DEQUANTIZE = {"config_groups": {}}  # a config that quantizes nothing: only dequantize


def cmd_quantize(a: argparse.Namespace) -> int:
    from flows.quantize import run_quantize
    from flows.server import prefect_server
    from storage.dest import open_dest
    from tasks.core.devices import check_devices
    from tasks.plan import plan, planned

    params = options.COMMANDS[a.command].values(a)
    if a.command == "dequantize":
        params["config"] = DEQUANTIZE
    # Check everything that can be checked from headers before Prefect starts.
    check_devices(params["device"])
    # what the flow plans from: its plan task takes the plan made here for the checks
    request = options.plan_request(**params)
    made = plan(request)
    open_dest(params["destination"]).check(made[0].source, params["overwrite"])
    freeze_and_resume_gc()
    with planned(request, made), prefect_server():
        summary = run_quantize(**params)
    print_summary(summary)
    return 0


def print_summary(summary) -> None:
    """The per-shard table of a run's `Summary`, and its totals."""
    print(f"{'shard':<40} {'status':>9} {'MB in':>9} {'MB out':>9} {'seconds':>8}")
    for m in summary.shards:
        status = "cached" if m.cached else "quantized"
        print(
            f"{m.name:<40} {status:>9} {m.bytes_in / 1e6:>9.1f} {m.size / 1e6:>9.1f} "
            f"{m.seconds:>8.1f}"
        )
    print(
        f"{summary.quantized} quantized, {summary.cached} cached, "
        f"{summary.total_size / 1e9:.3f} GB in {summary.destination}, {summary.seconds:.1f} s"
    )
    if summary.serve:
        print(f"serve it with: {summary.serve}")


def cmd_plan(a: argparse.Namespace) -> int:
    from tasks.core.planner import plan_checkpoint

    request = options.plan_request(**options.PLAN.values(a))
    plan, report = plan_checkpoint(request.source, request.config, strict=False, **request.options)
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
                    "notes": report.notes,
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
    for line in report.notes:
        print(f"note: {line}")
    for line in report.callouts:
        print(f"warning: {line}")
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
    from flows.reindex import reindex_fused_weights
    from flows.server import prefect_server

    freeze_and_resume_gc()
    with prefect_server():
        summary = reindex_fused_weights(**options.REINDEX.values(a))
    print(f"wrote {len(summary.shards)} shard(s) to {summary.destination}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from flows.server import prefect_server
    from flows.verify import run_verify
    from storage.source import open_source
    from tasks.core.devices import check_devices
    from tasks.core.verify import check_integrity, open_quantized

    # What makes verification impossible (no SOURCE, no quantization_config) before Prefect.
    check_devices(a.device)
    check_integrity(open_source(a.source, a.revision), open_quantized(a.quantized))
    freeze_and_resume_gc()
    with prefect_server():
        result = run_verify(**options.VERIFY.values(a))
    c = result.counts
    print(
        f"verified {result.quantized}: {c.get('quantized', 0)} quantized, "
        f"{c.get('ignored', 0)} ignored and {c.get('copied', 0)} copied weights, every byte "
        f"as SOURCE gives it; {result.size_in / 1e9:.3f} GB -> {result.size_out / 1e9:.3f} GB"
    )
    if result.worst:
        worst = result.worst[0]
        print(f"worst relative error {worst.rel_error:.4g} (limit {worst.limit:.4g}): {worst.name}")
    if result.logits:
        print("logits vs SOURCE: " + ", ".join(f"{k} {x:.4g}" for k, x in result.logits.items()))
    print(f"report: {result.report}")
    return 0


COMMANDS = {
    "quantize": cmd_quantize,
    "dequantize": cmd_quantize,
    "plan": cmd_plan,
    "reindex-fused-weights": cmd_reindex,
    "serve": cmd_serve,
    "verify": cmd_verify,
}


INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
INTERRUPTED_LINE = "ptqflow: interrupted; run the same command again to resume"
SWALLOWED_AFTER = 5.0  # seconds a KeyboardInterrupt may take to end the command


_interrupted = threading.Event()


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: KeyboardInterrupt, as Python's own handler raises, noted, and a timer that ends
    the process anyway if code on the main thread catches it (seen once in CI: a run went on
    to completion after Ctrl-C). Either way the command ends with INTERRUPTED_LINE and 130."""
    _interrupted.set()
    timer = threading.Timer(SWALLOWED_AFTER, _exit_interrupted)
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def _exit_interrupted() -> None:
    print(INTERRUPTED_LINE, file=sys.stderr, flush=True)
    os._exit(INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_malloc_arenas()  # before any import starts a thread
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.debug:
        os.environ["PTQFLOW_DEBUG"] = "1"
    gc.disable()  # until the command's work starts: see `freeze_and_resume_gc`
    try:
        return COMMANDS[args.command](args)
    except PtqflowError as e:
        if os.environ.get("PTQFLOW_DEBUG") == "1":
            traceback.print_exc()
        print(f"ptqflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        return INTERRUPTED
    finally:
        gc.enable()


def run() -> None:
    """The `ptqflow` command: main(), then exit.

    Everything is frozen out of the garbage collector first, so the
    interpreter's last collections at exit skip the millions of objects that
    torch, transformers and Prefect create on import (about 1 s on 2 cores).
    """
    signal.signal(signal.SIGINT, _on_sigint)
    rc = main()
    gc.freeze()
    if _interrupted.is_set() and rc != INTERRUPTED:  # the interrupt was caught on the way
        _exit_interrupted()
    if rc == INTERRUPTED:  # shards still in flight are not waited for: a rerun redoes them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
