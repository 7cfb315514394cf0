"""The output's model card (its README.md): what was done, how to reproduce it, how to serve it.

A quantized checkpoint published with its source's card would carry the source's metadata
and claims and say nothing of the quantization; the Hub would not link it to its base model.
ptqflow writes a card of its own instead (huggingface_hub's ModelCard): the Hub's metadata
(`base_model`, `base_model_relation: quantized`, the source's license and language, tags
naming the schemes), then what was done, the command that does it again, the sizes, the
result of `--verify`, how to serve it, and the source's own card under a heading of its own.
It holds no timestamp: a resumed or repeated run writes the same bytes. The card is written
last, with config.json (tasks/core/finalize.py); `--model-card FILE` writes the user's own,
`--no-model-card` copies the source's.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from storage.names import README
from storage.source import Folder
from tasks.core.keys import ptqflow_version
from tasks.core.records import Plan
from tasks.core.select import mtp_modules

__all__ = [
    "CardRequest",
    "card_text",
    "check_card",
    "known_scheme_tags",
    "hub_repo",
    "model_ref",
    "scheme_tags",
    "serve_command",
    "speculative_config",
]

# metadata the card carries over from the source card's, as the Hub reads them
CARRIED = ("license", "license_name", "license_link", "language", "pipeline_tag", "library_name")
MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")


@dataclass(frozen=True)
class CardRequest:
    """How a run makes its README.md: ptqflow's card ("card"), the user's own `text`
    ("own", --model-card) or the source's copied ("source", --no-model-card). `command`
    is what reproduces the output, for the card to say."""

    kind: str = "card"
    text: str | None = None
    command: str = ""


def scheme_tags(config_groups: dict) -> list[str]:
    """The Hub tags naming a quantization_config's schemes: fp8, nvfp4, mxfp4, mxfp8,
    w4a16, w8a8, w4afp8, ... (config group name -> scheme mapping, as in config.json)."""
    tags = []
    for group in config_groups.values():
        w, a = group.get("weights") or {}, group.get("input_activations")
        if w.get("type") == "float":
            if w.get("num_bits") == 4:
                tag = "nvfp4" if w.get("group_size") == 16 else "mxfp4"
            else:
                tag = "mxfp8" if w.get("strategy") == "group" else f"fp{w.get('num_bits')}"
        else:
            acts = "16" if not a else ("fp8" if a.get("type") == "float" else str(a["num_bits"]))
            tag = f"w{w.get('num_bits')}a{acts}"
        if tag not in tags:
            tags.append(tag)
    return tags


def known_scheme_tags() -> set[str]:
    """Every tag `scheme_tags` gives a compressed-tensors preset."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    groups = {
        n: preset_name_to_scheme(n, ["Linear"]).model_dump(mode="json")
        for n, args in PRESET_SCHEMES.items()
        if args.get("weights") is not None
    }
    return set(scheme_tags(groups))


def check_card(text: str, quantization_config: dict) -> str | None:
    """What is wrong with a ptqflow model card next to config.json's quantization_config:
    the schemes its tags name must be config.json's. None if right (or not ptqflow's)."""
    from huggingface_hub import ModelCard

    tags = ModelCard(text, ignore_metadata_errors=True).data.get("tags") or []
    if "ptqflow" not in tags:
        return None
    want = scheme_tags(quantization_config.get("config_groups") or {})
    known = known_scheme_tags()
    named = [t for t in tags if t in known]
    if sorted(named) != sorted(want):
        return (
            f"{README} names scheme(s) {', '.join(named) or 'none'}, but config.json's "
            f"quantization_config is {', '.join(want)}; write the card again (rerun quantize)"
        )
    return None


def _describe(name: str, group: dict) -> str:
    """One config group in words: `FP8_BLOCK`: weights float 8-bit, block 128x128, ..."""
    w, a = group["weights"], group.get("input_activations")
    shape = {
        "block": f"blocks of {'x'.join(map(str, w.get('block_structure') or []))}",
        "group": f"groups of {w.get('group_size')}",
        "tensor_group": f"groups of {w.get('group_size')} with a per-tensor scale",
        "channel": "one scale per output channel",
        "tensor": "one scale per tensor",
    }.get(w.get("strategy"), w.get("strategy"))
    sym = "symmetric" if w.get("symmetric", True) else "asymmetric"
    weights = f"{w['type']} {w['num_bits']}-bit weights, {shape}, {sym}"
    observer = w.get("observer") or "minmax"
    acts = "activations unquantized"
    if a:
        per = a.get("strategy")
        per = f"group of {a['group_size']}" if per == "group" else per
        acts = f"activations {a['type']} {a['num_bits']}-bit, dynamic per {per}"
    targets = ", ".join(group.get("targets") or [])
    return (
        f"`{name}` ({group.get('format')}): {weights}; {acts}; observer `{observer}`; "
        f"targets {targets}"
    )


def hub_repo(url: str) -> tuple[str, str | None] | None:
    """(repo id, revision) of an `hf://` URL; None for another."""
    if not url.startswith("hf://"):
        return None
    repo, _, revision = url[len("hf://") :].partition("@")
    return repo, revision or None


def speculative_config(model_config: dict) -> str | None:
    """vLLM's --speculative-config for a checkpoint with MTP layers, else None."""
    text = model_config.get("text_config") or model_config
    if any(text.get(k) for k in MTP_KEYS):
        return json.dumps({"method": "mtp", "num_speculative_tokens": 1})
    return None


