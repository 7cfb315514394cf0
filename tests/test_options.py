"""Every option described once (flows/options.py): the flows' signatures, Prefect's parameter
schema and the `ptqflow` parser all agree with it; flows run their shards as their
parameters say (num_workers, a list of devices)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import threading
import time
import typing

import pytest

from flows import options
from flows.cli import build_parser
from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint
from tests.helpers import IGNORE, ROOT, files, quantize_folder


def flows():
    from flows.quantize import quantize_checkpoint
    from flows.reindex import reindex_fused_weights
    from flows.verify import verify_checkpoint

    return [
        (quantize_checkpoint, options.QUANTIZE),
        (reindex_fused_weights, options.REINDEX),
        (verify_checkpoint, options.VERIFY),
    ]


def test_flow_signatures_are_the_table():
    for flow, command in flows():
        assert flow.name == command.flow
        signature = inspect.signature(flow.fn)
        assert list(signature.parameters) == [o.name for o in command.params], flow.name
        hints = typing.get_type_hints(flow.fn, include_extras=True)
        for o in command.params:
            p = signature.parameters[o.name]
            want = inspect.Parameter.empty if o.positional else o.default
            assert p.default == want, (flow.name, o.name)
            hint = hints[o.name]
            assert typing.get_origin(hint) is typing.Annotated, (flow.name, o.name)
            (field,) = hint.__metadata__
            assert field.description == o.help, (flow.name, o.name)
            bounds = [m.ge for m in field.metadata if hasattr(m, "ge")]
            assert bounds == ([] if o.minimum is None else [o.minimum]), (flow.name, o.name)
            base = hint.__origin__
            if o.choices:
                assert typing.get_origin(base) is typing.Literal, (flow.name, o.name)
                assert typing.get_args(base) == o.choices, (flow.name, o.name)
                continue
            kinds = set(typing.get_args(base)) if typing.get_origin(base) else {base}
            if o.repeatable:
                assert list[str] in kinds, (flow.name, o.name)
            else:
                assert o.type in kinds, (flow.name, o.name, hint)
            assert (type(None) in kinds) == (o.default is None and not o.positional), o.name


def test_prefect_parameter_schema_is_the_table():
    """What a deployment's form shows and validates: names, defaults, bounds, descriptions."""
    for flow, command in flows():
        schema = flow.parameters
        assert list(schema.properties) == [o.name for o in command.params]
        assert schema.required == [o.name for o in command.params if o.positional]
        for o in command.params:
            prop = schema.properties[o.name]
            assert prop["description"] == o.help, (flow.name, o.name)
            assert prop.get("default") == (None if o.positional else o.default), o.name
            assert prop.get("minimum") == o.minimum, (flow.name, o.name)
            assert tuple(prop.get("enum", ())) == (o.choices or ()), (flow.name, o.name)


def test_prefect_validates_the_bounds_and_choices():
    from prefect.exceptions import ParameterTypeError

    from flows.quantize import quantize_checkpoint
    from flows.reindex import reindex_fused_weights

    given = {"source": "a", "destination": "b"}
    assert reindex_fused_weights.validate_parameters(given) == {
        **given,
        **options.REINDEX.defaults,
    }
    with pytest.raises(ParameterTypeError, match="num_workers"):
        reindex_fused_weights.validate_parameters({**given, "num_workers": 0})
    with pytest.raises(ParameterTypeError, match="source_format"):
        quantize_checkpoint.validate_parameters({**given, "source_format": "gguf"})


REGISTERED = """
import json
from tasks.core.formats import Format

@Format.register("gptq")
class Gptq(Format):
    quant_method, converter, settings = "gptq", "GPTQConverter", ("bits",)
    marker, leaves = "g_idx", frozenset({"qweight", "g_idx"})

from flows.cli import build_parser
from tasks.core.codecs import WEIGHT_QPARAM_LEAVES, detect_format

argv = ["plan", "src", "--scheme", "W4A16", "--source-format", "gptq"]
print(json.dumps([
    build_parser().parse_args(argv).source_format,
    detect_format({"quantization_config": {"quant_method": "gptq"}}, []).name,
    "g_idx" in WEIGHT_QPARAM_LEAVES,
]))
"""


