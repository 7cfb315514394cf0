"""The `quantize-checkpoint` flow and llm-compressor's `model_free_ptq` entry point.

The flow only wires tasks (tasks/, in pipeline order). Per shard: download ->
quantize -> upload, after the planning task and before finalize. Shards overlap
(shard k quantizes while k+1 downloads and k-1 uploads) on threads or Dask
workers; a per-device concurrency limit bounds quantizing shards and a window
of `max_downloaded` the shards downloaded but not yet quantized.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.options import QUANTIZE, ROTATE, SOURCE_FORMATS, TASK_RUNNERS, plan_request, reproduce
from flows.shards import run_shards
from storage.dest import open_dest
from storage.errors import PtqflowError
from storage.names import CONFIG
from storage.source import Folder
from tasks.core.card import CardRequest, hub_repo, serve_command
from tasks.core.devices import check_devices, limit_malloc_arenas
from tasks.core.formats import CompressedTensors, Format
from tasks.core.records import Summary
from tasks.core.transfer import cache_dir_for
from tasks.finalize import card_task, finalize_task
from tasks.plan import plan_task
from tasks.verify import verify_task

TaskRunnerName = Literal[TASK_RUNNERS]
SourceFormatName = Literal[SOURCE_FORMATS]
RotateName = Literal[ROTATE.choices]
described, DEFAULTS = QUANTIZE.described, QUANTIZE.defaults


@flow(name="quantize-checkpoint")
@QUANTIZE.document
def quantize_checkpoint(
    source: Annotated[str, described("source")],
    destination: Annotated[str, described("destination")],
    scheme: Annotated[str | None, described("scheme")] = DEFAULTS["scheme"],
    config: Annotated[str | dict | None, described("config")] = DEFAULTS["config"],
    ignore: Annotated[list[str] | None, described("ignore")] = DEFAULTS["ignore"],
    observer: Annotated[str | None, described("observer")] = DEFAULTS["observer"],
    rotate: Annotated[RotateName, described("rotate")] = DEFAULTS["rotate"],
    max_workers: Annotated[int, described("max_workers")] = DEFAULTS["max_workers"],
    device: Annotated[str | None, described("device")] = DEFAULTS["device"],
    overwrite: Annotated[bool, described("overwrite")] = DEFAULTS["overwrite"],
    include_other_weights: Annotated[bool, described("include_other_weights")] = DEFAULTS[
        "include_other_weights"
    ],
    cache_dir: Annotated[str | None, described("cache_dir")] = DEFAULTS["cache_dir"],
    result_storage: Annotated[str | None, described("result_storage")] = DEFAULTS["result_storage"],
    max_downloaded: Annotated[int, described("max_downloaded")] = DEFAULTS["max_downloaded"],
    delete_source: Annotated[bool, described("delete_source")] = DEFAULTS["delete_source"],
    revision: Annotated[str | None, described("revision")] = DEFAULTS["revision"],
    private: Annotated[bool, described("private")] = DEFAULTS["private"],
    task_runner: Annotated[TaskRunnerName, described("task_runner")] = DEFAULTS["task_runner"],
    dask_address: Annotated[str | None, described("dask_address")] = DEFAULTS["dask_address"],
    verify: Annotated[bool, described("verify")] = DEFAULTS["verify"],
    source_format: Annotated[SourceFormatName, described("source_format")] = DEFAULTS[
        "source_format"
    ],
    source_settings: Annotated[str | None, described("source_settings")] = DEFAULTS[
        "source_settings"
    ],
    keep_source_quantization_for_ignored: Annotated[
        bool, described("keep_source_quantization_for_ignored")
    ] = DEFAULTS["keep_source_quantization_for_ignored"],
    model_card: Annotated[str | None, described("model_card")] = DEFAULTS["model_card"],
    no_model_card: Annotated[bool, described("no_model_card")] = DEFAULTS["no_model_card"],
) -> Summary:
    """Quantize SOURCE into DESTINATION with a preset `scheme` or a QuantizationConfig.

    SOURCE is a folder, a Hub repo id (at `revision`) or an fsspec URL;
    DESTINATION a folder, `hf://org/name` (created, `private` if asked) or an fsspec URL.
    A pre-quantized SOURCE (FP8 block, compressed-tensors, ModelOpt NVFP4, AutoAWQ)
    is dequantized weight by weight on the way; a config without groups only dequantizes.
    """
    started = time.monotonic()
    limit_malloc_arenas()  # called from Python: before the task threads start
    devices = check_devices(device)
    request = plan_request(
        source,
        scheme,
        config,
        ignore,
        observer,
        rotate=rotate,
        include_other_weights=include_other_weights,
        revision=revision,
        source_format=source_format,
        source_settings=source_settings,
        keep_source_quantization_for_ignored=keep_source_quantization_for_ignored,
    )
    qconfig = request.config
    params = {k: v for k, v in locals().items() if k in QUANTIZE.by_name}  # the flow's own
    card = card_request(params, model_card, no_model_card, bool(qconfig.config_groups))
    plan = plan_task(request)
    if card.kind == "card":  # the command pins a Hub source to the commit it read
        hub = hub_repo(plan.source)
        card = replace(card, command=reproduce(params, hub[1] if hub else revision))
    dest = open_dest(destination, private=private)
    with dest.writing(plan.source, overwrite):
        cache = cache_dir_for(Folder(plan.source), cache_dir)
        ordered = run_shards(
            plan,
            qconfig,
            dest,
            devices=devices,
            max_workers=max_workers,
            max_downloaded=max_downloaded,
            cache_dir=cache,
            result_storage=result_storage,
            delete_source=delete_source,
            task_runner=task_runner,
            dask_address=dask_address,
        )
        finalize_task(plan, plan.source, dest, ordered, card)
    checked = None
    if verify:  # raises naming every failing tensor
        checked = verify_task(
            plan.source, dest.url, max_workers=max_workers, device=devices[0], cache_dir=cache
        )
        card_task(plan, plan.source, dest, card, checked)
    serve = serve_command(dest.url, json.loads(dest.read(CONFIG)))
    get_run_logger().info("serve it with: %s", serve)
    seconds = round(time.monotonic() - started, 1)
    summary = Summary(dest.url, ordered, plan.total_size, seconds, checked, serve)
    _table(summary)
    return summary


def card_request(params: dict, model_card: str | None, no_model_card: bool, quantizes: bool):
    """How the run writes DEST's README.md (tasks/core/card.py): ptqflow's card, the file
    --model-card names, or SOURCE's (--no-model-card, and a run that only dequantizes)."""
    if model_card and no_model_card:
        raise PtqflowError("give --model-card FILE or --no-model-card, not both")
    if model_card:
        try:
            return CardRequest("own", Path(model_card).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise PtqflowError(f"cannot read --model-card {model_card}: {e}") from None
    if no_model_card or not quantizes:
        return CardRequest("source")
    return CardRequest("card")


def _table(summary: Summary) -> None:
    """The per-shard table artifact for the Prefect UI."""
    rows = [
        {
            "shard": m.name,
            "cached": m.cached,
            "bytes_in": m.bytes_in,
            "bytes_out": m.size,
            "seconds": m.seconds,
        }
        for m in summary.shards
    ]
    description = f"{summary.quantized} quantized, {summary.cached} cached"
    create_table_artifact(key="quantize-shards", table=rows, description=description)


def run_quantize(**params) -> Summary:
    """Run the flow (kept as the one place callers go through)."""
    return quantize_checkpoint(**params)


# compressed-tensors converters that llm-compressor's model_free_ptq accepts, by class name: the
# source format ptqflow dequantizes with each, and the settings it carries (config.json's keys)
CONVERTERS = {f.converter: f for f in Format.registered()}
# what ptqflow applies to every source it dequantizes anyway, as compressed-tensors chains them
FOLLOWER = CompressedTensors.converter


def converter_source(converter) -> tuple[str, dict]:
    """The source format and settings of model_free_ptq's `converter`: one converter, or a
    list applied in order, where only a CompressedTensorsDequantizer may follow the first
    (ptqflow dequantizes what AutoAWQ and ModelOpt converters make into compressed-tensors
    with it, as compressed-tensors chains them)."""
    chain = list(converter) if isinstance(converter, (list, tuple)) else [converter]
    names = [type(c).__name__ for c in chain]
    for name in names:
        if name not in CONVERTERS:
            raise PtqflowError(
                f"converter {name} is not supported; ptqflow dequantizes the sources of "
                f"{', '.join(CONVERTERS)} itself (detected from config.json)"
            )
    if not chain or any(n != FOLLOWER for n in names[1:]):
        raise PtqflowError(
            f"converters {names}: give one converter, optionally followed by a {FOLLOWER}"
        )
    fmt = CONVERTERS[names[0]]
    settings = {k: getattr(chain[0], k) for k in fmt.settings}
    return fmt.name, {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def device_parameter(device) -> str | None:
    """model_free_ptq's `device` as the flow's: a name, a torch.device, or a list of them.

    A list spreads shards over every device in it, round-robin ("cuda:0,cuda:1");
    a name listed twice is one device (one concurrency limit); an empty list is the default.
    """
    if device is None:
        return None
    if isinstance(device, (list, tuple)):
        return ",".join(str(d).strip() for d in device) or None
    return str(device)


def model_free_ptq(
    model_stub: str | os.PathLike,
    save_directory: str | os.PathLike,
    scheme=None,
    config=None,
    ignore: Iterable[str] = (),
    max_workers: int = 1,
    device=None,
    converter=None,
    rotate: str = "none",
) -> Summary:
    """Drop-in for llm-compressor's `model_free_ptq`: same arguments, runs `quantize-checkpoint`.

    `scheme` is a preset name (or QuantizationScheme), `config` a QuantizationConfig,
    a dict, or a YAML/JSON file. No `device` means every visible GPU (else the CPU);
    a list spreads shards over all of them. A `converter` of compressed-tensors
    (FP8BlockDequantizer, ...), or a list of them, names the source's format, and its
    settings (weight_block_size, AWQ's bits and group size) replace config.json's.
    `rotate="hadamard"` (ptqflow's own) rotates the residual stream first, as --rotate.

    Example, a DeepSeek-V3 FP8 checkpoint from the Hub to NVFP4 weights, on two GPUs:

        from flows import model_free_ptq

        summary = model_free_ptq(
            "deepseek-ai/DeepSeek-V3",
            "hf://me/DeepSeek-V3-NVFP4A16",
            scheme="NVFP4A16",
            ignore=["lm_head", "re:.*mlp.gate$", "model.embed_tokens"],
            device=["cuda:0", "cuda:1"],
        )
        print(summary.quantized, "shards quantized,", summary.cached, "cached")
    """
    source_format, source_settings = "auto", None
    if converter is not None:
        source_format, source_settings = converter_source(converter)
    if config is not None and not isinstance(config, (str, dict, os.PathLike)):
        config = config.model_dump()
    if scheme is not None and not isinstance(scheme, str):
        config = {"config_groups": {"config_group_0": scheme.model_dump()}}
        scheme = None
    return run_quantize(
        max_workers=max_workers,
        source=str(model_stub),
        destination=str(save_directory),
        scheme=scheme,
        config=str(config) if isinstance(config, os.PathLike) else config,
        ignore=list(ignore),
        device=device_parameter(device),
        source_format=source_format,
        source_settings=json.dumps(source_settings) if source_settings else None,
        rotate=rotate,
    )
