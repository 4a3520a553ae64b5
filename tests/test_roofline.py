"""The roofline figures in the kernel headers: derived by code, matched to the headers, about the
shapes the benchmarks time; and the compile gate's waves arithmetic. Hardware-independent."""

import math
import os
import sys

import pytest
import torch

from nearl_kernels import compile_check, roofline
from nearl_kernels.synergy.ops import _param_shapes
from nearl_kernels.synergy.reference import PARAM_NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("op", ["oca", "synergy"])
def test_kernel_header_states_the_derived_figures(op):
    with open(roofline.kernels_path(op), encoding="utf-8") as f:
        text = f.read()
    assert roofline.render_header(text, op) == text, "run python -m nearl_kernels.roofline --write"
    block = roofline.header(op)
    assert block in text
    for row in roofline.figures(op):
        assert f"{row.shape} {row.mode}: minimal {row.bytes / 1e6:.2f} MB" in block
        for name, programs in row.launches:
            assert f"{name}: {programs:,} programs" in block


def test_the_check_fails_on_a_stale_header():
    text = "x\n" + roofline.START + "old figures\n" + roofline.END
    assert roofline.render_header(text, "oca") == "x\n" + roofline.START + roofline.header("oca") + roofline.END
    with pytest.raises(ValueError, match="has no roofline block"):
        roofline.render_header("no block here", "oca")


def test_benchmarks_time_the_roofline_shapes():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_oca
        import bench_synergy
    finally:
        sys.path.pop(0)
    assert bench_oca.SHAPES["gpu"] == [dict(s) for s in roofline.OCA_SHAPES]
    assert bench_synergy.SHAPES["gpu"] == [dict(s) for s in roofline.SYNERGY_SHAPES]
    assert (bench_oca.R, bench_oca.M, bench_oca.HEADS) == (roofline.R, roofline.M, roofline.HEADS)
    assert bench_synergy.FFN * bench_synergy.R == roofline.F


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("shape", roofline.OCA_SHAPES, ids=lambda s: s["id"])
def test_oca_minimal_bytes_are_the_tensors_it_must_touch(shape):
    G, L, d, T, r, M = shape["G"], shape["L"], shape["d"], shape["T"], roofline.R, roofline.M
    bf16, fp32 = torch.bfloat16, torch.float32
    x, h = _meta((G, L, d), bf16), _meta((G, L, r), bf16)
    weights = [_meta((G // T, M, r), fp32), _meta((r, r), fp32), _meta((r, r), fp32), _meta((r, d), fp32),
               _meta((d,), fp32), _meta((), fp32), _meta((), fp32)]
    assert roofline.oca_bytes(shape, "forward") == _nbytes(x, h, x, *weights)  # y like x
    # dy, x, h in; dx, dh out; every weight read and its gradient written.
    assert roofline.oca_bytes(shape, "backward") == _nbytes(x, x, h, x, h, *weights, *weights)


def test_synergy_minimal_bytes_are_the_tensors_it_must_touch():
    shape = roofline.SYNERGY_SHAPES[0]
    G, Lc, r, M = shape["G"], shape["Lc"], roofline.R, roofline.M
    z, ctx, mask = _meta((G, M, r), torch.float32), _meta((G, Lc, r), torch.bfloat16), _meta((G, Lc), torch.bool)
    shapes = _param_shapes(r, roofline.F)
    params = [_meta(shapes[n], torch.float32) for n in PARAM_NAMES]
    assert sum(p.numel() for p in params) == roofline.synergy_param_count()
    assert roofline.synergy_bytes(shape, "forward") == _nbytes(z, ctx, mask, *params, z)
    assert roofline.synergy_bytes(shape, "backward") == _nbytes(z, z, ctx, mask, *params, z, ctx, *params)


def test_launch_grids_are_the_launchers_own():
    # The image OCA forward: 197 tokens in tiles of 32 (the launcher shrinks its tile of 64 to
    # reach two programs per SM), 64 sequences.
    image = roofline.OCA_SHAPES[0]
    assert roofline.launch_grids("oca", "forward", image) == [("oca_fwd_kernel", (64 * math.ceil(197 / 32),))]
    syn = roofline.SYNERGY_SHAPES[0]
    assert [name for name, _ in roofline.launch_grids("synergy", "forward", syn)] == [
        "synergy_fwd_split_kernel", "synergy_fwd_combine_kernel"]


# Launches that only touch a group's M x r queries: one program per group by design.
PER_GROUP = {"synergy_fwd_combine_kernel", "synergy_bwd_tail_kernel", "synergy_bwd_finish_kernel"}


@pytest.mark.parametrize("op", ["oca", "synergy"])
def test_every_launch_over_tokens_or_context_fills_the_sms(op):
    for row in roofline.figures(op):
        for name, programs in row.launches:
            if name not in PER_GROUP:
                assert programs >= roofline.SMS, (row.shape, row.mode, name, programs)


def test_waves_are_programs_over_resident_blocks():
    sm90, sm80 = compile_check.ARCHS["sm_90"], compile_check.ARCHS["sm_80"]
    assert compile_check.waves(448, sm90, 2) == 448 / 264
    assert compile_check.waves(64, sm80, 1) == 64 / 108
    assert compile_check.waves(64, sm80, None) is None
    rows = [dict(kernel="k", key="a", blocks_per_sm=2), dict(kernel="k", key="b", blocks_per_sm=1)]
    records = [compile_check.LaunchRecord("op_fwd:bench-x", "k", "a", (256,)),
               compile_check.LaunchRecord("op_fwd:bench-x", "k", "b", (4, 66)),
               compile_check.LaunchRecord("op_fwd:G4-other", "k", "a", (1,))]
    out = compile_check.wave_rows(records, rows, sm90)
    assert [(w["programs"], w["blocks_per_sm"], w["under_one_wave"]) for w in out] == [(256, 2, True), (264, 1, False)]
    assert out[0]["waves"] == round(256 / 264, 3) and out[1]["waves"] == round(264 / 132, 3)
    assert "**< 1 wave**" in compile_check.render_waves(out)


def test_the_gate_envelopes_hold_the_benchmark_cases():
    labels = {c.label for c in compile_check.default_cases()}
    bench = {c.label for c in compile_check.benchmark_cases()}
    assert len(bench) == 2 * (len(roofline.OCA_SHAPES) + len(roofline.SYNERGY_SHAPES))
    assert bench <= labels
    assert "synergy_fwd:bench-G64-Lc261-K4" in bench
