"""The fast paths of tasks/core/quant/ give compressed-tensors' bytes: row chunks, shorter routes,
stage timers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from storage.errors import PtqflowError
from storage.source import Folder
from tasks.core.planner import plan_checkpoint
from tasks.core.quant.compress import quantize_weights, row_chunks
from tasks.core.quant.kinds import FP4, FP8, INT
from tasks.core.schemes import resolve_config
from tasks.core.shard import write_shard
from tests.checkpoints import build_checkpoint
from tests.helpers import SCHEMES, scheme_of
from tests.reference import reference_compress

ALL = [s for s in SCHEMES if s not in ("INT8", "W4AFP8", "MXFP4", "MXFP8")] + ["W3A16"]


def assert_same_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes (a [n, 1] zero point may come with any stride)."""
    assert sorted(got) == sorted(want)
    for k, b in want.items():
        a = got[k]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), k
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k


def weight(shape, seed=0, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(300, 256), (576, 128), (100, 512)])
def test_row_chunks_give_the_same_bytes(name, shape):
    """Chunks of 32 or 128 rows, the last one partial, equal one whole-weight compression."""
    w = weight(shape, seed=1)
    w[0, :64] = 0  # an all-zero group/block keeps its epsilon scale
    scheme = scheme_of(name)
    assert len(row_chunks(w, scheme.weights, 1)) > 1 or shape[0] <= 128
    (got,) = quantize_weights([w], scheme, chunk_elements=1)
    assert_same_bytes(got, reference_compress([w], scheme)[0])


@pytest.mark.parametrize("name", ["FP8_BLOCK", "FP8_DYNAMIC", "W8A8"])
@pytest.mark.parametrize("shape", [(576, 200), (300, 200), (130, 70)])
def test_row_chunks_of_padded_blocks(name, shape):
    """576 rows and 200 columns: FP8_BLOCK pads the last row and column blocks of its chunk."""
    w = weight(shape, seed=2)
    (got,) = quantize_weights([w], scheme_of(name), chunk_elements=1)
    assert_same_bytes(got, reference_compress([w], scheme_of(name))[0])


def test_chunks_hold_whole_blocks_and_32_rows():
    args = scheme_of("FP8_BLOCK").weights
    w = torch.empty(576, 200)
    assert row_chunks(w, args, 1) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert row_chunks(w, args, 300 * 200) == [(0, 256), (256, 512), (512, 576)]
    assert row_chunks(w, scheme_of("W4A16").weights, 70 * 200) == [(0, 64), (64, 128)] + [
        (r, min(r + 64, 576)) for r in range(128, 576, 64)
    ]
    assert row_chunks(torch.empty(576, 200, device="meta"), args, 1) == [(0, 576)]


def test_fused_set_in_chunks_shares_one_global_scale():
    g = torch.Generator().manual_seed(4)
    ws = [(torch.randn(96, 256, generator=g) * s).to(torch.bfloat16) for s in (1.0, 3.0, 0.2)]
    got = quantize_weights(ws, scheme_of("NVFP4A16"), chunk_elements=1)
    for a, b in zip(got, reference_compress(ws, scheme_of("NVFP4A16")), strict=True):
        assert_same_bytes(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["FP8_BLOCK", "NVFP4A16", "W4A16_ASYM"])
def test_other_source_dtypes_in_chunks(name, dtype):
    w = weight((160, 256), seed=3, dtype=dtype)
    (got,) = quantize_weights([w], scheme_of(name), chunk_elements=1)
    assert_same_bytes(got, reference_compress([w], scheme_of(name))[0])


