"""The report: `write_report` writes report.md, tensors.csv and errors.png; `summary` is
what the flow returns."""

from __future__ import annotations

import csv
import math
import re
from collections import defaultdict
from pathlib import Path

from storage.source import Folder
from tasks.core.verify.records import TensorResult, Verification, VerifyResult

__all__ = [
    "LAYER",
    "default_report_dir",
    "failure_message",
    "plot_errors",
    "render_markdown",
    "summary",
    "worst_rows",
    "write_report",
]

LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def default_report_dir(quantized: Folder) -> Path:
    """QUANTIZED/.ptqflow/verify when local, else a folder under PREFECT_HOME."""
    if quantized.is_local:
        return Path(quantized.root) / ".ptqflow" / "verify"
    from storage.dest import default_state_dir

    return default_state_dir() / "verify" / re.sub(r"[^\w.@-]+", "_", quantized.url)


def _ranked(v: Verification) -> list[TensorResult]:
    """Quantized weights, worst first: by relative error over its limit, NaN first."""
    done = [t for t in v.tensors if t.rel_error is not None]

    def badness(t: TensorResult) -> float:
        return math.inf if math.isnan(t.rel_error) else t.rel_error / (t.limit or 1.0)

    return sorted(done, key=badness, reverse=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def render_markdown(v: Verification, plot: str, worst: int = 20, listed: int = 100) -> str:
    """The Markdown report; `plot` is the line that shows or names the plot."""
    failures = v.failures()
    count = defaultdict(int)
    for t in v.tensors:
        count[t.status] += 1
    lines = [
        f"# ptqflow verify: {'PASSED' if not failures else 'FAILED'}",
        "",
        f"* SOURCE: `{v.source}`",
        f"* QUANTIZED: `{v.quantized}`",
        f"* {len(v.tensors)} source weights: {count['quantized']} quantized, "
        f"{count['ignored']} ignored, {count['copied']} copied",
        f"* size: {_mb(v.size_in)} → {_mb(v.size_out)} "
        f"({v.size_out / v.size_in if v.size_in else 0:.3f}x)",
        f"* {len(failures)} problem(s)",
        "",
        "## Schemes",
        "",
        "| group | format | weights | MB in | MB out | median rel. error | worst rel. error "
        "| min SNR (dB) | limit |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for group, fmt in v.formats.items():
        ts = [t for t in v.tensors if t.group == group]
        if not ts:
            continue
        measured = [t.rel_error for t in ts if t.rel_error is not None]
        errors = sorted(e for e in measured if not math.isnan(e))
        top = math.nan if len(errors) < len(measured) else max(errors, default=math.nan)
        med = f"{errors[len(errors) // 2]:.4g}" if errors else "-"
        snr = f"{-20 * math.log10(top):.1f}" if top > 0 else "-" if math.isnan(top) else "inf"
        top = f"{top:.4g}" if measured else "-"
        limits = sorted({t.limit for t in ts if t.limit is not None})
        lim = f"{limits[0]:.4g}" + (f"–{limits[-1]:.4g}" if len(limits) > 1 else "")
        lines.append(
            f"| {group} | {fmt} | {len(ts)} | {sum(t.bytes_in for t in ts) / 1e6:,.2f} "
            f"| {sum(t.bytes_out for t in ts) / 1e6:,.2f} | {med} | {top} | {snr} | {lim} |"
        )
    lines += [
        "",
        f"## Worst {worst} tensors (relative error over its limit)",
        "",
        "| tensor | group | shape | rel. error | SNR (dB) | limit | of limit | ok |",
        "|---|---|---|--:|--:|--:|--:|---|",
    ]
    for t in _ranked(v)[:worst]:
        lines.append(
            f"| `{t.name}` | {t.group} | {list(t.shape)} | {t.rel_error:.4g} | {t.snr_db:.1f} "
            f"| {t.limit:.4g} | {t.rel_error / t.limit:.0%} | {'no' if t.problems else 'yes'} |"
        )
    if v.logits:
        lines += ["", "## Logits (transformers, QUANTIZED vs SOURCE)", ""]
        lines += [f"* {k.replace('_', ' ')}: {x:.4g}" for k, x in v.logits.items()]
    if failures:
        lines += ["", f"## Problems ({len(failures)})", ""]
        lines += [f"* {p}" for p in failures[:listed]]
        if len(failures) > listed:
            lines.append(f"* … and {len(failures) - listed} more (all in tensors.csv)")
    if v.notes:
        lines += ["", "## Notes", ""] + [f"* {n}" for n in v.notes]
    lines += ["", "## Relative error per layer", "", plot, ""]
    return "\n".join(lines)


def plot_errors(v: Verification, path: Path) -> None:
    """Every quantized weight's relative error by layer: one colour per kind of layer
    (q_proj, down_proj, ...) side by side within a layer, the worst per layer joined by a
    line, failing weights as red crosses, each group's limit dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ts = [t for t in v.tensors if t.rel_error is not None and math.isfinite(t.rel_error)]
    layer = {t.name: int(m[1]) if (m := LAYER.search(t.name)) else None for t in ts}
    other = max((x for x in layer.values() if x is not None), default=-1) + 1
    kind = {t.name: t.name.rpartition(".")[0].rpartition(".")[2] for t in ts}
    kinds = sorted(set(kind.values()))
    fig = Figure(figsize=(11, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()

    def x(t: TensorResult) -> float:
        at = layer[t.name] if layer[t.name] is not None else other
        return at + 0.6 * ((kinds.index(kind[t.name]) + 0.5) / len(kinds) - 0.5)

    for i, k in enumerate(kinds):
        pts = [(x(t), t.rel_error) for t in ts if kind[t.name] == k]
        ax.scatter(*zip(*pts, strict=True), s=12, color=f"C{i % 10}", label=k, alpha=0.8)
    worst: dict[int, float] = defaultdict(float)
    for t in ts:
        at = layer[t.name] if layer[t.name] is not None else other
        worst[at] = max(worst[at], t.rel_error)
    if worst:
        xs = sorted(worst)
        ax.plot(xs, [worst[i] for i in xs], color="black", linewidth=0.8, label="worst")
    bad = [(x(t), t.rel_error) for t in ts if t.problems]
    if bad:
        ax.scatter(*zip(*bad, strict=True), s=60, marker="x", color="red", label="failed")
    for group in v.formats:
        limits = [t.limit for t in ts if t.group == group]
        if limits:
            ax.axhline(max(limits), linestyle="--", linewidth=0.8, color="grey")
            ax.annotate(
                f"{group} limit",
                (0.01, max(limits)),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="grey",
                va="bottom",
            )
    if ts:
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=2, loc="best")
    else:
        ax.text(0.5, 0.5, "nothing quantized", ha="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if any(at is None for at in layer.values()):
        ticks = [int(t) for t in ax.get_xticks() if 0 <= t < other]
        ax.set_xticks([*ticks, other], [*map(str, ticks), "other"])
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error ‖Ŵ − W‖ / ‖W‖")
    status = "PASSED" if v.ok else "FAILED"
    ax.set_title(f"{v.quantized}: {len(ts)} quantized weights, verify {status}", fontsize=9)
    fig.savefig(path, dpi=110)


def write_report(v: Verification, out_dir: Path) -> dict[str, Path]:
    """report.md, tensors.csv (every weight's figures and problems) and errors.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "csv": out_dir / "tensors.csv",
        "plot": out_dir / "errors.png",
    }
    plot_errors(v, paths["plot"])
    paths["markdown"].write_text(render_markdown(v, "![relative error per layer](errors.png)"))
    with open(paths["csv"], "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(
            [
                "tensor",
                "shard",
                "status",
                "group",
                "shape",
                "bytes_in",
                "bytes_out",
                "rel_error",
                "snr_db",
                "limit",
                "problems",
            ]
        )
        for t in v.tensors:
            out.writerow(
                [
                    t.name,
                    t.shard,
                    t.status,
                    t.group or "",
                    "x".join(map(str, t.shape)),
                    t.bytes_in,
                    t.bytes_out,
                    "" if t.rel_error is None else t.rel_error,
                    "" if t.snr_db is None else t.snr_db,
                    "" if t.limit is None else t.limit,
                    " | ".join(t.problems),
                ]
            )
    return paths


def failure_message(v: Verification, report: Path, listed: int = 20) -> str:
    failures = v.failures()
    more = [f"... and {len(failures) - listed} more"] if len(failures) > listed else []
    return (
        f"{v.quantized} failed verification against {v.source}: {len(failures)} problem(s)\n  "
        + "\n  ".join(failures[:listed] + more)
        + f"\nreport: {report}"
    )


def _row(t: TensorResult) -> dict:
    return {
        "tensor": t.name,
        "group": t.group,
        "rel_error": t.rel_error,
        "snr_db": t.snr_db,
        "limit": t.limit,
        "ok": not t.problems,
    }


def worst_rows(v: Verification, n: int) -> list[dict]:
    """The `n` quantized weights with the largest error relative to their limit, as table rows."""
    return [_row(t) for t in _ranked(v)[:n]]


def summary(v: Verification, paths: dict[str, Path]) -> VerifyResult:
    """What the flow returns: counts, sizes, the worst tensors, where the report is, and
    the failure message (None when verify passed)."""
    count = defaultdict(int)
    for t in v.tensors:
        count[t.status] += 1
    ranked = _ranked(v)
    by_group = {}
    for t in ranked:
        by_group.setdefault(t.group, t)
    return VerifyResult(
        ok=v.ok,
        message=None if v.ok else failure_message(v, paths["markdown"]),
        source=v.source,
        quantized=v.quantized,
        counts=dict(count),
        shards=len({t.shard for t in v.tensors}),
        size_in=v.size_in,
        size_out=v.size_out,
        problems=len(v.failures()),
        worst=tuple(ranked[:5]),
        logits=v.logits,
        report=str(paths["markdown"]),
        plot=str(paths["plot"]),
        by_group=by_group,
    )