@pytest.mark.slow
def test_a_registered_source_format_reaches_the_cli_and_detection():
    """formats.py is the one place a source format goes: registered there, it is a CLI
    choice, and config.json's quant_method finds it (model_free_ptq's converters: below)."""
    proc = subprocess.run(
        [sys.executable, "-c", REGISTERED], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == ["gptq", "gptq", True]


def test_the_choices_and_converters_are_the_registrys():
    from flows.quantize import CONVERTERS
    from tasks.core.formats import Format

    names = [f.name for f in Format.registered()]
    assert options.SOURCE_FORMATS == ("auto", "plain", *names)
    assert {c: f.name for c, f in CONVERTERS.items()} == {
        "FP8BlockDequantizer": "fp8-block",
        "CompressedTensorsDequantizer": "compressed-tensors",
        "ModelOptNvfp4Converter": "modelopt-nvfp4",
        "AutoAWQConverter": "awq",
    }


def test_the_docs_table_of_source_formats_is_the_registrys():
    from tasks.core.formats import Format

    text = (ROOT / "docs/prequantized.md").read_text()
    rows = [f"| `{f.name}` | {f.detected} | {f.examples} |" for f in Format.registered()]
    assert "\n".join(rows) in text


def test_dequantize_sets_a_subset_of_the_quantize_flow():
    quantize = {o.name: o for o in options.QUANTIZE.params}
    for o in options.DEQUANTIZE.params:
        assert quantize[o.name] == o
    missing = set(quantize) - {o.name for o in options.DEQUANTIZE.params}
    assert missing == {
        "scheme",
        "config",
        "ignore",
        "observer",
        "keep_source_quantization_for_ignored",
        "model_card",  # a BF16 copy keeps SOURCE's card
        "no_model_card",
    }


def some_value(o: options.Option):
    """A value other than the default, and the CLI words that give it."""
    if o.type is bool:
        return True, [o.cli_flag]
    if o.choices:
        value = next(c for c in o.choices if c != o.default)
    elif o.type is int:
        value = (o.default or 0) + 2
    else:
        value = f"x-{o.name}"
    if o.repeatable:
        return [value, "y"], [o.cli_flag, value, o.cli_flag, "y"]
    return value, ([] if o.positional else [o.cli_flag]) + [str(value)]


def base_argv(command: options.Command, without: options.Option) -> list[str]:
    """The required arguments of `command` (positionals, one of each either-or group),
    except `without` and the rest of its group, which the caller gives."""
    argv, groups = [], {without.one_of}
    for o in command.options:
        if o.positional and o is not without:
            argv.append(f"p-{o.name}")
        elif o.one_of and o.one_of not in groups:
            groups.add(o.one_of)
            argv += [o.cli_flag, "FP8_BLOCK"]
    return argv


def test_every_flow_parameter_the_cli_exposes_is_reachable():
    parser = build_parser()
    for command in options.COMMANDS.values():
        if command.flow is None:
            continue
        for o in command.params:
            assert o.cli, o.name  # no flow parameter is hidden from the CLI today
            value, words = some_value(o)
            argv = base_argv(command, without=o)
            if o.positional:  # in its place among the positionals
                argv.insert([p.name for p in command.options if p.positional].index(o.name), *words)
            else:
                argv += words
            got = command.values(parser.parse_args([command.name, *argv]))
            assert list(got) == [p.name for p in command.params]
            assert got[o.name] == value, (command.name, o.name, got)
            # and nothing else moved off its default
            for p in command.params:
                if p is not o and not p.positional and not p.one_of:
                    assert got[p.name] == p.default, (command.name, o.name, p.name)


def test_cli_rejects_what_the_flow_would():
    parser = build_parser()
    for argv in (
        ["reindex-fused-weights", "a", "b", "--num-workers", "0"],
        ["quantize", "a", "b", "--scheme", "W4A16", "--max-workers", "0"],
        ["quantize", "a", "b", "--scheme", "W4A16", "--source-format", "gguf"],
        ["quantize", "a", "b", "--scheme", "W4A16", "--config", "c.yaml"],
        ["quantize", "a", "b"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


HEAVY = ("prefect", "torch", "pydantic", "compressed_tensors", "transformers")


def test_help_imports_neither_prefect_nor_torch():
    script = f"""
import contextlib, io, sys
import flows.cli
flows.cli.build_parser()
for argv in (["--help"], *([c, "--help"] for c in {list(options.COMMANDS)!r})):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            flows.cli.main(argv)
        except SystemExit as e:
            assert e.code == 0, (argv, e.code)
    assert "usage: ptqflow" in out.getvalue(), argv
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    for argv in (["--help"], ["quantize", "--help"]):
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and "usage: ptqflow" in proc.stdout, proc.stderr
        assert time.monotonic() - t0 < 5
    assert "--max-downloaded" in proc.stdout and "--keep-source-quantization" in proc.stdout


# --- the flows run their shards as their parameters say ---------------------------------


@pytest.fixture
def slow_shards(monkeypatch):
    """Each shard holds its device's slot for at least a second, so shards that may run
    together do. Yields what was seen: the most shards quantizing at once, and the names
    of the in-process device limits while they did."""
    import tasks.quantize

    write = tasks.quantize.write_shard
    seen, lock = {"now": 0, "most": 0, "limits": set()}, threading.Lock()

    def slow(*args, **kwargs):
        with lock:
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
            seen["limits"].update(tasks.quantize.LOCAL_LIMITS)
        try:
            time.sleep(1.0)
            return write(*args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(tasks.quantize, "write_shard", slow)
    return seen


@pytest.mark.slow
def test_reindex_copies_num_workers_shards_at_once(tmp_path, prefect_server, slow_shards):
    from flows.reindex import reindex_fused_weights

    src = build_checkpoint(tmp_path / "src", "llama", shards=3)
    summary = reindex_fused_weights(str(src), str(tmp_path / "re"), num_workers=2)
    assert len(summary.shards) == 3
    (name,) = slow_shards["limits"]  # one limit, the CPU's: num_workers slots, all of them used
    assert name.endswith("-cpu") and slow_shards["most"] == 2, slow_shards


def test_device_list_reaches_the_flow():
    from flows.quantize import device_parameter

    assert device_parameter(["cpu", "cpu"]) == "cpu,cpu"
    assert device_parameter(("cuda:0", "cuda:1")) == "cuda:0,cuda:1"
    assert device_parameter("cuda:1") == "cuda:1"
    assert device_parameter(None) is None and device_parameter([]) is None
    import torch

    assert device_parameter([torch.device("cpu"), "cpu"]) == "cpu,cpu"


@pytest.mark.slow
def test_no_device_means_every_visible_gpu_as_llm_compressor(monkeypatch):
    """This machine has no GPU: torch's count is set to what a 2-GPU machine reports."""
    import torch

    from tasks.core.devices import check_devices

    assert check_devices(None) == ["cpu"] == check_devices("")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_devices(None) == ["cuda:0", "cuda:1"]


@pytest.mark.slow  # starts a Prefect server
def test_model_free_ptq_spreads_shards_over_a_device_list(tmp_path, prefect_server, slow_shards):
    """`device=["cpu", "cpu"]` is "cpu,cpu" for the flow: one device named twice, so one
    concurrency limit of max_workers slots, and the same bytes as one device."""
    from flows import model_free_ptq

    src = build_checkpoint(tmp_path / "src", "llama", shards=3)
    summary = model_free_ptq(
        src,
        tmp_path / "out",
        scheme="FP8_DYNAMIC",
        ignore=IGNORE,
        max_workers=2,
        device=["cpu", "cpu"],
    )
    assert summary.quantized == 3
    (name,) = slow_shards["limits"]
    assert name.endswith("-cpu") and slow_shards["most"] == 2, slow_shards
    quantize_folder(src, tmp_path / "want", resolve_config("FP8_DYNAMIC", ignore=IGNORE))
    assert files(tmp_path / "out") == files(tmp_path / "want")