def edge_weight(dtype=torch.bfloat16) -> torch.Tensor:
    """Ties, zeros of both signs, ±max, subnormals and infinities, each in its own rows."""
    w = weight((256, 256), seed=5).float()
    fin = torch.finfo(dtype)
    w[0] = 0.0
    w[1] = -0.0
    w[2, ::2], w[2, 1::2] = fin.max, -fin.max
    w[3] = fin.smallest_normal / 4  # subnormal
    w[4] = -fin.smallest_normal / 8
    w[5] = torch.linspace(-6, 6, 256)  # FP4/INT4 ties after scaling
    w[6, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2)
    w[6, 8:16] *= -1
    w[7, :128] = 1.0  # one value per block: every element is the block's max
    w[8:40] = torch.round(w[8:40] * 16) / 16  # many exact ties
    return w.to(dtype)


@pytest.mark.parametrize("name", ALL)
def test_edge_values_give_the_same_bytes(name):
    w = edge_weight()
    (got,) = quantize_weights([w], scheme_of(name), chunk_elements=1)
    assert_same_bytes(got, reference_compress([w], scheme_of(name))[0])


@pytest.mark.parametrize("name", ["FP8_BLOCK", "FP8_DYNAMIC", "W4A16", "NVFP4A16"])
def test_infinities_give_the_same_bytes(name):
    w = edge_weight()
    w[9, 3] = float("inf")
    w[200, 17] = float("-inf")
    (got,) = quantize_weights([w], scheme_of(name), chunk_elements=1)
    assert_same_bytes(got, reference_compress([w], scheme_of(name))[0])


def test_stage_timings_in_manifest(tmp_path):
    src = build_checkpoint(tmp_path / "src", "llama", shards=2)
    config = resolve_config("FP8_BLOCK", ignore=["lm_head"])
    plan, _ = plan_checkpoint(str(src), config)
    out = tmp_path / "out"
    m = write_shard(plan.shards[0], Folder(plan.source).open, out, config.config_groups)
    assert set(m.stages) == {"read", "quantize", "write"}
    assert all(v >= 0 for v in m.stages.values())
    assert sum(m.stages.values()) <= m.seconds + 0.01


@pytest.mark.parametrize("kind, scheme", [("deepseek_v3", "NVFP4A16"), ("qwen3_moe", "W4A16")])
def test_overlapped_stages_write_the_same_shards(tmp_path, kind, scheme):
    """The GPU's overlapped read / quantize / write threads, run on the CPU: same bytes."""
    src = build_checkpoint(tmp_path / "src", kind, shards=2)
    config = resolve_config(scheme, ignore=["lm_head"])
    plan, _ = plan_checkpoint(str(src), config)
    for overlap in (False, True):
        for shard in plan.shards:
            write_shard(
                shard,
                Folder(plan.source).open,
                tmp_path / f"out-{overlap}",
                config.config_groups,
                overlap=overlap,
            )
    for shard in plan.shards:
        want = (tmp_path / "out-False" / shard.name).read_bytes()
        assert (tmp_path / "out-True" / shard.name).read_bytes() == want


def test_a_failed_read_in_overlapped_stages_leaves_no_shard(tmp_path):
    src = build_checkpoint(tmp_path / "src", "llama", shards=1)
    config = resolve_config("FP8_DYNAMIC")
    plan, _ = plan_checkpoint(str(src), config)
    (shard,) = plan.shards
    for name in shard.files:  # the last units' tensors are gone
        os.truncate(src / name, (src / name).stat().st_size * 2 // 3)
    out = tmp_path / "out"
    with pytest.raises(PtqflowError, match="ended early"):
        write_shard(shard, Folder(plan.source).open, out, config.config_groups, overlap=True)
    assert list(out.iterdir()) == []


def every_finite(dtype: torch.dtype, cols: int = 128) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, as rows of `cols` (padded with zeros)."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    values = values[torch.isfinite(values)]
    pad = -len(values) % cols
    return torch.cat([values, torch.zeros(pad, dtype=dtype)]).reshape(-1, cols)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1 / 3, 2.0**-10])
