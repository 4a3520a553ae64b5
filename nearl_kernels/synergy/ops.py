"""USEformer block: input checks, launchers, autograd Function, custom ops, functional API.

Layering (STYLE.md): kernels.py (raw Triton) -> launchers here -> the
``nearl::synergy_fwd`` / ``nearl::synergy_bwd`` triton ops (CPU: reference
maths; CUDA, or CPU under TRITON_INTERPRET=1: Triton) -> ``SynergyFunction``
-> ``synergy_block()``.
"""

import math
from typing import List, Mapping, Tuple

import torch
import triton

from .._checks import (check_fusable, check_heads, check_same_device, check_shape, check_tensor,
                       reference_dtype)
from .._dispatch import eager_cpu, launch, new_output, next_pow2, no_autocast, use_triton
from .kernels import (synergy_bwd_ctx_kernel, synergy_bwd_ffn_kernel, synergy_bwd_finish_kernel,
                      synergy_bwd_tail_kernel, synergy_fwd_combine_kernel, synergy_fwd_split_kernel)
from .reference import PARAM_NAMES, synergy_reference, synergy_reference_bwd, synergy_reference_fwd

# The CPU path computes in fp32 whatever the caller's autocast state.
_cpu_fwd, _cpu_bwd = no_autocast(synergy_reference_fwd), no_autocast(synergy_reference_bwd)

# One program holds a group's (M, r) queries, its per-head softmax state and, in
# the backward, their gradients in registers. Within these bounds every tile
# configuration below compiles without register spills for sm_80 and sm_90
# (ptxas -v, every z/ctx dtype pair); the backward of r = 64 (BR = 64) or of
# M = 64 with r > 16 does not fit in 255 registers per thread.
MAX_WIDTH = 32
MAX_QUERIES = 32

# (BR, BM) -> (BC, BF, num_warps, num_stages): context block, FFN hidden chunk,
# warps and pipeline stages per query tile. Exact fp32 dots are FMA dots, whose
# operands every thread holds along the whole contraction, so the blocks are
# small and 8 warps share the work; maxnreg=255 stops ptxas from capping 8 warps
# at 128 registers (two programs per SM) by spilling. A width of 17..32 takes
# the BM = 32 tile for any M: its backward with BM = 16 does not fit. Each entry
# compiles spill-free for sm_80 and sm_90, for every z/ctx dtype pair.
_TILES = {
    (16, 16): (16, 16, 8, 1),
    (16, 32): (16, 16, 8, 1),
    (32, 32): (16, 16, 8, 1),
}


def _param_shapes(r: int, hidden: int) -> dict:
    shapes = {name: (r,) for name in PARAM_NAMES}
    shapes.update(w_q=(r, r), w_k=(r, r), w_v=(r, r), w_o=(r, r), w_1=(r, hidden), b_1=(hidden,), w_2=(hidden, r))
    return shapes


def _check_synergy_inputs(z, ctx, ctx_mask, params, n_heads) -> List[torch.Tensor]:
    check_tensor("z", z, 3, "(G, M, r)")
    check_tensor("ctx", ctx, 3, "(G, Lc, r)")
    G, M, r = z.shape
    if not 1 <= r <= MAX_WIDTH:
        raise ValueError(f"adapter width r = z.shape[2] must be in [1, {MAX_WIDTH}]; got {r}")
    check_heads(r, n_heads)
    if not 1 <= M <= MAX_QUERIES:
        raise ValueError(f"the number of synergy queries M = z.shape[1] must be in [1, {MAX_QUERIES}]; got {M}")
    if ctx.shape[0] != G or ctx.shape[2] != r or ctx.shape[1] < 1:
        raise ValueError(f"ctx must be (G, Lc, r) with G={G}, r={r}, Lc >= 1; got {tuple(ctx.shape)}")
    if not isinstance(ctx_mask, torch.Tensor) or ctx_mask.dtype != torch.bool:
        raise TypeError(f"ctx_mask must be a bool tensor (G, Lc); got {getattr(ctx_mask, 'dtype', type(ctx_mask))}")
    check_shape("ctx_mask", ctx_mask, ctx.shape[:2], "(G, Lc)")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of the names {PARAM_NAMES}; got {type(params).__name__}")
    missing = [k for k in PARAM_NAMES if k not in params]
    if missing:
        raise ValueError(f"params is missing {missing}; a USEformer block needs {PARAM_NAMES}")
    hidden = params["w_1"].shape[-1]
    shapes = _param_shapes(r, hidden)
    for name in PARAM_NAMES:
        check_tensor(f"params[{name!r}]", params[name], len(shapes[name]), str(shapes[name]))
        check_shape(f"params[{name!r}]", params[name], shapes[name], str(shapes[name]))
    check_same_device(z=z, ctx=ctx, ctx_mask=ctx_mask, w_q=params["w_q"])
    return [params[k] for k in PARAM_NAMES]


