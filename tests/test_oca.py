"""OCA op: the Triton kernels (interpreted on CPU, native on CUDA) against reference.py."""

import pytest
import torch

import nearl_kernels as nk
from helpers import DEVICE, rel_err, within_twice_torch_error
from nearl_kernels.oca.ops import oca_bwd_triton, oca_fwd_triton
from nearl_kernels.oca.reference import down_project, oca_reference

GRAD_NAMES = ("x", "h", "z", "w_k", "w_v", "w_up", "b_up", "s_novel", "s_incr")


pytestmark = pytest.mark.usefixtures("poison")


def make_inputs(G, L, d, r=32, M=16, T=1, s_incr=0.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    x = rnd(G, L, d).to(dtype)
    args = dict(
        h=down_project(x, rnd(d, r, scale=d**-0.5), rnd(r, scale=0.1)),
        z=rnd(G // T, M, r), w_k=rnd(r, r, scale=r**-0.5), w_v=rnd(r, r, scale=r**-0.5),
        w_up=rnd(r, d, scale=0.2), b_up=rnd(d, scale=0.2),
        s_novel=torch.tensor(0.8, device=DEVICE), s_incr=torch.tensor(s_incr, device=DEVICE),
    )
    return x, args


SHAPES = [
    pytest.param(2, 1, 64, 1, 0.0, id="G2-L1-d64"),
    pytest.param(2, 7, 96, 1, 0.0, id="G2-L7-d96"),
    pytest.param(2, 9, 100, 1, 0.3, id="G2-L9-d100-incr"),
    pytest.param(4, 50, 96, 2, 0.0, id="G4-L50-d96-T2"),
    pytest.param(2, 77, 64, 2, 0.5, id="G2-L77-d64-T2-incr"),
    pytest.param(1, 197, 64, 1, 0.0, id="G1-L197-d64"),
    pytest.param(2, 7, 768, 1, 0.3, id="G2-L7-d768-incr"),
]


@pytest.mark.parametrize("G,L,d,T,s_incr", SHAPES)
def test_forward_and_every_gradient_match_reference_fp32(G, L, d, T, s_incr):
    x, a = make_inputs(G, L, d, T=T, s_incr=s_incr)
    y = oca_fwd_triton(x, *a.values(), 2, T, 1e-6)
    y_ref = oca_reference(x, *a.values(), 2, T, 1e-6)
    assert y.dtype == x.dtype and not y.isnan().any()
    assert rel_err(y, y_ref) <= 1e-4
    dy = torch.randn_like(y)
    grads = oca_bwd_triton(dy, x, *a.values(), 2, T, 1e-6)
    _, vjp = torch.func.vjp(lambda *t: oca_reference(*t, 2, T, 1e-6), x, *a.values())
    for name, g, g_ref in zip(GRAD_NAMES, grads, vjp(dy)):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert not g.isnan().any(), name
        assert rel_err(g, g_ref) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("G,L,d,T", [pytest.param(2, 50, 96, 2, id="G2-L50-d96-T2"), pytest.param(1, 7, 768, 1, id="G1-L7-d768")])
def test_low_precision_within_twice_torch_error(dtype, G, L, d, T):
    x, a = make_inputs(G, L, d, T=T, s_incr=0.2, dtype=dtype)
    x32 = x.float()
    h32 = a["h"].float()
    rest = [a[k] for k in GRAD_NAMES[2:]]
    y_ref = oca_reference(x32, h32, *rest, 2, T, 1e-6)
    y_torch = oca_reference(x, a["h"], *rest, 2, T, 1e-6, compute_dtype=dtype)
    y = oca_fwd_triton(x, a["h"], *rest, 2, T, 1e-6)
    assert y.dtype == dtype
    ok, errs = within_twice_torch_error(y, y_ref, y_torch, dtype)
    assert ok, errs

    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = oca_bwd_triton(dy, x, a["h"], *rest, 2, T, 1e-6)
    _, vjp32 = torch.func.vjp(lambda *t: oca_reference(*t, 2, T, 1e-6), x32, h32, *rest)
    _, vjp_lp = torch.func.vjp(lambda *t: oca_reference(*t, 2, T, 1e-6, compute_dtype=dtype), x, a["h"], *rest)
    for name, g, g32, glp in zip(GRAD_NAMES, grads, vjp32(dy.float()), vjp_lp(dy)):
        ok, errs = within_twice_torch_error(g, g32, glp, dtype)
        assert ok, (name, errs)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype


def test_noncontiguous_inputs():
    x, a = make_inputs(2, 7, 96)
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    h_nc = a["h"].transpose(0, 1).contiguous().transpose(0, 1)
    w_up_nc = a["w_up"].t().contiguous().t()
    assert not x_nc.is_contiguous() and not w_up_nc.is_contiguous()
    b = dict(a, h=h_nc, w_up=w_up_nc)
    y = oca_fwd_triton(x_nc, *b.values(), 2, 1, 1e-6)
    assert rel_err(y, oca_reference(x, *a.values(), 2, 1, 1e-6)) <= 1e-4
    dy = torch.randn_like(x)
    grads = oca_bwd_triton(dy, x_nc, *b.values(), 2, 1, 1e-6)
    _, vjp = torch.func.vjp(lambda *t: oca_reference(*t, 2, 1, 1e-6), x, *a.values())
    for name, g, g_ref in zip(GRAD_NAMES, grads, vjp(dy)):
        assert rel_err(g, g_ref) <= 1e-4, name


def test_gradients_bit_identical_across_runs():
    x, a = make_inputs(4, 50, 96, T=2, s_incr=0.1)
    dy = torch.randn_like(x)
    first = oca_bwd_triton(dy, x, *a.values(), 2, 2, 1e-6)
    second = oca_bwd_triton(dy, x, *a.values(), 2, 2, 1e-6)
    for name, g1, g2 in zip(GRAD_NAMES, first, second):
        assert torch.equal(g1, g2), name


def test_functional_api_autograd_matches_reference():
    x, a = make_inputs(2, 7, 96, T=1, s_incr=0.2)
    w_down = torch.randn(96, 32, device=DEVICE) / 10
    b_down = torch.zeros(32, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, a["z"], w_down, a["w_up"], a["s_novel"])]
    outs = []
    for fused in (True, False):
        for t in leaves:
            t.grad = None
        xl, zl, wdl, wul, snl = leaves
        y, h = nk.oca(xl, zl, wdl, b_down, a["w_k"], a["w_v"], wul, a["b_up"], snl, a["s_incr"], fused=fused)
        (y.square().sum() + h.sum()).backward()
        outs.append((y.detach(), [t.grad.clone() for t in leaves]))
    (y1, g1), (y2, g2) = outs
    assert rel_err(y1, y2) <= 1e-5
    for a_, b_ in zip(g1, g2):
        assert rel_err(a_, b_) <= 1e-4


def test_bad_inputs_named_before_launch():
    x, a = make_inputs(2, 7, 96)
    w_down, b_down = torch.zeros(96, 32), torch.zeros(32)
    args = [a["z"], w_down, b_down, a["w_k"], a["w_v"], a["w_up"], a["b_up"], a["s_novel"], a["s_incr"]]
    with pytest.raises(ValueError, match=r"d == w_down.shape\[0\]; got x \(2, 7, 96\) and w_down \(768, 32\)"):
        nk.oca(x, a["z"], torch.zeros(768, 32), *args[2:])
    with pytest.raises(ValueError, match="x must be \\(G, L, d\\); got shape \\(7, 96\\)"):
        nk.oca(x[0], *args)
    with pytest.raises(TypeError, match="x must be float64, float32, bfloat16 or float16; got torch.int64"):
        nk.oca(x.long(), *args)
    with pytest.raises(ValueError, match="r=32 must be a multiple of n_heads=3"):
        nk.oca(x, *args, n_heads=3)
    with pytest.raises(ValueError, match=r"adapter width r = w_down.shape\[1\] must be in \[1, 32\]; got 256"):
        nk.oca(x, torch.zeros(2, 16, 256), torch.zeros(96, 256), torch.zeros(256), torch.zeros(256, 256),
               torch.zeros(256, 256), torch.zeros(256, 96), *args[6:], n_heads=1)
    with pytest.raises(ValueError, match=r"M = z.shape\[1\] must be in \[1, 64\]; got 200"):
        nk.oca(x, torch.zeros(2, 200, 32), *args[1:])
    with pytest.raises(ValueError, match=r"r=32 with M=64 synergy queries is outside the compiled envelope"):
        nk.oca(x, torch.zeros(2, 64, 32), *args[1:])
    with pytest.raises(TypeError, match=r"oca\(fused=True\) runs float32, bfloat16 or float16; float64 is the reference"):
        nk.oca(x.double(), *(t.double() for t in args[:9]))
    with pytest.raises(ValueError, match="group_size must be a positive int dividing G=2; got 3"):
        nk.oca(x, *args, group_size=3)
    with pytest.raises(ValueError, match=r"z must be \(G // group_size, M, r\) = \(1, 16, 32\)"):
        nk.oca(x, *args, group_size=2)
    with pytest.raises(ValueError, match="all inputs must be on one device"):
        nk.oca(x, a["z"].to("meta"), *args[1:])


@pytest.mark.parametrize(
    "r,M,heads",
    [pytest.param(16, 7, 1, id="r16-M7-H1"), pytest.param(32, 32, 4, id="r32-M32-H4"), pytest.param(24, 5, 3, id="r24-M5-H3")],
)
def test_other_widths_heads_and_query_counts(r, M, heads):
    x, a = make_inputs(2, 9, 80, r=r, M=M, T=2, s_incr=0.1)
    y = oca_fwd_triton(x, *a.values(), heads, 2, 1e-6)
    assert rel_err(y, oca_reference(x, *a.values(), heads, 2, 1e-6)) <= 1e-4
    dy = torch.randn_like(x)
    grads = oca_bwd_triton(dy, x, *a.values(), heads, 2, 1e-6)
    _, vjp = torch.func.vjp(lambda *t: oca_reference(*t, heads, 2, 1e-6), x, *a.values())
    for name, g, g_ref in zip(GRAD_NAMES, grads, vjp(dy)):
        assert rel_err(g, g_ref) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_runs_the_up_projection_in_the_autocast_dtype(dtype):
    # Under autocast the residual stream stays fp32 and h arrives in the autocast dtype;
    # the fused op's dots run in that dtype, as the reference's matmuls do under the same autocast.
    x, a = make_inputs(2, 50, 96, T=2, s_incr=0.2)
    w_down = torch.randn(96, 32, device=DEVICE) / 10
    b_down = torch.randn(32, device=DEVICE) / 10
    rest = [a[k] for k in ("z", "w_k", "w_v", "w_up", "b_up", "s_novel", "s_incr")]
    leaves = [x, w_down, rest[3]]

    def run(fused, autocast):
        xs = [t.clone().requires_grad_() for t in leaves]
        with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
            y, _ = nk.oca(xs[0], rest[0], xs[1], b_down, rest[1], rest[2], xs[2], *rest[4:], group_size=2,
                          fused=fused)
        assert y.dtype == torch.float32
        y.backward(torch.ones_like(y) / y.numel() ** 0.5)
        return [y.detach()] + [t.grad for t in xs]

    ref32 = run(False, False)
    ref_autocast = run(False, True)
    fused = run(True, True)
    for name, out, r32, rlp in zip(("y", "dx", "dw_down", "dw_up"), fused, ref32, ref_autocast):
        ok, errs = within_twice_torch_error(out, r32, rlp, dtype)
        assert ok, (name, errs)
    # And it really is low precision: the fused output is not the fp32 result.
    assert not torch.equal(fused[0], ref32[0])
