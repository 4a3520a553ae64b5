"""USEformer block op: the Triton kernels (interpreted on CPU, native on CUDA) against reference.py."""

import pytest
import torch

import nearl_kernels as nk
from helpers import DEVICE, rel_err, within_twice_torch_error
from nearl_kernels.synergy import PARAM_NAMES
from nearl_kernels.synergy.ops import synergy_bwd_triton, synergy_fwd_triton
from nearl_kernels.synergy.reference import synergy_reference
from nearl_model.modules import USEformerBlock

pytestmark = pytest.mark.usefixtures("poison")
GRAD_NAMES = ("z", "ctx", *PARAM_NAMES)


def make_inputs(G, Lc, r=32, M=16, heads=2, ffn_ratio=14, pad=0.3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    block = USEformerBlock(r, heads, ffn_ratio)
    params = [(getattr(block, n).detach() + 0.1 * torch.randn_like(getattr(block, n))).to(DEVICE) for n in PARAM_NAMES]
    z = torch.randn(G, M, r).to(DEVICE)
    ctx = (torch.randn(G, Lc, r) * 2).to(DEVICE, dtype)
    mask = torch.rand(G, Lc) >= pad
    mask[:, 0] = True
    return z, ctx, mask.to(DEVICE), params


def reference(z, ctx, mask, params, heads, **kw):
    return synergy_reference(z, ctx, mask, dict(zip(PARAM_NAMES, params)), heads, **kw)


SHAPES = [
    pytest.param(2, 1, 32, 16, 2, id="G2-Lc1-r32-M16"),
    pytest.param(3, 70, 32, 16, 2, id="G3-Lc70-r32-M16"),
    pytest.param(2, 217, 32, 16, 2, id="G2-Lc217-r32-M16"),
    pytest.param(2, 50, 16, 7, 1, id="G2-Lc50-r16-M7-H1"),
    pytest.param(2, 77, 24, 5, 3, id="G2-Lc77-r24-M5-H3"),
    pytest.param(2, 33, 32, 32, 4, id="G2-Lc33-r32-M32-H4"),
]


@pytest.mark.parametrize("G,Lc,r,M,heads", SHAPES)
def test_forward_and_every_gradient_match_reference_fp32(G, Lc, r, M, heads):
    z, ctx, mask, params = make_inputs(G, Lc, r, M, heads)
    out, o, lse = synergy_fwd_triton(z, ctx, mask, params, heads)
    assert out.dtype == z.dtype and not out.isnan().any()
    assert rel_err(out, reference(z, ctx, mask, params, heads)) <= 1e-4
    dz = torch.randn_like(out)
    grads = synergy_bwd_triton(dz, z, ctx, mask, params, o, lse, heads)
    _, vjp = torch.func.vjp(lambda z_, c_, *p: reference(z_, c_, mask, p, heads), z, ctx, *params)
    for name, g, g_ref in zip(GRAD_NAMES, grads, vjp(dz)):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        assert not g.isnan().any(), name
        assert rel_err(g, g_ref) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_context_within_twice_torch_error(dtype):
    z, ctx, mask, params = make_inputs(2, 90, dtype=dtype)
    out, o, lse = synergy_fwd_triton(z, ctx, mask, params, 2)
    ref32 = reference(z, ctx.float(), mask, params, 2)
    ok, errs = within_twice_torch_error(out, ref32, reference(z, ctx, mask, params, 2, compute_dtype=dtype), dtype)
    assert ok, errs
    dz = torch.randn_like(out)
    dctx = synergy_bwd_triton(dz, z, ctx, mask, params, o, lse, 2)[1]
    assert dctx.dtype == dtype
    _, vjp32 = torch.func.vjp(lambda c_: reference(z, c_, mask, params, 2), ctx.float())
    _, vjp_lp = torch.func.vjp(lambda c_: reference(z, c_, mask, params, 2, compute_dtype=dtype), ctx)
    ok, errs = within_twice_torch_error(dctx, vjp32(dz)[0], vjp_lp(dz)[0], dtype)
    assert ok, errs


@pytest.mark.parametrize("heads", [1, 2])
def test_fully_masked_group_matches_reference_fp32(heads):
    # Groups with no, one and every token masked: the reference's finfo.min fill makes the
    # last one a uniform softmax with no gradient through its scores.
    z, ctx, mask, params = make_inputs(3, 70, heads=heads, pad=0.0)
    mask[1, 5] = False
    mask[2] = False
    out, o, lse = synergy_fwd_triton(z, ctx, mask, params, heads)
    assert not out.isnan().any()
    assert rel_err(out, reference(z, ctx, mask, params, heads)) <= 1e-4
    dz = torch.randn_like(out)
    grads = synergy_bwd_triton(dz, z, ctx, mask, params, o, lse, heads)
    _, vjp = torch.func.vjp(lambda z_, c_, *p: reference(z_, c_, mask, p, heads), z, ctx, *params)
    for name, g, g_ref in zip(GRAD_NAMES, grads, vjp(dz)):
        assert not g.isnan().any(), name
        assert rel_err(g, g_ref) <= 1e-4, name
        if name in ("z", "ctx"):
            for i in range(3):
                assert rel_err(g[i], g_ref[i]) <= 1e-4, (name, i)


def test_context_splits_merge_exactly_whatever_their_masks():
    # Lc = 200 in 4 splits of 64 tokens (the last one of 8): group 0 has a split with every
    # token masked, group 1 real tokens in one split only, group 2 none at all.
    from nearl_kernels.synergy.ops import context_splits

    assert context_splits(200, 16) == (4, 64)
    z, ctx, mask, params = make_inputs(3, 200, pad=0.0)
    mask[0, 64:128] = False
    mask[1] = False
    mask[1, 130:136] = True
    mask[2] = False
    out, o, lse = synergy_fwd_triton(z, ctx, mask, params, 2)
    ref = reference(z, ctx, mask, params, 2)
    for i in range(3):
        assert rel_err(out[i], ref[i]) <= 1e-4, i
    dz = torch.randn_like(out)
    grads = synergy_bwd_triton(dz, z, ctx, mask, params, o, lse, 2)
    _, vjp = torch.func.vjp(lambda z_, c_, *p: reference(z_, c_, mask, p, 2), z, ctx, *params)
    for name, g, g_ref in zip(GRAD_NAMES, grads, vjp(dz)):
        assert rel_err(g, g_ref) <= 1e-4, name


def test_splits_depend_on_the_shape_only():
    # At least 4 blocks of 16 tokens per split, at most 64 splits per group: the benchmark's
    # 261 tokens make 5 splits; a long paired context is capped, never one program per block.
    from nearl_kernels.synergy.ops import MAX_SPLITS, context_splits

    assert context_splits(1, 16) == (1, 64)
    assert context_splits(261, 16) == (5, 64)
    ns, ch = context_splits(154_257, 16)
    assert ns <= MAX_SPLITS and ns * ch >= 154_257 and ch % 16 == 0 and (ns - 1) * ch < 154_257


def test_low_precision_queries_and_context():
    # z and ctx in bf16 both: fp32 maths inside, outputs in the inputs' dtypes.
    z, ctx, mask, params = make_inputs(2, 50, dtype=torch.bfloat16)
    z = z.to(torch.bfloat16)
    out, o, lse = synergy_fwd_triton(z, ctx, mask, params, 2)
    assert out.dtype == torch.bfloat16
    ref32 = reference(z.float(), ctx.float(), mask, params, 2)
    ok, errs = within_twice_torch_error(out, ref32, reference(z, ctx, mask, params, 2, compute_dtype=torch.bfloat16),
                                        torch.bfloat16)
    assert ok, errs
    dz, dctx = synergy_bwd_triton(torch.randn_like(out), z, ctx, mask, params, o, lse, 2)[:2]
    assert dz.dtype == dctx.dtype == torch.bfloat16
    assert not dz.isnan().any() and not dctx.isnan().any()


def test_launchers_need_no_data():
    # The compile gate calls the launchers on meta tensors with launches intercepted: no
    # host syncs, no data-dependent Python, and only tiles among the kernels' constexprs.
    from nearl_kernels._launch_hook import intercept_launches

    seen = []
    z = torch.empty(3, 7, 24, device="meta")
    ctx = torch.empty(3, 257, 24, device="meta", dtype=torch.bfloat16)
    mask = torch.empty(3, 257, device="meta", dtype=torch.bool)
    shapes = dict(w_q=(24, 24), w_k=(24, 24), w_v=(24, 24), w_o=(24, 24), w_1=(24, 336), b_1=(336,), w_2=(336, 24))
    params = [torch.empty(shapes.get(n, (24,)), device="meta") for n in PARAM_NAMES]
    with intercept_launches(lambda launch: seen.append(launch)):
        out, o, lse = synergy_fwd_triton(z, ctx, mask, params, 3)
        grads = synergy_bwd_triton(torch.empty_like(out), z, ctx, mask, params, o, lse, 3)
    names = ["synergy_fwd_split_kernel", "synergy_fwd_combine_kernel", "synergy_bwd_ffn_kernel",
             "synergy_bwd_tail_kernel", "synergy_bwd_ctx_kernel", "synergy_bwd_finish_kernel"]
    assert [launch.name for launch in seen] == names
    # Forward and backward spread the 257 context tokens over 5 splits of 4 blocks of 16 per
    # group, and the FFN backward the 336 hidden units over programs.
    assert [launch.grid for launch in seen] == [(3 * 5,), (3,), (3 * 21,), (3,), (3 * 5,), (3,)]
    assert (seen[0].arguments["NS"], seen[0].arguments["CH"]) == (5, 64)
    for launch in seen:
        args = launch.arguments
        assert (args["M"], args["R"]) == (7, 24)
        assert (args.get("Lc", 257), args.get("F", 336), args.get("H", 3)) == (257, 336, 3)
        assert (args["BM"], args["BR"]) == (32, 32)
    assert out.shape == z.shape and grads[1].dtype == torch.bfloat16


def test_padding_is_invisible():
    # A masked token's values must not change the result, whatever they are.
    z, ctx, mask, params = make_inputs(2, 40)
    noisy = torch.where(mask[..., None], ctx, ctx * 100 + 7)
    a, _, _ = synergy_fwd_triton(z, ctx, mask, params, 2)
    b, _, _ = synergy_fwd_triton(z, noisy, mask, params, 2)
    assert rel_err(a, b) <= 1e-5


def test_gradients_bit_identical_across_runs():
    z, ctx, mask, params = make_inputs(3, 70)
    out, o, lse = synergy_fwd_triton(z, ctx, mask, params, 2)
    dz = torch.randn_like(out)
    first = synergy_bwd_triton(dz, z, ctx, mask, params, o, lse, 2)
    second = synergy_bwd_triton(dz, z, ctx, mask, params, o, lse, 2)
    for name, g1, g2 in zip(GRAD_NAMES, first, second):
        assert torch.equal(g1, g2), name


def test_functional_api_autograd_matches_reference():
    z, ctx, mask, params = make_inputs(2, 30)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (z, ctx, *params)]
        out = nk.synergy_block(leaves[0], leaves[1], mask, dict(zip(PARAM_NAMES, leaves[2:])), n_heads=2, fused=fused)
        out.square().sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (o1, g1), (o2, g2) = results
    assert rel_err(o1, o2) <= 1e-5
    for name, a, b in zip(GRAD_NAMES, g1, g2):
        assert rel_err(a, b) <= 1e-4, name