def test_fp8_route_on_every_quotient(dtype, scale):
    """The short FP8 route equals compressed-tensors' quantize for every finite quotient."""
    from compressed_tensors.quantization.lifecycle.forward import quantize

    from tasks.core.quant.routes import _fp8_weight

    x = every_finite(dtype)
    args = scheme_of("FP8_DYNAMIC").weights
    s = torch.full((x.shape[0], 1), scale, dtype=dtype)
    want = quantize(x, s, None, args, dtype=torch.float8_e4m3fn)
    assert torch.equal(_fp8_weight(x, s, args).view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 1 / 3, 2.0**-10])
def test_int4_route_on_every_quotient(dtype, scale):
    """The short INT4 route (round half to even, pack) equals quantize + pack_to_int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.lifecycle.forward import quantize

    from tasks.core.quant.routes import _int4_packed

    x = every_finite(dtype)
    args = scheme_of("W4A16").weights
    s = torch.full((x.shape[0], 1), scale, dtype=dtype)
    want = pack_to_int32(quantize(x, s, None, args, dtype=torch.int8), 4)
    assert torch.equal(_int4_packed(x, s, args), want)


@pytest.mark.parametrize("bits", [0x7FC0, 0xFFC0, 0xFF81], ids=["nan", "-nan", "-nan-payload"])
@pytest.mark.parametrize("name", ["FP8_BLOCK", "FP8_DYNAMIC", "W4A16", "NVFP4A16"])
def test_nan_gives_the_same_bytes(name, bits):
    """Rows with NaN go through compressed-tensors itself (its NaN signs are its own);
    min and max (reduced as float32 on the CPU) keep what the observer finds."""
    w = edge_weight()
    w.view(torch.int16)[9, 3] = bits - (1 << 16) if bits >= 1 << 15 else bits
    (got,) = quantize_weights([w], scheme_of(name), chunk_elements=1)
    assert_same_bytes(got, reference_compress([w], scheme_of(name))[0])


def fp4_quotients() -> torch.Tensor:
    """f32 values around every FP4 rounding boundary, every bf16 value in range, random ones."""
    edges = torch.tensor(
        [
            0.0,
            0.25,
            0.5,
            0.75,
            1.0,
            1.25,
            1.5,
            1.75,
            2.0,
            2.5,
            3.0,
            3.5,
            4.0,
            5.0,
            6.0,
            7.0,
            1e-30,
            1e-45,
            3e38,
        ]
    )
    near = [edges, torch.nextafter(edges, torch.tensor(-1.0)), torch.nextafter(edges, edges + 1)]
    values = torch.cat(near + [every_finite(torch.bfloat16).float().reshape(-1)])
    values = torch.cat([values, -values, torch.empty(4096).uniform_(-7, 7)])
    values = values[torch.isfinite(values)]
    return torch.cat([values, torch.zeros(-len(values) % 128)]).reshape(-1, 128)


def test_fp4_route_on_quotients_around_every_boundary():
    """The short NVFP4 route equals quantize_and_pack_fp4 on boundaries, ±0 and all bf16 values."""
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4

    from tasks.core.quant.routes import _fp4_packed

    x = fp4_quotients()
    args = scheme_of("NVFP4A16").weights
    for scale, gscale in ((1.0, 1.0), (3.0, 0.5)):
        s = torch.full((x.shape[0], x.shape[1] // 16), scale)
        g = torch.tensor([gscale])
        want = quantize_and_pack_fp4(x * scale / gscale, s, global_scale=g, group_size=16)
        assert torch.equal(_fp4_packed(x * scale / gscale, s, g, args), want)


@pytest.mark.parametrize("scale, gscale", [(1.0, 1.0), (3.0, 0.5), (1.0, 3.0), (448.0, 7.0)])
def test_fp4_kernel_on_every_bfloat16_value(scale, gscale):
    """code_kernel's NVFP4 codes (bfloat16 weights) equal quantize_and_pack_fp4 on every
    finite bfloat16 value, boundaries included (x / 1 and x / 6 hit every one)."""
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4

    from tasks.core.quant.routes import _fp4_packed, _kernel_codes

    x = every_finite(torch.bfloat16)
    args = scheme_of("NVFP4A16").weights
    s = torch.full((x.shape[0], x.shape[1] // 16), scale, dtype=torch.bfloat16)
    g = torch.tensor([gscale])
    assert _kernel_codes(x, s / g, args, FP4, None) is not None
    want = quantize_and_pack_fp4(x, s, global_scale=g, group_size=16)
    assert torch.equal(_fp4_packed(x, s, g, args), want)


def test_bound_benchmark_names_the_slowest_stage(tmp_path, capsys):
    from benchmarks.bound import main

    src = build_checkpoint(tmp_path / "src", "llama", shards=2)
    report = tmp_path / "bound.json"
    assert main(["--checkpoint", str(src), "--scheme", "W4A16", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    rates = result["rates"]
    assert set(rates) == {"disk", "compute", "end to end"} and min(rates.values()) > 0
    assert result["bound"] == min(("disk", "compute"), key=rates.get)
    assert f"{result['bound']}-bound" in capsys.readouterr().out


def test_worker_pools_count_the_cpus_this_process_may_use(tmp_path):
    """The affinity mask, capped by the cgroup's quota (v2 cpu.max; v1 cfs_quota_us)."""
    import os

    from tasks.core.devices import usable_cpus

    mask = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "none") == mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == mask
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: one worker
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(mask + 7) * 100000} 100000\n")
    assert usable_cpus(tmp_path) == mask  # a quota above the mask does not add CPUs
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1) == mask
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    assert usable_cpus(v1) == min(mask, 2)


