"""The analytic backwards in reference.py against torch.func.vjp of the reference maths.

oca_reference_fwd/bwd and synergy_reference_fwd/bwd are what the custom ops
run on CPU; here they meet the readable reference they rearrange, on CPU,
with no Triton involved.
"""

import pytest
import torch

from helpers import rel_err, within_twice_torch_error
from nearl_kernels.oca.reference import down_project, oca_reference, oca_reference_bwd, oca_reference_fwd
from nearl_kernels.synergy.reference import (
    PARAM_NAMES,
    synergy_reference,
    synergy_reference_bwd,
    synergy_reference_fwd,
)
from nearl_model.modules import USEformerBlock

OCA_GRADS = ("x", "h", "z", "w_k", "w_v", "w_up", "b_up", "s_novel", "s_incr")
SYNERGY_GRADS = ("z", "ctx", *PARAM_NAMES)
FP32_TOL = 1e-5


def oca_inputs(G, L, d, T=1, r=32, M=16, s_incr=0.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    x = rnd(G, L, d).to(dtype)
    h = down_project(x, rnd(d, r, scale=d**-0.5).to(dtype), rnd(r, scale=0.1).to(dtype))
    rest = [rnd(G // T, M, r), rnd(r, r, scale=r**-0.5), rnd(r, r, scale=r**-0.5), rnd(r, d, scale=0.2),
            rnd(d, scale=0.2), torch.tensor(0.8), torch.tensor(s_incr)]
    return [x, h, *rest], rnd(G, L, d).to(dtype)


OCA_SHAPES = [
    pytest.param(2, 1, 64, 1, 1, 32, 16, 0.0, id="G2-L1-d64-T1-H1"),
    pytest.param(4, 7, 96, 2, 2, 32, 16, 0.3, id="G4-L7-d96-T2-H2-incr"),
    pytest.param(4, 50, 768, 4, 4, 32, 16, 0.5, id="G4-L50-d768-T4-H4-incr"),
    pytest.param(2, 197, 64, 1, 2, 24, 5, 0.2, id="G2-L197-d64-T1-H2-r24-M5-incr"),
    pytest.param(8, 9, 96, 2, 4, 48, 7, 0.0, id="G8-L9-d96-T2-H4-r48-M7"),
    pytest.param(4, 197, 768, 2, 2, 32, 16, 0.1, id="G4-L197-d768-T2-H2-incr"),
]


@pytest.mark.parametrize("G,L,d,T,heads,r,M,s_incr", OCA_SHAPES)
def test_oca_forward_and_every_gradient_match_vjp_fp32(G, L, d, T, heads, r, M, s_incr):
    args, dy = oca_inputs(G, L, d, T=T, r=r, M=M, s_incr=s_incr)
    y_ref, vjp = torch.func.vjp(lambda *t: oca_reference(*t, heads, T, 1e-6), *args)
    y, saved = oca_reference_fwd(*args, heads, T, 1e-6)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= FP32_TOL
    grads = oca_reference_bwd(dy, *args, saved, heads, T, 1e-6)
    for name, g, g_ref, t in zip(OCA_GRADS, grads, vjp(dy), args, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert rel_err(g, g_ref) <= FP32_TOL, (name, rel_err(g, g_ref))
    # autograd may run a backward twice (retain_graph): the saved tensors must come through unchanged.
    for name, g, g_again in zip(OCA_GRADS, grads, oca_reference_bwd(dy, *args, saved, heads, T, 1e-6)):
        assert torch.equal(g, g_again), name


def test_oca_noncontiguous_inputs():
    args, dy = oca_inputs(2, 7, 96, T=2, s_incr=0.2)
    x, h, z, w_k, w_v, w_up = args[:6]
    nc = [x.transpose(0, 1).contiguous().transpose(0, 1), h.transpose(0, 1).contiguous().transpose(0, 1),
          z, w_k.t().contiguous().t(), w_v, w_up.t().contiguous().t(), *args[6:]]
    assert not nc[0].is_contiguous() and not nc[5].is_contiguous()
    y, saved = oca_reference_fwd(*nc, 2, 2, 1e-6)
    y_ref, vjp = torch.func.vjp(lambda *t: oca_reference(*t, 2, 2, 1e-6), *args)
    assert rel_err(y, y_ref) <= FP32_TOL
    dy_nc = dy.transpose(0, 1).contiguous().transpose(0, 1)
    for name, g, g_ref in zip(OCA_GRADS, oca_reference_bwd(dy_nc, *nc, saved, 2, 2, 1e-6), vjp(dy)):
        assert rel_err(g, g_ref) <= FP32_TOL, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_oca_low_precision_inputs(dtype):
    """Maths in fp32, results in the inputs' dtypes: within twice PyTorch's own low-precision error."""
    args, dy = oca_inputs(2, 50, 96, T=2, s_incr=0.2, dtype=dtype)
    args32 = [t.float() for t in args]
    y32, vjp32 = torch.func.vjp(lambda *t: oca_reference(*t, 2, 2, 1e-6), *args32)
    y_lp, vjp_lp = torch.func.vjp(lambda *t: oca_reference(*t, 2, 2, 1e-6, compute_dtype=dtype), *args)
    y, saved = oca_reference_fwd(*args, 2, 2, 1e-6)
    assert y.dtype == dtype
    ok, errs = within_twice_torch_error(y, y32, y_lp, dtype)
    assert ok, errs
    grads = oca_reference_bwd(dy, *args, saved, 2, 2, 1e-6)
    for name, g, g32, glp, t in zip(OCA_GRADS, grads, vjp32(dy.float()), vjp_lp(dy), args):
        assert g.dtype == t.dtype, name
        ok, errs = within_twice_torch_error(g, g32, glp, t.dtype)
        assert ok, (name, errs)


def synergy_inputs(G, M, r, Lc, heads, ffn, masked, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    block = USEformerBlock(r, heads, ffn)
    # Move every parameter off its initial value (LayerNorms at 1/0, zero biases) so each carries signal.
    params = {n: (getattr(block, n).detach() + 0.1 * torch.randn(getattr(block, n).shape)).to(dtype)
              for n in PARAM_NAMES}
    z = torch.randn(G, M, r).to(dtype)
    ctx = torch.randn(G, Lc, r).to(dtype)
    mask = torch.ones(G, Lc, dtype=torch.bool)
    if masked in ("padded", "one-group-fully-masked"):
        mask[:, Lc // 2 :][:, ::3] = False
    if masked == "one-group-fully-masked":
        mask[1] = False
    return z, ctx, mask, params, torch.randn(G, M, r).to(dtype)


SYNERGY_SHAPES = [
    pytest.param(2, 16, 32, 7, 2, 4, "none", id="G2-M16-r32-Lc7-H2"),
    pytest.param(3, 16, 32, 50, 1, 4, "padded", id="G3-M16-r32-Lc50-H1-padded"),
    pytest.param(2, 5, 24, 1, 2, 3, "none", id="G2-M5-r24-Lc1-H2"),
    pytest.param(3, 16, 32, 197, 2, 14, "one-group-fully-masked", id="G3-M16-r32-Lc197-H2-fully-masked-group"),
    pytest.param(4, 7, 48, 261, 4, 14, "one-group-fully-masked", id="G4-M7-r48-Lc261-H4-fully-masked-group"),
]


def _synergy_vjp(z, ctx, mask, params, heads, compute_dtype=torch.float32):
    def f(z_, c_, *p):
        return synergy_reference(z_, c_, mask, dict(zip(PARAM_NAMES, p)), heads, compute_dtype=compute_dtype)

    return torch.func.vjp(f, z, ctx, *(params[n] for n in PARAM_NAMES))


@pytest.mark.parametrize("G,M,r,Lc,heads,ffn,masked", SYNERGY_SHAPES)
def test_synergy_forward_and_every_gradient_match_vjp_fp32(G, M, r, Lc, heads, ffn, masked):
    z, ctx, mask, params, dz = synergy_inputs(G, M, r, Lc, heads, ffn, masked)
    out_ref, vjp = _synergy_vjp(z, ctx, mask, params, heads)
    out, saved = synergy_reference_fwd(z, ctx, mask, params, heads)
    assert out.dtype == z.dtype and out.shape == z.shape
    assert rel_err(out, out_ref) <= FP32_TOL
    grads = synergy_reference_bwd(dz, z, ctx, mask, params, saved, heads)
    inputs = [z, ctx, *(params[n] for n in PARAM_NAMES)]
    for name, g, g_ref, t in zip(SYNERGY_GRADS, grads, vjp(dz), inputs, strict=True):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert not g.isnan().any(), name
        assert rel_err(g, g_ref) <= FP32_TOL, (name, rel_err(g, g_ref))
    # Padding gets no gradient where its group has a real token; a fully masked group
    # attends uniformly to all its tokens, as the reference does, so they all get one.
    has_real = mask.any(1, keepdim=True)
    assert not grads[1][~mask & has_real].any(), "padding tokens must get no gradient"
    for name, g, g_again in zip(SYNERGY_GRADS, grads, synergy_reference_bwd(dz, z, ctx, mask, params, saved, heads)):
        assert torch.equal(g, g_again), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_synergy_low_precision_inputs(dtype):
    z, ctx, mask, params, dz = synergy_inputs(3, 16, 32, 50, 2, 4, "one-group-fully-masked", dtype=dtype)
    p32 = {n: t.float() for n, t in params.items()}
    out32, vjp32 = _synergy_vjp(z.float(), ctx.float(), mask, p32, 2)
    out_lp, vjp_lp = _synergy_vjp(z, ctx, mask, params, 2, compute_dtype=dtype)
    out, saved = synergy_reference_fwd(z, ctx, mask, params, 2)
    assert out.dtype == dtype
    ok, errs = within_twice_torch_error(out, out32, out_lp, dtype)
    assert ok, errs
    grads = synergy_reference_bwd(dz, z, ctx, mask, params, saved, 2)
    inputs = [z, ctx, *(params[n] for n in PARAM_NAMES)]
    for name, g, g32, glp, t in zip(SYNERGY_GRADS, grads, vjp32(dz.float()), vjp_lp(dz), inputs):
        assert g.dtype == t.dtype, name
        ok, errs = within_twice_torch_error(g, g32, glp, dtype)
        assert ok, (name, errs)
