"""Load checkpoints with vLLM's own loader, on a machine without a GPU, and say what it refused.

Run with the vLLM environment's Python (benchmarks/setup_vllm.sh):

    benchmarks/.venv-vllm/bin/python benchmarks/vllm_load.py CHECKPOINT [CHECKPOINT ...]

For each checkpoint it prints one JSON line: for the main model and, when
config.json has multi-token-prediction layers, for the MTP drafter that
speculative decoding builds (`--speculative-config '{"method": "mtp"}'`):

- `rejected`: checkpoint tensors whose loading raised (no parameter of that
  name, or a weight loader's shape check), each with the error;
- `unwritten`: parameters no tensor wrote (they keep a sentinel filled in
  before loading), except those vLLM itself lets a checkpoint leave out:
  KV-cache scales, empty placeholders, activation scales of weight-only
  (A16) schemes, and the experts' weight_shape, which vLLM never reads;
- `error`: what stopped the model from being built, if anything.

It also reports `config`: whether this environment's compressed-tensors (the
version vLLM pins) parses the checkpoint's quantization_config, with its version.

How (measured in ../shared/notes/vllm-0.33-cpu-loading.md): VLLM_TARGET_DEVICE=cpu
picks vLLM's CPU platform; models are built and loaded by its DefaultModelLoader
without `process_weights_after_loading`, which repacks weights for GPU kernels.
Where a quantization method finds no CPU kernel while creating its parameters,
its kernel chooser is asked again with the hardware gate open: which
parameters exist does not depend on the kernel.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch  # noqa: E402

SENTINEL_BYTE = 0xA5
# activation scales a weight-only (A16) method registers and vLLM does not require
ACTIVATION_SCALES = ("input_scale", "input_global_scale", "input_zero_point")
# what vLLM's MoE methods register and never read (no use but loading, vLLM 0.33), and
# gpt-oss's loader cannot load: a checkpoint may leave them out
UNREAD = ("w13_weight_shape", "w2_weight_shape")
MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers")


def main(folders: list[str]) -> None:
    _start_distributed()
    _open_kernel_gates()
    for folder in folders:
        print(json.dumps({"checkpoint": folder, **load(folder)}), flush=True)


def load(folder: str) -> dict:
    """{"config": ..., "main": report, "drafter": report (when config.json has MTP layers)}."""
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    reports = {"config": _parse(config.get("quantization_config"))}
    mtp = any(config.get(k) for k in MTP_KEYS)
    args = EngineArgs(
        model=folder,
        dtype="bfloat16",
        tensor_parallel_size=1,
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=256,
        speculative_config={"method": "mtp", "num_speculative_tokens": 1} if mtp else None,
    )
    try:
        vllm_config = args.create_engine_config()
    except Exception as e:  # noqa: BLE001 - the report says what vLLM said
        return {**reports, "main": {"error": _error(e), "rejected": {}, "unwritten": []}}
    weight_only = _weight_only(config.get("quantization_config") or {})
    with set_current_vllm_config(vllm_config):
        reports["main"] = _load_one(vllm_config, vllm_config.model_config, weight_only)
        if mtp:
            draft = vllm_config.speculative_config.draft_model_config
            reports["drafter"] = _load_one(vllm_config, draft, weight_only)
    return reports


def _load_one(vllm_config, model_config, weight_only: bool) -> dict:
    """Build the model, fill it with the sentinel, load every tensor; retry without rejected."""
    from vllm.model_executor.model_loader import get_model_loader

    loader = get_model_loader(vllm_config.load_config)
    rejected: dict[str, str] = {}
    while True:
        vllm_config.compilation_config.static_forward_context.clear()  # a rebuild's layer names
        try:
            with torch.device("cpu"):
                model = loader.create_model(vllm_config=vllm_config, model_config=model_config)
        except Exception as e:  # noqa: BLE001
            return {"error": _error(e), "rejected": rejected, "unwritten": []}
        _fill(model)
        current, seen = [], {}

        def tensors(current=current, seen=seen, model=model):
            for name, tensor in loader.get_all_weights(model_config, model):
                if name in rejected:
                    continue
                current[:] = [name]
                seen[name] = tensor.dtype
                yield name, tensor

        try:
            model.load_weights(tensors())
        except Exception as e:  # noqa: BLE001
            if not current or current[0] in rejected or len(rejected) > 200:
                return {"error": _error(e), "rejected": rejected, "unwritten": []}
            rejected[current[0]] = _error(e)
            continue
        rejected.update(_dropped(model, seen))
        return {"error": None, "rejected": rejected, "unwritten": _unwritten(model, weight_only)}


def _dropped(model: torch.nn.Module, seen: dict[str, torch.dtype]) -> dict[str, str]:
    """Quantized tensors for a layer vLLM built unquantized: some loaders skip or cast them
    without a word (GLM-4.5's MTP drafter loads an FP8 eh_proj into its BF16 Linear)."""
    out = {}
    for name, dtype in seen.items():
        module_name, _, leaf = name.rpartition(".")
        quantized = leaf != "weight" and leaf.startswith("weight_")
        quantized |= leaf == "weight" and not (dtype.is_floating_point and dtype.itemsize > 1)
        if not quantized:
            continue
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        method = type(getattr(module, "quant_method", None)).__name__
        if method == "NoneType" or method.startswith("Unquantized"):
            out[name] = f"a quantized tensor ({dtype}) for a layer vLLM builds unquantized"
    return out


def _fill(model: torch.nn.Module) -> None:
    """NaN in every floating parameter, 0xA5 bytes in every other one."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point and p.element_size() > 1:
                p.fill_(float("nan"))
            else:
                p.view(torch.uint8).fill_(SENTINEL_BYTE) if p.numel() else None


def _unwritten(model: torch.nn.Module, weight_only: bool) -> list[str]:
    from vllm.model_executor.layers.quantization.kv_cache import BaseKVCacheMethod

    out = []
    for module_name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, BaseKVCacheMethod):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.numel() == 0 or (weight_only and name.endswith(ACTIVATION_SCALES)):
                continue
            if name in UNREAD:
                continue
            if p.dtype.is_floating_point and p.element_size() > 1:
                untouched = bool(torch.isnan(p).all())
            else:
                untouched = bool((p.view(torch.uint8) == SENTINEL_BYTE).all())
            if untouched:
                out.append(f"{module_name}.{name}" if module_name else name)
    return sorted(out)


def _parse(quantization_config: dict | None) -> dict:
    """Whether compressed-tensors' QuantizationConfig of this environment parses it."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    version, error = compressed_tensors.__version__, None
    if quantization_config is not None:
        fields = {
            k: v for k, v in quantization_config.items() if k not in ("version", "quant_method")
        }
        try:
            QuantizationConfig.model_validate(fields)
        except Exception as e:  # noqa: BLE001
            error = _error(e)
    return {"compressed_tensors": version, "error": error}


def _weight_only(quantization_config: dict) -> bool:
    groups = (quantization_config.get("config_groups") or {}).values()
    return bool(groups) and all(not g.get("input_activations") for g in groups)


def _error(e: BaseException) -> str:
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({os.path.basename(last.filename)}:{last.lineno})" if last else ""
    return f"{type(e).__name__}: {e}"[:3000] + where


def _start_distributed() -> None:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{port}",
        )
        initialize_model_parallel(1, 1)


