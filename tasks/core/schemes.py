"""Turn a preset name or a config file into a validated compressed-tensors QuantizationConfig."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

from storage.errors import PtqflowError
from tasks.core.quant.observers import check_observer, warn_alias

__all__ = [
    "KV_CACHE_WARNING",
    "ROTATE",
    "chosen_rotation",
    "data_free_presets",
    "load_config_file",
    "read_config_file",
    "resolve_config",
]

# llm-compressor 0.14's model_free_ptq writes a config's kv_cache_scheme as given, with no scales
KV_CACHE_WARNING = (
    "kv_cache_scheme is written to the config without k_scale/v_scale tensors: model-free "
    "quantization sees no activations to calibrate them, so vLLM uses a scale of 1.0"
)


def data_free_presets() -> list[str]:
    """Preset names of compressed-tensors that need no calibration data."""
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    return [
        name
        for name, args in PRESET_SCHEMES.items()
        if args.get("weights") is not None and _static_activation(args) is None
    ]


def _static_activation(args: dict) -> str | None:
    for key in ("input_activations", "output_activations"):
        act = args.get(key)
        if act is not None and act.dynamic is not True:
            return key
    return None


ROTATE = "rotate"  # ptqflow's own key of a config file or dict: what --rotate says


def chosen_rotation(rotate: str | None, config) -> str:
    """--rotate if given, else the `rotate` key of a config file or dict, else "none"."""
    if rotate not in (None, "none"):
        return rotate
    if isinstance(config, (str, Path)):
        config = read_config_file(config)
    return (config.get(ROTATE) if isinstance(config, dict) else None) or "none"


def load_config_file(path: str | Path):
    """Read a QuantizationConfig from YAML or JSON (a bare config or a config.json)."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    p = Path(path)
    data = {k: v for k, v in read_config_file(p).items() if k != ROTATE}
    try:
        return QuantizationConfig.model_validate(data)
    except ValidationError as e:
        raise PtqflowError(f"config file {p} is not a valid QuantizationConfig:\n{e}") from None


def read_config_file(path: str | Path) -> dict:
    """A config file's QuantizationConfig mapping (with ptqflow's own `rotate`, if set)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PtqflowError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise PtqflowError(f"config file {p} does not parse: {e}") from None
    if isinstance(data, dict) and "quantization_config" in data:
        data = data["quantization_config"]
    if not isinstance(data, dict) or "config_groups" not in data:
        raise PtqflowError(
            f"config file {p} must hold a compressed-tensors QuantizationConfig "
            "(a mapping with config_groups)"
        )
    return {k: v for k, v in data.items() if k not in ("version", "quant_method")}


def resolve_config(scheme=None, config=None, ignore: Iterable[str] = (), observer=None):
    """The QuantizationConfig to apply, from a preset name / scheme or a config.

    `config` may be a QuantizationConfig, a dict, or a path to a YAML/JSON file.
    `observer` names the weight observer of a preset (a config names its own).
    Schemes that need calibration, and observers that need activations, are
    refused here, before any work.
    """
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    if (scheme is None) == (config is None):
        raise PtqflowError("give exactly one of --scheme or --config")
    if observer is not None and config is not None:
        raise PtqflowError(
            "--observer goes with --scheme; with --config, set observer (and observer_kwargs) "
            "in the weights of each config group"
        )
    if scheme is not None:
        if isinstance(scheme, QuantizationScheme):
            name, resolved = "config_group_0", scheme.model_copy(deep=True)
        else:
            name = str(scheme).upper()
            if name not in PRESET_SCHEMES:
                raise PtqflowError(
                    f"unknown scheme {scheme!r}; valid schemes: {', '.join(data_free_presets())}"
                )
            _refuse_calibrated(name, PRESET_SCHEMES[name])
            resolved = preset_name_to_scheme(name, ["Linear"])
        if observer is not None:
            resolved.weights.observer = observer
        config = QuantizationConfig(
            config_groups={name: resolved},
            quantization_status=QuantizationStatus.INITIALIZED,
            ignore=list(ignore),
        )
    else:
        if isinstance(config, (str, Path)):
            config = load_config_file(config)
        elif isinstance(config, dict):
            config = QuantizationConfig.model_validate(
                {k: v for k, v in config.items() if k != ROTATE}
            )
        else:
            config = config.model_copy(deep=True)
        config.ignore = list(config.ignore or []) + list(ignore)
        if config.kv_cache_scheme is not None:
            warnings.warn(KV_CACHE_WARNING, UserWarning, stacklevel=2)
    for group, sch in config.config_groups.items():
        _check_scheme(group, sch)
        _check_patterns(sch.targets, f"config group {group!r}'s targets")
        if sch.format is None and _w4a8_fp8(sch):
            sch.format = "pack-quantized"
    _check_patterns(config.ignore, "--ignore (the config's ignore list)")
    return config


def _w4a8_fp8(scheme) -> bool:
    """INT4 group weights with dynamic FP8 token activations (W4AFP8), which vLLM loads only
    packed (its CompressedTensorsW4A8Fp8 reads weight_packed). compressed-tensors infers
    int-quantized for them, one int8 per value, which vLLM 0.33 refuses; so ptqflow writes
    them pack-quantized, like W4A16 (transformers decompresses either)."""
    w, a = scheme.weights, scheme.input_activations
    return (
        w is not None
        and a is not None
        and (w.type, w.num_bits, w.strategy, w.symmetric) == ("int", 4, "group", True)
        and (a.type, a.num_bits, a.strategy, a.dynamic) == ("float", 8, "token", True)
    )


def _check_patterns(patterns, where: str) -> None:
    """Every 're:' pattern compiles, so a typo is named before any work."""
    for p in patterns or []:
        if isinstance(p, str) and p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise PtqflowError(
                    f"{where}: {p!r} is not a valid regular expression ({e}); "
                    "fix it (after 're:' comes a Python regex) or name the module exactly"
                ) from None


def _refuse_calibrated(name: str, args: dict) -> None:
    if args.get("weights") is None:
        raise PtqflowError(
            f"scheme {name} quantizes nothing; valid schemes: {', '.join(data_free_presets())}"
        )
    which = _static_activation(args)
    if which is not None:
        instead = {"FP8": "FP8_DYNAMIC or FP8_BLOCK", "NVFP4": "NVFP4A16"}.get(
            name, "a weight-only (A16) or dynamic-activation scheme"
        )
        raise PtqflowError(
            f"scheme {name} needs calibrated static {which.replace('_', ' ')} scales, "
            "and model-free quantization has no calibration data. "
            f"Use {instead} instead, or llm-compressor's oneshot with a dataset."
        )


def _check_scheme(group: str, scheme) -> None:
    if scheme.weights is None:
        raise PtqflowError(f"config group {group!r} has no weights scheme; nothing to quantize")
    which = _static_activation(
        {
            "input_activations": scheme.input_activations,
            "output_activations": scheme.output_activations,
        }
    )
    if which is not None:
        raise PtqflowError(
            f"config group {group!r} asks for static {which.replace('_', ' ')}, which "
            "needs calibration data; make them dynamic or drop them"
        )
    weights = scheme.weights
    check_observer(weights, f"config group {group!r}")
    warn_alias(weights.observer)
    if scheme.weights.actorder is not None:
        raise PtqflowError(
            f"config group {group!r} sets actorder, which needs GPTQ calibration; remove it"
        )
    if not scheme.targets:
        raise PtqflowError(
            f"config group {group!r} has an empty targets list; name what it quantizes "
            "(targets: [Linear] for every linear layer)"
        )