@pytest.mark.parametrize("name", ["tensor", "FP8_BLOCK", "FP8_DYNAMIC", "W4A16", "NVFP4A16"])
def test_the_kernel_finds_torchs_min_and_max(name):
    """code_kernel.extremes (observe's bfloat16 route) against torch's reduction of every
    scale element's values, on edge values; a NaN sends observe back to torch."""
    from tasks.core.quant.code_kernel import extremes
    from tasks.core.quant.geometry import scale_extent

    w = edge_weight()
    w[9, 3], w[200, 17] = float("inf"), float("-inf")
    if name == "tensor":
        args = scheme_of("FP8_DYNAMIC").weights.model_copy(update={"strategy": "tensor"})
    else:
        args = scheme_of(name).weights
    rows, cols = scale_extent(w, args)
    blocks = w.float().reshape(w.shape[0] // rows, rows, w.shape[1] // cols, cols)
    lo, hi = extremes(w, rows, cols)
    assert torch.equal(lo, blocks.amin(dim=(1, 3)).to(w.dtype))
    assert torch.equal(hi, blocks.amax(dim=(1, 3)).to(w.dtype))
    w[9, 3] = float("nan")
    assert extremes(w, rows, cols) is None


def test_the_kernel_takes_bfloat16_routes():
    """The every-quotient tests above exercise code_kernel for bfloat16, torch for float16."""
    from tasks.core.quant.routes import _kernel_codes

    x = every_finite(torch.bfloat16)
    s = torch.full((x.shape[0], 1), 1 / 3, dtype=x.dtype)
    for name, kind in [("FP8_DYNAMIC", FP8), ("W4A16", INT)]:
        assert _kernel_codes(x, s, scheme_of(name).weights, kind, None) is not None
        assert _kernel_codes(x.half(), s.half(), scheme_of(name).weights, kind, None) is None
        assert _kernel_codes(x, s * 0, scheme_of(name).weights, kind, None) is None


def test_malloc_arenas_are_capped_where_glibc_runs():
    """mallopt(M_ARENA_MAX) is accepted (glibc); elsewhere the cap is skipped, not an error."""
    import platform

    from tasks.core.devices import limit_malloc_arenas

    assert limit_malloc_arenas() is (platform.libc_ver()[0] == "glibc")
