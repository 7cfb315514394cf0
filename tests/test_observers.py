"""MSE observers: llm-compressor 0.14's grid search, byte for byte, in every scheme it applies to.

The yardstick is tests/reference.py's `mse_min_max`, written from the
algorithm one step at a time over the whole weight with compressed-tensors'
own fake_quantize; benchmarks/bench.py --observer compares against
llm-compressor itself.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from storage.errors import PtqflowError
from tasks.core.quant import compress, observers
from tasks.core.quant.compress import quantize_weights
from tasks.core.quant.kinds import kind_of
from tasks.core.schemes import resolve_config
from tests.checkpoints import build_checkpoint, load_tensors
from tests.helpers import IGNORE, assert_same_bytes, quantize_folder
from tests.reference import reference_compress


def heavy_tailed(rows: int, cols: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    """Student-t(4) values with outlier input columns and one all-zero group, as in real weights."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(4.0)
    torch.manual_seed(seed)
    w = t.sample((rows, cols)) * 0.02
    w[:, torch.randperm(cols, generator=g)[:4]] *= 8
    w[0, :32] = 0
    return w.to(dtype)


def scheme(name: str, observer: str, **kwargs):
    (s,) = resolve_config(name, observer=observer).config_groups.values()
    s.weights.observer_kwargs = kwargs
    return s


CASES = [
    ("W4A16", "memoryless_mse", {}),
    ("W4A16_ASYM", "memoryless_mse", {}),
    ("W8A16", "memoryless_mse", {}),
    ("INT8", "memoryless_mse", {}),
    ("FP8_DYNAMIC", "memoryless_mse", {}),
    ("FP8_BLOCK", "memoryless_mse", {}),
    ("MXFP4A16", "memoryless_mse", {}),
    ("NVFP4A16", "memoryless_mse", {}),
    ("NVFP4A16", "nvfp4_expanded_mse", {}),
    ("W4A16", "nvfp4_expanded_mse", {}),
    ("W4A16", "mse", {"norm": 2.0, "grid": 50, "maxshrink": 0.5}),
    ("W8A16", "memoryless_mse", {"expand": 1.3, "patience": 2}),
]


@pytest.mark.parametrize(("name", "observer", "kwargs"), CASES)
@pytest.mark.parametrize("shape", [(256, 512), (200, 384)])
def test_weight_matches_the_reference_search(name, observer, kwargs, shape):
    s = scheme(name, observer, **kwargs)
    if s.weights.group_size and shape[1] % s.weights.group_size:
        pytest.skip("columns not divisible by the group size")
    w = heavy_tailed(*shape, seed=shape[0])
    (got,) = quantize_weights([w], s)
    (want,) = reference_compress([w], s)
    assert_same_bytes(got, want)
    (minmax,) = quantize_weights([w], scheme(name, "memoryless_minmax"))
    assert any(not torch.equal(got[k], minmax[k]) for k in got), "the search changed nothing"


@pytest.mark.slow  # over 10 s on 2 cores
def test_fused_set_shares_the_global_scale_of_its_searched_ranges():
    s = scheme("NVFP4A16", "nvfp4_expanded_mse")
    ws = [heavy_tailed(256, 256, seed) * f for seed, f in ((1, 1.0), (2, 3.0), (3, 0.2))]
    ws = [w.to(torch.bfloat16) for w in ws]
    got = quantize_weights(ws, s)
    for a, b in zip(got, reference_compress(ws, s), strict=True):
        assert_same_bytes(a, b)
    assert len({bytes(g["weight_global_scale"].view(torch.uint8)) for g in got}) == 1
    (minmax,) = quantize_weights(ws[1:2], scheme("NVFP4A16", "memoryless_minmax"))
    assert not torch.equal(got[1]["weight_global_scale"], minmax["weight_global_scale"])