def _as_params(flat: List[torch.Tensor]) -> dict:
    return dict(zip(PARAM_NAMES, flat))


def _launch_meta(z, params, n_heads):
    """Runtime sizes (never compile-time: one kernel per tile configuration serves them
    all) and the tile configuration for one launch."""
    G, M, r = z.shape
    BR = next_pow2(r)
    BM = min(bm for br, bm in _TILES if br == BR and bm >= M)
    BC, BF, num_warps, num_stages = _TILES[BR, BM]
    hidden = params[PARAM_NAMES.index("w_1")].shape[1]
    sizes = dict(M=M, R=r, F=hidden, H=n_heads)
    return sizes, dict(BM=BM, BR=BR, BC=BC, BF=BF, num_warps=num_warps, num_stages=num_stages, maxnreg=255)


# The forward spreads a group's context over programs of at least MIN_SPLIT_BLOCKS
# context blocks each, and at most MAX_SPLITS per group (the combine walks them):
# G = 64 groups of Lc = 261 launch 64 x 5 programs, not 64. The split depends on
# the shape only, never on the GPU, so every device sums in the same order.
MIN_SPLIT_BLOCKS = 4
MAX_SPLITS = 64


def context_splits(Lc: int, BC: int) -> Tuple[int, int]:
    """(splits per group, tokens per split): whole context blocks per split."""
    blocks = triton.cdiv(Lc, BC)
    per_split = max(MIN_SPLIT_BLOCKS, triton.cdiv(blocks, MAX_SPLITS))
    return triton.cdiv(blocks, per_split), per_split * BC


def _pack(params: List[torch.Tensor]) -> torch.Tensor:
    # One fp32 buffer for the block's 17 parameters keeps the kernel signature short.
    return torch.cat([p.detach().float().reshape(-1) for p in params])


