"""Every option of every `ptqflow` command, described once.

A command's options are small typed records (`Option`): the flow parameter it
sets, its CLI flag, its help text, default, type, choices and minimum. The
`ptqflow` parser is built from them (`add_arguments`), the CLI passes
`{name: value}` from them to the flow (`Command.values`), and the flows'
signatures take their descriptions, defaults and bounds from them:

    described, DEFAULTS = QUANTIZE.described, QUANTIZE.defaults

    @flow(name="quantize-checkpoint")
    @QUANTIZE.document
    def quantize_checkpoint(
        max_workers: Annotated[int, described("max_workers")] = DEFAULTS["max_workers"],
        ...

`described` returns a pydantic `Field` (description and bounds, validated on
every run); `document` writes the same descriptions into the docstring's Args
section, where Prefect's deployment parameter schema reads them.

Imported by the CLI: nothing here imports Prefect, pydantic, torch or
compressed-tensors at module level, so `ptqflow --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from storage.errors import PtqflowError
from tasks.core.formats import source_formats

if TYPE_CHECKING:
    from tasks.core.records import PlanRequest

# Choices shared with the flows' Literal types; source formats are registered in formats.py
SOURCE_FORMATS = source_formats()
TASK_RUNNERS = ("threads", "dask")


@dataclass(frozen=True)
class Option:
    """One option: a flow parameter (`name`) and how the CLI sets it.

    `positional` options are CLI arguments (shown as `metavar`), the others
    flags (`flag`, default `--name-with-dashes`). A `bool` option is an on/off
    flag; a `repeatable` one collects every occurrence in a list. Options with
    the same `one_of` form a required either-or group on the CLI. `cli=False`
    keeps a flow parameter off the CLI; `param=False` marks a CLI-only option
    (not a parameter of the command's flow).
    """

    name: str
    help: str
    default: Any = None
    type: type = str
    flag: str | None = None
    positional: bool = False
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    repeatable: bool = False
    one_of: str | None = None
    cli: bool = True
    param: bool = True

    @property
    def required(self) -> bool:
        return self.positional

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def add_to(self, parser) -> None:
        """Add this option to an argparse parser (or group)."""
        if self.positional:
            parser.add_argument(self.name, metavar=self.metavar or self.name, help=self.help)
            return
        kw: dict[str, Any] = {"dest": self.name, "help": self.help}
        if self.type is bool:
            kw["action"] = "store_true"
        else:
            kw["default"] = self.default
            if self.metavar:
                kw["metavar"] = self.metavar
            if self.choices:
                kw["choices"] = self.choices
            if self.type is not str:
                kw["type"] = _at_least(self.minimum) if self.minimum is not None else self.type
            if self.repeatable:
                kw["action"] = "append"
            if self.default not in (None, [], False) and "default" not in self.help:
                kw["help"] = f"{self.help} (default: {self.default})"
        parser.add_argument(self.cli_flag, **kw)


def _at_least(minimum: int):
    def convert(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    convert.__name__ = "int"  # argparse names the type in its error messages
    return convert


@dataclass(frozen=True)
class Command:
    """A `ptqflow` command: its options, and the flow it runs (None: no flow)."""

    name: str
    help: str
    options: tuple[Option, ...]
    flow: str | None = None
    by_name: dict[str, Option] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {o.name: o for o in self.options})
        assert len(self.by_name) == len(self.options), f"{self.name}: an option twice"

    @property
    def params(self) -> tuple[Option, ...]:
        """The options that are parameters of the command's flow, in signature order."""
        return tuple(o for o in self.options if o.param)

    @property
    def defaults(self) -> dict[str, Any]:
        return {o.name: o.default for o in self.params if not o.required}

    def described(self, name: str):
        """A pydantic Field with `name`'s description and bounds, for the flow's signature."""
        from pydantic import Field

        o = self.by_name[name]
        return Field(description=o.help, **({} if o.minimum is None else {"ge": o.minimum}))

    def document(self, fn):
        """Append an Args section describing every parameter to `fn`'s docstring.

        Prefect builds a deployment's parameter descriptions from it (it ignores
        the descriptions of Annotated fields).
        """
        lines = [f"    {o.name}: {' '.join(o.help.split())}" for o in self.params]
        doc = (fn.__doc__ or "").rstrip()
        fn.__doc__ = f"{doc}\n\nArgs:\n" + "\n".join(lines) + "\n"
        return fn

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        groups: dict[str, Any] = {}
        for o in self.options:
            if not o.cli:
                continue
            target = parser
            if o.one_of:
                if o.one_of not in groups:
                    groups[o.one_of] = parser.add_mutually_exclusive_group(required=True)
                target = groups[o.one_of]
            o.add_to(target)

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """The flow's parameters from parsed arguments: `{name: value}`."""
        return {o.name: getattr(args, o.name, o.default) for o in self.params}


def json_object(text: str | None, name: str) -> dict | None:
    """A JSON-object parameter's value, or one clear message naming it."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise PtqflowError(f"{name} is not JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise PtqflowError(
            f'{name} must be a JSON object, like {{"weight_block_size": [128, 128]}}'
        )
    return value


def plan_request(
    source: str,
    scheme: str | None = None,
    config: str | dict | None = None,
    ignore: list[str] | None = None,
    observer: str | None = None,
    rotate: str = "none",
    include_other_weights: bool = False,
    revision: str | None = None,
    source_format: str = "auto",
    source_settings: str | None = None,
    keep_source_quantization_for_ignored: bool = False,
    **run: Any,
) -> PlanRequest:
    """What a command plans from, given its flow's parameters (`run`: the others, which
    change nothing in the plan). The CLI builds it to plan before Prefect starts and hands
    the plan to the flow, which builds an equal one (tasks/plan.py `planned`)."""
    from tasks.core.records import PlanRequest
    from tasks.core.schemes import chosen_rotation, resolve_config

    return PlanRequest(
        source,
        resolve_config(scheme, config, ignore or [], observer),
        include_other_weights,
        revision,
        source_format,
        keep_source_quantization_for_ignored,
        json_object(source_settings, "--source-settings"),
        chosen_rotation(rotate, config),
    )


def reproduce(params: dict[str, Any], revision: str | None) -> str:
    """The `ptqflow quantize` command that writes what a run with the flow's `params` wrote
    (for its model card): the options that decide the output, SOURCE at `revision` (a Hub
    source's commit), and a config given as a file or a dict written out beside it."""
    import shlex

    values = {**params, "revision": revision}
    argv = ["ptqflow", "quantize", params["source"], params["destination"]]
    lines = []
    config = values.get("config")
    if config is not None:
        if isinstance(config, dict):
            name, text = "config.json", json.dumps(config, indent=2, sort_keys=True)
        else:
            from pathlib import Path

            name, text = Path(config).name, Path(config).read_text().rstrip()
        lines += [f"cat > {shlex.quote(name)} <<'EOF'", text, "EOF"]
        values["config"] = name
    by_name = QUANTIZE.by_name
    for key in OUTPUT:
        o, value = by_name[key], values.get(key)
        if value in (None, [], False) or value == o.default:
            continue
        if o.type is bool:
            argv.append(o.cli_flag)
        elif o.repeatable:
            argv += [a for v in value for a in (o.cli_flag, v)]
        else:
            argv += [o.cli_flag, str(value)]
    return "\n".join([*lines, " ".join(shlex.quote(a) for a in argv)])


# --- the options, shared where commands mean the same thing --------------------------------

SOURCE = Option("source", "folder, Hub repo id (org/name) or fsspec URL", positional=True)
DEST = Option(
    "destination", "output folder, hf://org/name or fsspec URL", positional=True, metavar="dest"
)
SCHEME = Option(
    "scheme", "compressed-tensors preset, e.g. FP8_BLOCK, NVFP4A16, W4A16", one_of="scheme"
)
CONFIG = Option(
    "config",
    "QuantizationConfig with config_groups, as a YAML/JSON file (the flow also takes a dict)",
    one_of="scheme",
)
OBSERVER = Option(
    "observer",
    "weight observer of --scheme: memoryless_mse (or mse) or nvfp4_expanded_mse search the "
    "scale that minimizes the error (default: min-max); a --config sets its own",
)
IGNORE = Option(
    "ignore",
    "module name or 're:' regex to leave unquantized (repeatable)",
    repeatable=True,
    metavar="MODULE",
)
SOURCE_FORMAT = Option(
    "source_format",
    "how SOURCE stores its weights (default: from config.json's quantization_config)",
    default="auto",
    choices=SOURCE_FORMATS,
)
SOURCE_SETTINGS = Option(
    "source_settings",
    "JSON object of settings of SOURCE's format that replace its config.json's, e.g. "
    "'{\"weight_block_size\": [128, 128]}' (model_free_ptq takes them from its converter)",
    metavar="JSON",
)
KEEP = Option(
    "keep_source_quantization_for_ignored",
    "pre-quantized SOURCE: ignored layers keep its quantization (mixed-precision config) "
    "instead of becoming BF16",
    default=False,
    type=bool,
)
ROTATE = Option(
    "rotate",
    "rotate the residual stream before quantizing (Hadamard, data-free): norms are folded into "
    "the weights they feed, the rotation into the weights, so the model computes the same "
    "function with no runtime op and its weights quantize with less error (helps INT4 most)",
    default="none",
    choices=("none", "hadamard"),
)
REVISION = Option("revision", "Hub SOURCE: branch, tag or commit (default: main)")
CACHE_DIR = Option("cache_dir", "where remote source shards are downloaded")
OVERWRITE = Option("overwrite", "delete what DEST holds first", default=False, type=bool)
MAX_WORKERS = Option(
    "max_workers", "shards quantizing at once (on the CPU)", default=1, type=int, minimum=1
)
DEVICE = Option("device", "cpu, cuda:N or cuda:0,cuda:1,... (default: every visible GPU, else cpu)")
MODEL_CARD = Option(
    "model_card",
    "write this file as DEST's README.md instead of ptqflow's model card",
    metavar="FILE",
)
NO_MODEL_CARD = Option(
    "no_model_card",
    "copy SOURCE's README.md as it is instead of writing ptqflow's model card",
    default=False,
    type=bool,
)

RUN = (
    SOURCE_FORMAT,
    SOURCE_SETTINGS,
    MAX_WORKERS,
    DEVICE,
    OVERWRITE,
    Option(
        "task_runner",
        "run shards on threads here, or on Dask workers",
        default="threads",
        choices=TASK_RUNNERS,
    ),
    Option("dask_address", "existing Dask scheduler, tcp://HOST:PORT (default: a LocalCluster)"),
    Option(
        "verify", "verify DEST against SOURCE at the end (ptqflow verify)", default=False, type=bool
    ),
    REVISION,
    Option("private", "hf:// DEST: create the repo private", default=False, type=bool),
    CACHE_DIR,
    Option("result_storage", "folder for cached shard results (default: DEST/.ptqflow)"),
    Option(
        "max_downloaded",
        "shards downloaded but not yet quantized, at most (bounds disk use)",
        default=2,
        type=int,
        minimum=1,
    ),
    Option(
        "delete_source",
        "delete each downloaded source shard once its outputs are stored",
        default=False,
        type=bool,
    ),
    Option(
        "include_other_weights",
        "also copy *.bin / *.pth / original/ weight files",
        default=False,
        type=bool,
    ),
)


def _order(options: tuple[Option, ...], names: tuple[str, ...]) -> tuple[Option, ...]:
    by_name = {o.name: o for o in options}
    assert sorted(by_name) == sorted(names), set(by_name) ^ set(names)
    return tuple(by_name[n] for n in names)


# The flow's signature order (the deployment form lists parameters in it).
QUANTIZE_ORDER = (
    "source",
    "destination",
    "scheme",
    "config",
    "ignore",
    "observer",
    "rotate",
    "max_workers",
    "device",
    "overwrite",
    "include_other_weights",
    "cache_dir",
    "result_storage",
    "max_downloaded",
    "delete_source",
    "revision",
    "private",
    "task_runner",
    "dask_address",
    "verify",
    "source_format",
    "source_settings",
    "keep_source_quantization_for_ignored",
    "model_card",
    "no_model_card",
)
# the options that decide what a quantize run writes: its model card repeats them
OUTPUT = (
    "scheme",
    "config",
    "ignore",
    "observer",
    "rotate",
    "include_other_weights",
    "revision",
    "source_format",
    "source_settings",
    "keep_source_quantization_for_ignored",
)

QUANTIZE = Command(
    "quantize",
    "quantize SOURCE into DEST (flow quantize-checkpoint)",
    _order(
        (
            SOURCE,
            DEST,
            SCHEME,
            CONFIG,
            IGNORE,
            OBSERVER,
            ROTATE,
            *RUN,
            KEEP,
            MODEL_CARD,
            NO_MODEL_CARD,
        ),
        QUANTIZE_ORDER,
    ),
    flow="quantize-checkpoint",
)

DEQUANTIZE = Command(
    "dequantize",
    "write a pre-quantized SOURCE as a BF16 checkpoint in DEST",
    tuple(
        o
        for o in QUANTIZE.options
        if o not in (SCHEME, CONFIG, IGNORE, OBSERVER, KEEP, MODEL_CARD, NO_MODEL_CARD)
    ),
    flow="quantize-checkpoint",
)

PLAN = Command(
    "plan",
    "dry run: read headers, show what would be done",
    (
        SOURCE,
        REVISION,
        SCHEME,
        CONFIG,
        IGNORE,
        OBSERVER,
        ROTATE,
        SOURCE_FORMAT,
        SOURCE_SETTINGS,
        replace(KEEP, help="plan ignored layers of a pre-quantized SOURCE in its own quantization"),
        Option("json", "print the report as JSON", default=False, type=bool, param=False),
    ),
)

REINDEX = Command(
    "reindex-fused-weights",
    "rewrite SOURCE so fused sets (q/k/v, gate/up) share a shard",
    (
        SOURCE,
        DEST,
        Option("num_workers", "shards copied at once", default=1, type=int, minimum=1),
        OVERWRITE,
        REVISION,
        CACHE_DIR,
    ),
    flow="reindex-fused-weights",
)

VERIFY = Command(
    "verify",
    "check QUANTIZED against SOURCE: complete, byte-exact, accurate, loadable",
    (
        replace(SOURCE, help="the checkpoint QUANTIZED was made from"),
        Option("quantized", "ptqflow's output: folder, Hub repo id or fsspec URL", positional=True),
        Option(
            "report_dir",
            "where report.md, tensors.csv and errors.png go (default: "
            "QUANTIZED/.ptqflow/verify, or under PREFECT_HOME for a remote QUANTIZED)",
            flag="--report",
            metavar="DIR",
        ),
        replace(MAX_WORKERS, help="shards checked at once"),
        replace(DEVICE, help="where to re-quantize: cpu or cuda:N (default: cuda:0 if any)"),
        Option(
            "load",
            "also load both with transformers and compare logits (small models only)",
            default=False,
            type=bool,
        ),
        REVISION,
        replace(CACHE_DIR, help="where remote shards are downloaded"),
    ),
    flow="verify-checkpoint",
)

SERVE = Command(
    "serve",
    "serve the flows as deployments 'quantize', 'reindex' and 'verify' (no work pool)",
    (Option("limit", "flow runs at once", default=1, type=int, minimum=1, param=False),),
)

COMMANDS = {c.name: c for c in (QUANTIZE, DEQUANTIZE, PLAN, REINDEX, VERIFY, SERVE)}