def model_ref(dest: str) -> str:
    """What vLLM and transformers load the output at `dest` by: a Hub repo's id, else its path."""
    hub = hub_repo(dest)
    return hub[0] if hub else dest


def serve_command(dest: str, model_config: dict) -> str:
    """The `vllm serve` line for the output at `dest`."""
    line = f"vllm serve {shlex.quote(model_ref(dest))}"
    spec = speculative_config(model_config)
    return f"{line} --speculative-config {shlex.quote(spec)}" if spec else line


def _command(plan: Plan, source: Folder, dest: str, qc: dict) -> str:
    """A `ptqflow quantize` command that writes this output, from the plan and its
    quantization_config alone (for runs that did not come from the command line)."""
    hub = hub_repo(plan.source)
    argv = ["ptqflow", "quantize", hub[0] if hub else source.url, dest, "--config", "config.json"]
    if hub and hub[1]:
        argv += ["--revision", hub[1]]
    if plan.rotation is not None:
        argv += ["--rotate", plan.rotation.kind]
    if plan.source_format is not None:
        argv += ["--source-format", plan.source_format.name]
    config = _pruned({k: qc.get(k) for k in ("config_groups", "ignore", "kv_cache_scheme")})
    return "\n".join(
        [
            "cat > config.json <<'EOF'",
            json.dumps(config, indent=2, sort_keys=True),
            "EOF",
            " ".join(shlex.quote(a) for a in argv),
        ]
    )


def _pruned(value):
    """`value` without its None entries, at every depth."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    return value


def _source_card(source: Folder, files: list[str]):
    from huggingface_hub import ModelCard

    if README not in files:
        return None
    with source.open(README) as f:
        return ModelCard(f.read().decode(errors="replace"), ignore_metadata_errors=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def card_text(
    plan: Plan,
    source: Folder,
    dest: str,
    model_config: dict,
    request: CardRequest,
    verified=None,
) -> str:
    """The README.md of the output at `dest`: ptqflow's card for `plan` (with `verified`,
    a VerifyResult, when --verify ran), or what `request` asks for instead."""
    from compressed_tensors import __version__ as ct_version
    from huggingface_hub import ModelCard, ModelCardData

    if request.kind == "own":
        return request.text
    files = source.files()
    original = _source_card(source, files)
    qc = model_config.get("quantization_config") or {}
    groups = qc.get("config_groups") or {}
    carried = {k: original.data.get(k) for k in CARRIED} if original else {}
    hub = hub_repo(plan.source)
    data = ModelCardData(
        base_model=hub[0] if hub else None,
        base_model_relation="quantized" if hub else None,
        tags=["compressed-tensors", *scheme_tags(groups), "ptqflow"],
        **{k: v for k, v in carried.items() if v},
    )
    name = model_ref(dest).rstrip("/").rpartition("/")[2]
    what = f"[{hub[0]}](https://huggingface.co/{hub[0]})" if hub else f"`{source.url}`"
    lines = [
        f"# {name}",
        "",
        f"{what} quantized by ptqflow, straight from its safetensors files, into the "
        "[compressed-tensors](https://github.com/vllm-project/compressed-tensors) format that "
        "vLLM and transformers load.",
        "",
        "## What was done",
        "",
        *[f"- {_describe(g, s)}" for g, s in groups.items()],
    ]
    modules = {spec.name.rpartition(".")[0] for sh in plan.shards for spec in sh.specs}
    mtp = mtp_modules(model_config, modules)
    if mtp:
        lines.append(
            "- Kept in BF16 for vLLM's multi-token-prediction drafter, which builds them "
            f"unquantized: {', '.join(f'`{m}`' for m in mtp)}."
        )
    if plan.source_format is not None:
        lines.append(
            f"- The source is stored {plan.source_format.name}: its weights were dequantized "
            "in memory and quantized again."
        )
    if plan.rotation is not None:
        lines.append(f"- Rotation: {plan.rotation.callout}.")
    ignore = qc.get("ignore") or []
    if ignore:
        lines += ["- Left unquantized (config.json's `ignore`):", "", "  ```"]
        lines += [f"  {i}" for i in ignore] + ["  ```"]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        request.command or _command(plan, source, dest, qc),
        "```",
        "",
        f"ptqflow {ptqflow_version()}, compressed-tensors {ct_version}"
        + (f", source revision `{hub[1]}`" if hub and hub[1] else "")
        + ".",
        "",
        "## Size",
        "",
        "| tensors | size |",
        "|---|---|",
        f"| source | {_gb(plan.source_size)} |",
        f"| quantized | {_gb(plan.total_size)} ({plan.total_size / plan.source_size:.2f}x) |"
        if plan.source_size
        else f"| quantized | {_gb(plan.total_size)} |",
    ]
    if verified is not None:
        lines += ["", "## Verified", ""]
        lines.append(
            "`ptqflow verify` found it complete (every tensor as planned), exact (every byte "
            "as quantizing the source again gives it) and loadable (the layouts vLLM loads)."
        )
        if verified.by_group:
            lines += ["", "| scheme | worst relative error | limit | weight |", "|---|---|---|---|"]
            lines += [
                f"| {g} | {t.rel_error:.4g} | {t.limit:.4g} | `{t.name}` |"
                for g, t in sorted(verified.by_group.items())
            ]
    lines += [
        "",
        "## Serve",
        "",
        "```bash",
        serve_command(dest, model_config),
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_ref(dest)}", dtype="auto")',
        "```",
    ]
    if original is not None and original.text.strip():
        lines += ["", "## Original model card", "", original.text.strip()]
    body = "\n".join(lines) + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
