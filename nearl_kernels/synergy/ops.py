"""USEformer block: input checks, launchers, autograd Function, custom ops, functional API.

Layering (STYLE.md): kernels.py (raw Triton) -> launchers here -> the
``nearl::synergy_fwd`` / ``nearl::synergy_bwd`` custom ops (CPU: reference
maths; CUDA, or CPU under TRITON_INTERPRET=1: Triton) -> ``SynergyFunction``
-> ``synergy_block()``.
"""

import math
from typing import List, Mapping, Tuple

import torch

from .._checks import check_heads, check_same_device, check_shape, check_tensor
from .._dispatch import no_autocast, new_output, next_pow2, use_triton
from ..audit import launch
from .kernels import synergy_bwd_kernel, synergy_fwd_kernel
from .reference import PARAM_NAMES, synergy_reference

MAX_HEAD_WIDTH = 128
MAX_QUERIES = 128


def _param_shapes(r: int, hidden: int) -> dict:
    shapes = {name: (r,) for name in PARAM_NAMES}
    shapes.update(w_q=(r, r), w_k=(r, r), w_v=(r, r), w_o=(r, r), w_1=(r, hidden), b_1=(hidden,), w_2=(hidden, r))
    return shapes


def _check_synergy_inputs(z, ctx, ctx_mask, params, n_heads) -> List[torch.Tensor]:
    check_tensor("z", z, 3, "(G, M, r)")
    check_tensor("ctx", ctx, 3, "(G, Lc, r)")
    G, M, r = z.shape
    rh = check_heads(r, n_heads)
    if not 1 <= rh <= MAX_HEAD_WIDTH:
        raise ValueError(f"head width r / n_heads must be in [1, {MAX_HEAD_WIDTH}]; got {rh}")
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


def _launch_meta(z, ctx, params):
    G, M, r = z.shape
    hidden = params[PARAM_NAMES.index("w_1")].shape[1]
    return dict(M=M, R=r, F=hidden, BM=next_pow2(M), BR=next_pow2(r), BC=64, BF=min(64, next_pow2(hidden)))


def _pack(params: List[torch.Tensor]) -> torch.Tensor:
    # One fp32 buffer for the block's 18 tensors keeps the kernel signature short.
    return torch.cat([p.detach().float().reshape(-1) for p in params])


@no_autocast
def synergy_fwd_triton(z, ctx, ctx_mask, params, n_heads):
    """Launch synergy_fwd_kernel: (z_new, o, lse); o and lse are what backward needs."""
    z, ctx = z.contiguous(), ctx.contiguous()
    mask = ctx_mask.contiguous().view(torch.uint8)
    G, M, r = z.shape
    packed = _pack(params)
    out = new_output(*z.shape, like=z)
    o = new_output(G, M, r, like=z, dtype=torch.float32)
    lse = new_output(G, M, r, like=z, dtype=torch.float32)
    launch(
        synergy_fwd_kernel, (G,), dict(z=z, ctx=ctx, ctx_mask=mask, params=packed, out=out, o=o, lse=lse),
        z, ctx, mask, packed, out, o, lse, ctx.shape[1], 1.0 / math.sqrt(r // n_heads),
        RH=r // n_heads, H=n_heads, num_warps=4, **_launch_meta(z, ctx, params),
    )
    return out, o, lse


@no_autocast
def synergy_bwd_triton(dz, z, ctx, ctx_mask, params, o, lse, n_heads):
    """Launch synergy_bwd_kernel; per-group partial weight gradients are summed in a fixed order."""
    dz, z, ctx = dz.contiguous(), z.contiguous(), ctx.contiguous()
    mask = ctx_mask.contiguous().view(torch.uint8)
    G, M, r = z.shape
    packed = _pack(params)
    dz_out, dctx = new_output(*z.shape, like=z), new_output(*ctx.shape, like=ctx)
    dparts = new_output(G, packed.numel(), like=z, dtype=torch.float32)
    tensors = dict(dout=dz, z=z, ctx=ctx, ctx_mask=mask, params=packed, o=o, lse=lse,
                   dz=dz_out, dctx=dctx, dparams=dparts)
    launch(
        synergy_bwd_kernel, (G,), tensors,
        dz, z, ctx, mask, packed, o, lse, dz_out, dctx, dparts, ctx.shape[1], 1.0 / math.sqrt(r // n_heads),
        RH=r // n_heads, H=n_heads, P=packed.numel(), num_warps=4, **_launch_meta(z, ctx, params),
    )
    dflat = dparts.sum(0)
    grads, start = [], 0
    for p in params:
        grads.append(dflat[start : start + p.numel()].view_as(p).to(p.dtype, copy=True))
        start += p.numel()
    return [dz_out, dctx, *grads]


@torch.library.custom_op("nearl::synergy_fwd", mutates_args=())
def synergy_fwd(z: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor, params: List[torch.Tensor],
                n_heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_new, o, lse): the kernels save the attention output and log-sum-exp for backward;
    the reference path, whose backward is a vjp, returns them empty."""
    if use_triton(z):
        return synergy_fwd_triton(z, ctx, ctx_mask, params, n_heads)
    empty = z.new_empty(0, dtype=torch.float32)
    return synergy_reference(z, ctx, ctx_mask, _as_params(params), n_heads), empty, empty.clone()


@synergy_fwd.register_fake
def _synergy_fwd_fake(z, ctx, ctx_mask, params, n_heads):
    saved = z.shape if use_triton(z) else (0,)
    return torch.empty_like(z), z.new_empty(saved, dtype=torch.float32), z.new_empty(saved, dtype=torch.float32)


@torch.library.custom_op("nearl::synergy_bwd", mutates_args=())
def synergy_bwd(dz: torch.Tensor, z: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor,
                params: List[torch.Tensor], o: torch.Tensor, lse: torch.Tensor, n_heads: int) -> List[torch.Tensor]:
    """Gradients for [z, ctx, *params] in PARAM_NAMES order."""
    if use_triton(z):
        return synergy_bwd_triton(dz, z, ctx, ctx_mask, params, o, lse, n_heads)
    # Without Triton the backward is the vjp of the reference: the maths exists once.
    _, vjp = torch.func.vjp(
        lambda z_, c_, *p: synergy_reference(z_, c_, ctx_mask, _as_params(p), n_heads), z, ctx, *params
    )
    return [g.clone() for g in vjp(dz.to(z.dtype))]


@synergy_bwd.register_fake
def _synergy_bwd_fake(dz, z, ctx, ctx_mask, params, o, lse, n_heads):
    return [torch.empty_like(t) for t in (z, ctx, *params)]


class SynergyFunction(torch.autograd.Function):
    """Autograd glue for one USEformer block; the mask gets no gradient."""

    @staticmethod
    def forward(ctx_, z, ctx, ctx_mask, n_heads, *params):
        out, o, lse = torch.ops.nearl.synergy_fwd(z, ctx, ctx_mask, list(params), n_heads)
        ctx_.save_for_backward(z, ctx, ctx_mask, o, lse, *params)
        ctx_.n_heads = n_heads
        return out

    @staticmethod
    def backward(ctx_, dz):
        z, ctx, ctx_mask, o, lse, *params = ctx_.saved_tensors
        dz_, dctx, *dparams = torch.ops.nearl.synergy_bwd(dz.contiguous(), z, ctx, ctx_mask, params, o, lse, ctx_.n_heads)
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
        return SynergyFunction.apply(z, ctx, ctx_mask, n_heads, *flat)
    return synergy_reference(z, ctx, ctx_mask, params, n_heads)