@no_autocast
def synergy_fwd_triton(z, ctx, ctx_mask, params, n_heads):
    """Launch the forward: the attention per (group, context split), then per group the
    fixed-order merge of the splits and the queries' tail. (z_new, o, lse); o and lse are
    what backward needs."""
    z, ctx = z.contiguous(), ctx.contiguous()
    mask = ctx_mask.contiguous().view(torch.uint8)
    G, M, r = z.shape
    Lc = ctx.shape[1]
    packed = _pack(params)
    out = new_output(*z.shape, like=z)
    f32 = dict(like=z, dtype=torch.float32)
    o, lse = new_output(G, M, r, **f32), new_output(G, M, r, **f32)
    sizes, tiles = _launch_meta(z, params, n_heads)
    BM, BR, BC, BF = (tiles[k] for k in ("BM", "BR", "BC", "BF"))
    opts = dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], maxnreg=tiles["maxnreg"])
    NS, CH = context_splits(Lc, BC)
    m_part, l_part, acc_part = (new_output(G, NS, M, r, **f32) for _ in range(3))
    launch(synergy_fwd_split_kernel, (G * NS,), z, ctx, mask, packed, m_part, l_part, acc_part, Lc, NS, CH, M, r,
           n_heads, scale=1.0 / math.sqrt(r // n_heads), BM=BM, BR=BR, BC=BC, **opts)
    launch(synergy_fwd_combine_kernel, (G,), z, packed, m_part, l_part, acc_part, out, o, lse, NS, M, r,
           sizes["F"], BM=BM, BR=BR, BF=BF, **opts)
    return out, o, lse


def _unpack(flat: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
    """Per-parameter views of the packed gradient (``_pack``'s layout); a copy only for a non-fp32 parameter."""
    grads, start = [], 0
    for p in params:
        grads.append(flat[start : start + p.numel()].view_as(p).to(p.dtype))
        start += p.numel()
    return grads


def synergy_bwd_triton(dz, z, ctx, ctx_mask, params, o, lse, n_heads):
    """Gradients for [z, ctx, *params]: :func:`synergy_bwd_packed`, the parameters' as views."""
    dz_, dctx, dflat = synergy_bwd_packed(dz, z, ctx, ctx_mask, params, o, lse, n_heads)
    return [dz_, dctx, *_unpack(dflat, params)]


@no_autocast
def synergy_bwd_packed(dz, z, ctx, ctx_mask, params, o, lse, n_heads):
    """Launch the four backward kernels (FFN chunks, tail, context splits, finish); the per-group
    partial weight gradients are then summed in a fixed order. Returns dz, dctx and the parameters'
    gradients packed as ``_pack`` packs them (fp32): one buffer, where 17 separate outputs would
    cost 17 copies per call (a custom op's outputs may not alias each other)."""
    dz, z, ctx = dz.contiguous(), z.contiguous(), ctx.contiguous()
    mask = ctx_mask.contiguous().view(torch.uint8)
    G, M, r = z.shape
    Lc = ctx.shape[1]
    packed = _pack(params)
    P = packed.numel()
    sizes, tiles = _launch_meta(z, params, n_heads)
    BM, BR, BC, BF = (tiles[k] for k in ("BM", "BR", "BC", "BF"))
    opts = dict(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], maxnreg=tiles["maxnreg"])
    f32 = dict(like=z, dtype=torch.float32)
    # dz is accumulated in fp32 by the kernels (dL/dz1 first, then the query path), then cast.
    dz_out, dctx = new_output(G, M, r, **f32), new_output(*ctx.shape, like=ctx)
    q, do, delta = (new_output(G, M, r, **f32) for _ in range(3))
    dparts = new_output(G, P, **f32)
    F = sizes["F"]
    NF = triton.cdiv(F, BF)
    dln2_part = new_output(G, NF, M, r, **f32)
    launch(synergy_bwd_ffn_kernel, (G * NF,), dz, z, packed, o, dln2_part, dparts, NF, M, r, F, P,
           BM=BM, BR=BR, BF=BF, **opts)
    launch(synergy_bwd_tail_kernel, (G,), dz, z, packed, o, dln2_part, dz_out, q, do, delta, dparts, NF, M, r, F,
           n_heads, P, BM=BM, BR=BR, **opts)
    NC, CH = context_splits(Lc, BC)
    Q = 2 * r * r + 3 * r
    dq_part, dw_part = new_output(G, NC, M, r, **f32), new_output(G, NC, Q, **f32)
    launch(synergy_bwd_ctx_kernel, (G * NC,), ctx, mask, packed, q, do, delta, lse, dctx, dq_part, dw_part, Lc, NC,
           CH, M, r, n_heads, Q, scale=1.0 / math.sqrt(r // n_heads), BM=BM, BR=BR, BC=BC, **opts)
    launch(synergy_bwd_finish_kernel, (G,), z, packed, dq_part, dw_part, dz_out, dparts, NC, M, r, F, n_heads, P, Q,
           BM=BM, BR=BR, **opts)
    return dz_out.to(z.dtype), dctx, dparts.sum(0)


@torch.library.triton_op("nearl::synergy_fwd", mutates_args=())
def synergy_fwd(z: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor, params: List[torch.Tensor],
                n_heads: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(z_new, saved): what backward needs, the attention output and log-sum-exp for the
    kernels, the tensors synergy_reference_fwd saves for the CPU's analytic backward."""
    if use_triton(z):
        out, o, lse = synergy_fwd_triton(z, ctx, ctx_mask, params, n_heads)
        return out, [o, lse]
    return _cpu_fwd(z, ctx, ctx_mask, _as_params(params), n_heads)


@synergy_fwd.register_fake
def _synergy_fwd_fake(z, ctx, ctx_mask, params, n_heads):
    if use_triton(z):
        return torch.empty_like(z), [z.new_empty(z.shape, dtype=torch.float32) for _ in range(2)]
    # The reference forward on fake tensors: the saved tensors' shapes come from the one place that makes them.
    return _cpu_fwd(z, ctx, ctx_mask, _as_params(params), n_heads)


@torch.library.triton_op("nearl::synergy_bwd", mutates_args=())
def synergy_bwd(dz: torch.Tensor, z: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                params: List[torch.Tensor], saved: List[torch.Tensor], n_heads: int) -> List[torch.Tensor]:
    """[dz, dctx, dparams]: dparams the parameters' gradients packed in PARAM_NAMES order (fp32);
    ``saved`` is synergy_fwd's second output."""
    if use_triton(z):
        o, lse = saved
        return list(synergy_bwd_packed(dz, z, ctx, ctx_mask, params, o, lse, n_heads))
    dz_, dctx, *dparams = _cpu_bwd(dz, z, ctx, ctx_mask, _as_params(params), saved, n_heads)
    return [dz_, dctx, _pack(dparams)]


@synergy_bwd.register_fake
def _synergy_bwd_fake(dz, z, ctx, ctx_mask, params, saved, n_heads):
    return [torch.empty_like(z), torch.empty_like(ctx), z.new_empty(sum(p.numel() for p in params),
                                                                    dtype=torch.float32)]



class SynergyFunction(torch.autograd.Function):
    """Autograd glue for one USEformer block; the mask gets no gradient."""

    @staticmethod
    def forward(ctx_, z, ctx, ctx_mask, n_heads, *params):
        if eager_cpu(z):
            out, saved = _cpu_fwd(z, ctx, ctx_mask, _as_params(params), n_heads)
        else:
            out, saved = torch.ops.nearl.synergy_fwd(z, ctx, ctx_mask, list(params), n_heads)
        ctx_.save_for_backward(z, ctx, ctx_mask, *params, *saved)
        ctx_.n_heads = n_heads
        return out

    @staticmethod
    def backward(ctx_, dz):
        z, ctx, ctx_mask, *rest = ctx_.saved_tensors
        params, saved = rest[: len(PARAM_NAMES)], rest[len(PARAM_NAMES) :]
        if eager_cpu(dz):
            dz_, dctx, *dparams = _cpu_bwd(dz, z, ctx, ctx_mask, _as_params(params), saved, ctx_.n_heads)
        else:
            dz_, dctx, dflat = torch.ops.nearl.synergy_bwd(dz.contiguous(), z, ctx, ctx_mask, params, saved,
                                                           ctx_.n_heads)
            dparams = _unpack(dflat, params)
        return (dz_, dctx, None, None, *dparams)


def synergy_block(
    z: torch.Tensor,
    ctx: torch.Tensor,
    ctx_mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    n_heads: int = 2,
    fused: bool = True,
) -> torch.Tensor:
    """One USEformer block: the synergy queries attend to their group's context.

    Args:
        z: synergy queries (G, M, r).
        ctx: context (G, Lc, r), the group's down-projected image and text tokens.
        ctx_mask: (G, Lc) bool, True for real tokens (text padding is False).
        params: tensors by the names in ``nearl_kernels.synergy.PARAM_NAMES``:
            LayerNorms (r,), q/k/v/o (r, r), biases (r,) for q/v/o, FFN w_1 (r, f*r),
            b_1 (f*r,), w_2 (f*r, r), b_2 (r,).
        fused: route through the ``nearl::synergy_*`` custom ops (Triton on
            CUDA); False calls the reference maths directly.

    Returns:
        the updated queries (G, M, r), dtype of z.

    Example:
        >>> z = synergy_block(z, torch.cat([h_v, h_t], 1), mask, block.params(), n_heads=2)
    """
    flat = _check_synergy_inputs(z, ctx, ctx_mask, params, n_heads)
    if fused:
        check_fusable("synergy_block", z, ctx, *flat)
        return SynergyFunction.apply(z, ctx, ctx_mask, n_heads, *flat)
    return synergy_reference(z, ctx, ctx_mask, params, n_heads, compute_dtype=reference_dtype(z))