def _open_kernel_gates() -> None:
    """Let quantization methods pick GPU kernels here: each linear kernel table's CPU list gets
    the CUDA kernels after its own, and every kernel class says it is supported on this
    hardware (its can_implement still decides). Parameters do not depend on the kernel.

    The platform reports compute capability 9.0 (H100/H200), where vLLM picks the
    compressed-tensors scheme of a layer from the capability (W4AFP8 needs exactly 9.0)."""
    import vllm.model_executor.kernels.linear as linear
    from vllm.platforms import PlatformEnum, current_platform
    from vllm.platforms.interface import DeviceCapability

    current_platform.get_device_capability = lambda device_id=0: DeviceCapability(9, 0)

    def supported(cls, *args, **kwargs):
        return True, None

    for name, value in vars(linear).items():
        if name.startswith("_POSSIBLE_") and isinstance(value, dict):
            cuda = value.get(PlatformEnum.CUDA, [])
            value[PlatformEnum.CPU] = list(dict.fromkeys([*value.get(PlatformEnum.CPU, []), *cuda]))
    kernels = {
        kernel
        for value in vars(linear).values()
        if isinstance(value, type) and hasattr(value, "can_implement")
        for kernel in (value, *_subclasses(value))
    }
    for kernel in kernels:
        if hasattr(kernel, "is_supported"):
            kernel.is_supported = classmethod(supported)
        if "can_implement" in vars(kernel):
            kernel.can_implement = _as_cuda(kernel.can_implement, current_platform)
    # MoE experts kernels are chosen in a FusedMoE method's __init__, by the same kind of gate
    import vllm.model_executor.layers.fused_moe.modular_kernel as mk

    check = mk.FusedMoEExperts.is_supported_config

    def any_device(cls, *args, **kwargs):
        cls._supports_current_device = staticmethod(lambda: True)
        return check(cls, *args, **kwargs)

    mk.FusedMoEExperts.is_supported_config = any_device
    # and where a CPU list of MoE backends cannot serve a model (WNA16 with DeepSeek-V3's
    # routing), the GPU list follows it
    import importlib
    import pkgutil

    import vllm.model_executor.layers.fused_moe.oracle as oracle

    for info in pkgutil.iter_modules(oracle.__path__):
        module = importlib.import_module(f"{oracle.__name__}.{info.name}")
        if hasattr(module, "_get_priority_backends"):
            priority = module._get_priority_backends
            module._get_priority_backends = _then_gpu(priority, current_platform)


def _as_cuda(can_implement, platform):
    """can_implement asked as on CUDA: many kernels refuse any other platform there."""

    def check(*args, **kwargs):
        platform.is_cuda = platform.is_cuda_alike = lambda: True
        try:
            return can_implement(*args, **kwargs)
        finally:
            del platform.is_cuda, platform.is_cuda_alike

    return classmethod(lambda cls, *args, **kwargs: check(*args, **kwargs))


def _then_gpu(priority, platform):
    def backends(*args, **kwargs):
        cpu = priority(*args, **kwargs)
        platform.is_cpu = lambda: False
        platform.is_cuda = platform.is_cuda_alike = lambda: True
        try:
            return list(dict.fromkeys([*cpu, *priority(*args, **kwargs)]))
        finally:
            del platform.is_cpu, platform.is_cuda, platform.is_cuda_alike

    return backends


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
