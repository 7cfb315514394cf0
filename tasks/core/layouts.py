"""Weights not stored as one [out, in] matrix per layer, and how each is cut into those.

Most checkpoints store every expert's projections as 2-D weights of their own
(`mlp.experts.3.gate_proj.weight`), the layout a Linear has. Some architectures store one
projection of all experts in a single 3-D tensor, each in its own layout:

* transformers 5's fused experts (`mlp.experts.gate_up_proj` [E, 2I, H], gate rows first;
  `down_proj` [E, H, I]), for the model types whose transformers conversion merges per-expert
  weights into them: those of Qwen-MoE, DeepSeek, GLM-4.5, Mixtral, ... Their layout is read
  from transformers' own conversion, and the per-expert names from its source patterns.
* gpt-oss: `gate_up_proj` [E, H, 2I], inputs first, gate and up columns interleaved
  (g0, u0, g1, u1, ...), `down_proj` [E, I, H], and biases `gate_up_proj_bias` [E, 2I]
  (kept as they are: vLLM reads them so).
* Llama-4: `gate_up_proj` [E, H, 2I], inputs first, gate columns then up, `down_proj` [E, I, H].
* GraniteMoE (and its shared and hybrid variants): `input_linear.weight` [E, 2I, H], gate rows
  first, and `output_linear.weight` [E, H, I].

A layout is taken only from what the architecture is known to store, and checked against
config.json's sizes; a 3-D tensor of another model type is never split (see `split`). Each
expert's weights get the names vLLM's loader of that architecture reads from a
compressed-tensors checkpoint: per-expert Linear names, except for gpt-oss, whose loader reads
`experts.N.w13_weight_packed` (gate and up rows left interleaved, its activation expects them
so) and `experts.N.w2_*`, only for packed integer weights, and no `weight_shape`
(vllm/model_executor/models/gpt_oss.py, `_GPT_OSS_STREAMED_EXPERT_SUFFIX_TO_SHARD`).

GPT-2 keeps its Conv1D weights [in, out]; they are never quantized as if they were [out, in].
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.errors import PtqflowError
from tasks.core.records import View

__all__ = ["Cut", "Layout", "expert_count", "inputs_first_2d", "layout_of", "model_type", "split"]

# config.json keys that hold the number of routed experts, by architecture
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Part:
    """One expert's weight in a 3-D tensor: its name (`{e}` the expert) replacing the tensor's
    suffix, and the prefix its compressed tensors get when the loader names them otherwise."""

    name: str
    out: str | None = None


@dataclass(frozen=True)
class Layout:
    """How one architecture stores one projection of every expert in a 3-D tensor.

    `parts` lie along the output axis in this order; the tensor is [E, out, in], or
    [E, in, out] with `inputs_first`. `shape` names the config
    sizes of its last two axes ("2*intermediate_size"); None checks only the hidden size.
    `reads`, if set, are the only compressed tensors the architecture's vLLM loader reads
    for these experts (a scheme with others keeps the tensor in the source's dtype), and
    `skip` those it creates but cannot load, which are left out.
    """

    tensor: str
    parts: tuple[Part, ...]
    inputs_first: bool = False
    shape: tuple[str, str] | None = None
    reads: tuple[str, ...] | None = None
    skip: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cut:
    """One expert's weight cut from a 3-D tensor viewed as [E * A, B]: rows `start:stop`,
    then `view` (columns, transposition) when its values are not those contiguous rows."""

    name: str
    start: int
    stop: int
    view: View | None = None
    out: str | None = None
    layout: Layout | None = None


def _gpt_oss() -> tuple[Layout, ...]:
    packed = ("weight_packed", "weight_scale")  # integer weights: W4A16, W8A16
    return (
        Layout(
            "mlp.experts.gate_up_proj",
            (Part("mlp.experts.{e}.gate_up_proj.weight", "mlp.experts.{e}.w13_"),),
            inputs_first=True,
            shape=("hidden_size", "2*intermediate_size"),
            reads=packed,
            skip=("weight_shape",),
        ),
        Layout(
            "mlp.experts.down_proj",
            (Part("mlp.experts.{e}.down_proj.weight", "mlp.experts.{e}.w2_"),),
            inputs_first=True,
            shape=("intermediate_size", "hidden_size"),
            reads=packed,
            skip=("weight_shape",),
        ),
    )


def _llama4() -> tuple[Layout, ...]:
    experts = "feed_forward.experts"
    return (
        Layout(
            f"{experts}.gate_up_proj",
            (Part(f"{experts}.{{e}}.gate_proj.weight"), Part(f"{experts}.{{e}}.up_proj.weight")),
            inputs_first=True,
            shape=("hidden_size", "2*intermediate_size"),
        ),
        Layout(
            f"{experts}.down_proj",
            (Part(f"{experts}.{{e}}.down_proj.weight"),),
            inputs_first=True,
            shape=("intermediate_size", "hidden_size"),
        ),
    )


def _granite() -> tuple[Layout, ...]:
    experts = "block_sparse_moe.experts"
    return (
        Layout(
            "block_sparse_moe.input_linear.weight",
            (Part(f"{experts}.{{e}}.gate_proj.weight"), Part(f"{experts}.{{e}}.up_proj.weight")),
            shape=("2*intermediate_size", "hidden_size"),
        ),
        Layout(
            "block_sparse_moe.output_linear.weight",
            (Part(f"{experts}.{{e}}.down_proj.weight"),),
            shape=("hidden_size", "intermediate_size"),
        ),
    )


# Layouts read from each architecture's modeling code (transformers' and vLLM's), by model type
LAYOUTS = {
    "gpt_oss": _gpt_oss(),
    "llama4": _llama4(),
    "llama4_text": _llama4(),
    "granitemoe": _granite(),
    "granitemoeshared": _granite(),
    "granitemoehybrid": _granite(),
}

# Layers stored [in, out] (GPT-2's Conv1D) by model type: a scheme would quantize them along
# the wrong axis, and vLLM transposes only their unquantized `weight`
INPUTS_FIRST_2D = {"gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def model_type(model_config: dict) -> str | None:
    """config.json's model type (of the text model, for a multimodal config)."""
    text = model_config.get("text_config")
    if isinstance(text, dict) and text.get("model_type"):
        return text["model_type"]
    return model_config.get("model_type")


def _text(model_config: dict) -> dict:
    text = model_config.get("text_config")
    return {**model_config, **text} if isinstance(text, dict) else model_config


def expert_count(model_config: dict) -> int | None:
    config = _text(model_config)
    for key in EXPERT_COUNT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 1:
            return config[key]
    return None


def _from_transformers(kind: str) -> tuple[Layout, ...]:
    """The fused-expert layouts transformers' checkpoint conversion of `kind` defines: per-expert
    [out, in] weights stacked on a new first axis, several concatenated along the output axis."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
    except ImportError:  # transformers < 5: no conversions, no fused experts it knows
        return ()
    layouts = []
    for conv in get_checkpoint_conversion_mapping(kind) or ():
        if not isinstance(conv, WeightConverter) or len(conv.target_patterns) != 1:
            continue
        (target,) = conv.target_patterns
        ops = [(type(op), getattr(op, "dim", None)) for op in conv.operations]
        stacked = [(MergeModulelist, 0)] + (
            [(Concatenate, 1)] if len(conv.source_patterns) > 1 else []
        )
        sources = conv.source_patterns
        if ops != stacked or not all(s.count("*") == 1 for s in sources):
            continue
        parts = tuple(Part(s.lstrip(".").replace("*", "{e}")) for s in sources)
        layouts.append(Layout(target.lstrip("."), parts))
    return tuple(layouts)


def layout_of(model_config: dict, name: str) -> Layout | None:
    """The layout `name` is stored in, if it is a 3-D fused expert tensor of a known layout."""
    kind = model_type(model_config)
    if kind is None:
        return None
    layouts = LAYOUTS.get(kind) or _from_transformers(kind)
    found = [lay for lay in layouts if name == lay.tensor or name.endswith("." + lay.tensor)]
    return found[0] if len(found) == 1 else None


def _size(config: dict, key: str) -> int | None:
    times, _, key = key.rpartition("*")
    value = config.get(key)
    return value * int(times or 1) if isinstance(value, int) else None


def split(model_config: dict, name: str, shape: tuple[int, ...]) -> list[Cut] | None:
    """Each expert's weights in the 3-D tensor `name`, or None if it is not one of a known layout.

    Raises naming the tensor when its shape is not the one config.json gives its layout:
    a guess along the wrong axis would give weights of the right shape and wrong values.
    """
    layout = layout_of(model_config, name)
    if layout is None or len(shape) != 3:
        return None
    config = _text(model_config)
    experts, a, b = shape
    hidden = config.get("hidden_size")
    if layout.shape is not None:
        want = (expert_count(model_config), *(_size(config, k) for k in layout.shape))
        sizes = "experts, " + ", ".join(layout.shape)
    else:  # transformers' layout: [E, out, in] with the hidden size as in (gate/up) or out (down)
        want = (experts, a, hidden) if b == hidden else (experts, hidden, b)
        sizes = "hidden_size"
    if tuple(shape) != want or (layout.shape is None and hidden not in (a, b)):
        raise PtqflowError(
            f"{name} has shape {list(shape)}, but config.json's {sizes} give "
            f"{[w if w is not None else '?' for w in want]} for how {model_type(model_config)} "
            "stores its experts; ptqflow will not guess how to split it. Check config.json, "
            "or keep it as it is with --ignore for its experts"
        )
    prefix = name[: -len(layout.tensor)]
    rows, cols = (b, a) if layout.inputs_first else (a, b)  # out, in of the whole tensor
    count = len(layout.parts)
    if rows % count:
        raise PtqflowError(f"{name} {list(shape)}: {rows} outputs do not split into {count}")
    per = rows // count
    cuts = []
    for e in range(experts):
        for i, part in enumerate(layout.parts):
            out = None if part.out is None else prefix + part.out.format(e=e)
            cut_name = prefix + part.name.format(e=e)
            if layout.inputs_first:  # the expert's [in, out] rows, its columns transposed
                view = View(i * per, (i + 1) * per, transpose=True)
                cuts.append(Cut(cut_name, e * a, (e + 1) * a, view, out, layout))
            else:
                start = e * a + i * per
                cuts.append(Cut(cut_name, start, start + per, None, out, layout))
    return cuts


def inputs_first_2d(model_config: dict, module: str) -> bool:
    """Whether `module`'s 2-D weight is stored [in, out] (GPT-2's Conv1D)."""
    leaves = INPUTS_FIRST_2D.get(model_type(model_config) or "", ())
    return any(module.endswith("." + leaf) for leaf in leaves)