def test_the_stop_rule_sees_every_group_of_the_weight(monkeypatch):
    """patience counts steps in which no group of the whole weight improved: runs of single
    rows searched apart must stop where the whole weight stops, and on this weight stopping
    there keeps another scale than searching every step would."""
    s = scheme("FP8_DYNAMIC", "memoryless_mse", patience=1)
    args, search = s.weights, observers.search_of("memoryless_mse", {"patience": 1})
    w = heavy_tailed(4, 256, seed=8)
    x = observers.grouped(w, args)
    lo, hi = torch.amin(x, dim=(0, -1)), torch.amax(x, dim=(0, -1))
    scale, zero = observers.candidates(lo, hi, args, search.factors)
    err = observers.errors(x.reshape(4, 256), scale.reshape(20, 4), zero.reshape(20, 4), args, 2.4)
    best = torch.full((4,), torch.finfo(err.dtype).max, dtype=err.dtype)
    everything = torch.zeros(4, dtype=torch.long)
    improved = observers.advance(err, best, everything, 0).tolist()
    end = next(i for i in range(1, len(improved)) if not improved[i])  # patience 1
    assert end < len(err) - 1 and any(improved[end + 1 :]), "no early stop to test"
    best = torch.full((4,), torch.finfo(err.dtype).max, dtype=err.dtype)
    stopped = torch.zeros(4, dtype=torch.long)
    observers.advance(err[: end + 1], best, stopped, 0)
    assert not torch.equal(stopped, everything)
    monkeypatch.setattr(compress, "SEARCH_TERMS", 20 * 256)  # one row per run
    (got,) = quantize_weights([w], s)
    assert_same_bytes(got, reference_compress([w], s)[0])


@pytest.mark.parametrize("name", ["W4A16_ASYM", "FP8_BLOCK", "NVFP4A16"])
def test_torch_and_compiled_errors_are_the_same_bits(monkeypatch, name):
    """The numba kernel (bfloat16 on the CPU) and torch's operations give the same bytes."""
    s = scheme(name, "nvfp4_expanded_mse" if name == "NVFP4A16" else "memoryless_mse")
    w = heavy_tailed(128, 512, seed=11)
    (fast,) = quantize_weights([w], s)
    monkeypatch.setattr(observers, "_kernel_module", lambda: None)
    (slow,) = quantize_weights([w], s)
    assert_same_bytes(fast, slow)


@pytest.mark.slow  # over 10 s on 2 cores
def test_fused_search_sums_as_torch_and_leaves_torch_the_unsure_sums(monkeypatch):
    """The kernel sums each group itself; where its sum could round to another bfloat16 than
    torch's, torch sums that group's terms. Best error, step and improvements are torch's."""
    from tasks.core.quant import mse_kernel

    args = observers.search_args(scheme("NVFP4A16", "nvfp4_expanded_mse").weights)
    search = observers.search_of("nvfp4_expanded_mse", None)
    values = observers.grouped(heavy_tailed(256, 1024, seed=4), args).reshape(-1, 16)
    lo, hi = (f(values, dim=-1) * search.expand for f in (torch.amin, torch.amax))
    scale, zero = observers.candidates(lo, hi, args, search.factors)
    unsure = []
    terms = mse_kernel._terms
    monkeypatch.setattr(mse_kernel, "_terms", lambda *a: unsure.append(a[0].shape) or terms(*a))

    def start():
        return torch.full((len(values),), 3e38).to(torch.bfloat16), torch.zeros(len(values)).long()

    best, step = start()
    kind = kind_of(args)
    steps = observers._stepper(values, values.shape[1], kind)  # the kernel's, then advance
    improved = steps(values, scale, zero, args, search.norm, best, step, 3)
    assert unsure, "no sum was unsure: the fallback went untested"
    each = zip(scale, zero, strict=True)
    err = torch.stack([observers._error(values, s, z, args, kind, search.norm) for s, z in each])
    torch_best, torch_step = start()
    assert torch.equal(improved, observers.advance(err, torch_best, torch_step, 3))
    assert torch.equal(best, torch_best) and torch.equal(step, torch_step)


def test_float16_weights_search_in_float16():
    s = scheme("W4A16", "memoryless_mse")
    w = heavy_tailed(128, 256, seed=5, dtype=torch.float16)
    assert_same_bytes(quantize_weights([w], s)[0], reference_compress([w], s)[0])


def test_mse_is_memoryless_mse_not_a_missing_static_mse():
    w = heavy_tailed(128, 256, seed=3)
    (a,) = quantize_weights([w], scheme("W4A16", "mse"))
    (b,) = quantize_weights([w], scheme("W4A16", "memoryless_mse"))
    assert_same_bytes(a, b)