def test_bad_inputs_named_before_launch():
    z, ctx, mask, params = make_inputs(2, 10)
    p = dict(zip(PARAM_NAMES, params))
    with pytest.raises(ValueError, match=r"ctx must be \(G, Lc, r\) with G=2, r=32, Lc >= 1; got \(2, 10, 16\)"):
        nk.synergy_block(z, ctx[..., :16], mask, p)
    with pytest.raises(TypeError, match="ctx_mask must be a bool tensor"):
        nk.synergy_block(z, ctx, mask.float(), p)
    with pytest.raises(ValueError, match=r"ctx_mask must be \(G, Lc\)"):
        nk.synergy_block(z, ctx, mask[:, :5], p)
    with pytest.raises(ValueError, match="params is missing \\['w_o'\\]"):
        nk.synergy_block(z, ctx, mask, {k: v for k, v in p.items() if k != "w_o"})
    with pytest.raises(ValueError, match=r"params\['w_2'\] must be \(448, 32\)"):
        nk.synergy_block(z, ctx, mask, dict(p, w_2=torch.zeros(448, 16)))
    with pytest.raises(ValueError, match="r=32 must be a multiple of n_heads=5"):
        nk.synergy_block(z, ctx, mask, p, n_heads=5)
    with pytest.raises(ValueError, match=r"M = z.shape\[1\] must be in \[1, 32\]; got 33"):
        nk.synergy_block(torch.zeros(2, 33, 32), ctx, mask, p)
    with pytest.raises(ValueError, match=r"adapter width r = z.shape\[2\] must be in \[1, 32\]; got 64"):
        nk.synergy_block(torch.zeros(2, 16, 64), torch.zeros(2, 10, 64), mask, p)
