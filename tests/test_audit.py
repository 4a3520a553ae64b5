"""Traffic audit: hardware-independent facts about bytes moved and launches."""

import pytest
import torch

from nearl_kernels import _dispatch
from nearl_kernels.audit import TrafficAudit
from nearl_kernels.oca.ops import oca_fwd_triton
from nearl_kernels.oca.reference import oca_reference
from nearl_kernels.synergy.ops import synergy_fwd_triton

# ViT-B/16 image-tower shapes; bytes per sequence do not depend on G, so two
# sequences keep the interpreter quick.
G, L, D, R, M = 2, 197, 768, 32, 16

pytestmark = pytest.mark.skipif(not _dispatch.interpreting(), reason="the audit counts bytes under TRITON_INTERPRET=1")


def vit_b16_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(G, L, D, generator=g).to(dtype)
    h = torch.randn(G, L, R, generator=g).to(dtype)
    rest = [torch.randn(G, M, R, generator=g), torch.randn(R, R, generator=g), torch.randn(R, R, generator=g),
            torch.randn(R, D, generator=g) * 0.1, torch.randn(D, generator=g), torch.tensor(1.0), torch.tensor(0.0)]
    return x, h, rest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_oca_forward_touches_token_bytes_once_and_reference_four_times_more(dtype):
    x, h, rest = vit_b16_inputs(dtype)
    es = x.element_size()
    minimum = G * L * (D + R + D) * es  # x and h read once, y written once

    with TrafficAudit(n_tokens=G * L) as fused:
        oca_fwd_triton(x, h, *rest, 2, 1, 1e-6)
    moved = fused.kernel_bytes["oca_fwd_kernel"]
    # Two passes over the column blocks of d: statistics, then the update. The
    # second read of x is the same tile shortly after, an L2 hit on a GPU.
    assert moved["x"] == 2 * G * L * D * es
    assert moved["h"] == G * L * R * es
    assert moved["y"] == G * L * D * es
    # Unique bytes of x, h, y: the analytic minimum, what the benchmarks' GB/s use.
    footprint = fused.kernel_total("oca_fwd_kernel", names={"x", "h", "y"}, footprint=True)
    assert footprint == minimum
    assert "<unnamed>" not in moved
    assert fused.kernel_launches == {"oca_fwd_kernel": 1}

    with TrafficAudit(n_tokens=G * L) as ref:
        oca_reference(x, h, *rest, 2, 1, 1e-6)
    assert ref.aten_token_bytes >= 4 * footprint, (ref.aten_token_bytes, footprint)
    assert ref.aten_launches > fused.launches


def test_synergy_forward_reads_each_context_token_once():
    z = torch.randn(3, M, R)
    Lc = 197 + 3 * 12
    ctx = torch.randn(3, Lc, R)
    mask = torch.ones(3, Lc, dtype=torch.bool)
    from nearl_model.modules import USEformerBlock
    from nearl_kernels.synergy import PARAM_NAMES

    block = USEformerBlock(R, 2, 14)
    params = [getattr(block, n).detach() for n in PARAM_NAMES]
    with TrafficAudit() as audit:
        synergy_fwd_triton(z, ctx, mask, params, 2)
    # The context is split across programs, each reading only its own tokens.
    split = audit.kernel_bytes["synergy_fwd_split_kernel"]
    assert split["ctx"] == ctx.numel() * ctx.element_size()
    assert split["mask"] == mask.numel()
    assert audit.kernel_bytes["synergy_fwd_combine_kernel"]["out"] == z.numel() * z.element_size()
    assert audit.kernel_launches == {"synergy_fwd_split_kernel": 1, "synergy_fwd_combine_kernel": 1}


def test_tensors_are_named_by_kernel_parameters_without_ptr():
    from nearl_kernels.audit import tensor_name

    assert [tensor_name(n) for n in ("x_ptr", "mask_ptr", "p_ptr", "L", "ptr")] == ["x", "mask", "p", "L", "ptr"]


def test_audits_cannot_nest_and_leave_launches_unhooked():
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    with TrafficAudit():
        assert InterpretedFunction.run is not run
        with pytest.raises(RuntimeError, match="cannot nest"):
            with TrafficAudit():
                pass
    assert InterpretedFunction.run is run