@pytest.mark.parametrize(
    ("observer", "kwargs", "message"),
    [
        ("imatrix_mse", {}, r"imatrix_mse.*activation statistics.*memoryless_mse"),
        ("nvfp4_expanded_imatrix", {}, r"activation statistics"),
        ("bogus", {}, r"unknown weight observer 'bogus'.*nvfp4_expanded_mse"),
        ("memoryless_mse", {"shrink": 0.3}, r"observer_kwargs shrink.*reads expand, grid"),
        ("memoryless_mse", {"expand": 0.9}, r"expand must be at least 1.0"),
        ("memoryless_mse", {"grid": 2}, r"no step"),
    ],
)
def test_observers_that_cannot_run_are_refused_naming_the_group(observer, kwargs, message):
    config = {
        "config_groups": {
            "attn": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 128,
                    "observer": observer,
                    "observer_kwargs": kwargs,
                },
            }
        }
    }
    with pytest.raises(PtqflowError, match=message) as e:
        resolve_config(config=config)
    assert "'attn'" in str(e.value)


def test_observer_goes_with_a_preset_and_fouroversix_warns():
    with pytest.raises(PtqflowError, match="--observer goes with --scheme"):
        resolve_config(config={"config_groups": {}}, observer="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (s,) = resolve_config("NVFP4A16", observer="fouroversix").config_groups.values()
    assert any("alias for 'nvfp4_expanded_mse'" in str(w.message) for w in caught)
    w = heavy_tailed(64, 256, seed=9)
    assert_same_bytes(
        quantize_weights([w], s)[0],
        quantize_weights([w], scheme("NVFP4A16", "nvfp4_expanded_mse"))[0],
    )


@pytest.mark.slow
def test_checkpoint_records_the_observer_and_verify_reruns_it(tmp_path):
    from tasks.core.verify import verify

    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=2)
    out = tmp_path / "out"
    quantize_folder(
        src, out, resolve_config("NVFP4A16", ignore=IGNORE, observer="nvfp4_expanded_mse")
    )
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["NVFP4A16"]["weights"]["observer"] == "nvfp4_expanded_mse"
    minmax = tmp_path / "minmax"
    quantize_folder(src, minmax, resolve_config("NVFP4A16", ignore=IGNORE))
    assert load_tensors(out).keys() == load_tensors(minmax).keys()
    assert verify(str(src), str(out)).ok
    # a flipped byte in a searched scale is named
    shard = sorted(out.glob("*.safetensors"))[0]
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    name = next(k for k in sorted(tensors) if k.endswith("weight_scale"))
    t = tensors[name].view(torch.uint8).clone()
    t.view(-1)[5] ^= 1
    tensors[name] = t.view(tensors[name].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    failures = verify(str(src), str(out)).failures()
    assert any(name in f for f in failures), failures


def test_cli_takes_an_observer_for_a_preset(tmp_path, capsys):
    from flows.cli import main

    src = build_checkpoint(tmp_path / "src", "llama", shards=1)
    assert main(["plan", str(src), "--scheme", "W4A16", "--observer", "memoryless_mse"]) == 0
    assert main(["plan", str(src), "--scheme", "W4A16", "--observer", "imatrix_mse"]) == 2
    assert "activation statistics" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "kind"),
    [("W4A16", "int"), ("W8A16", "int"), ("FP8_BLOCK", "fp8"), ("MXFP4A16", "fp4")],
)
def test_each_preset_has_its_kind_of_quantizer(name, kind):
    from tasks.core.quant.kinds import QuantKind, kind_of

    assert kind_of(scheme(name, "memoryless_mse").weights) is QuantKind.get(kind)


def test_a_float_width_with_no_grid_is_refused_by_the_search_not_searched_as_fp4():
    """MXFP6's 6-bit floats are no FP4: an MSE observer on them is refused, naming the
    kind, where they once fell into the FP4 grid; min-max is compressed-tensors' own."""
    with pytest.raises(PtqflowError, match="'MXFP6A16' uses observer 'memoryless_mse': the MSE"):
        resolve_config("MXFP6A16", observer="memoryless_mse")
    s = scheme("MXFP6A16", "memoryless_minmax")
    w = heavy_tailed(64, 256, seed=2)
    with pytest.raises(PtqflowError, match="no grid for 6-bit float weights"):
        observers.searched_minmax(w, s.weights, observers.search_of("memoryless_mse", None))
    assert_same_bytes(quantize_weights([w], s)[0], reference_compress([w], s)[0])
