"""OCA: input checks, launchers, autograd Function, custom ops, functional API.

Layering (STYLE.md): kernels.py (raw Triton) -> launchers here -> the
``nearl::oca_fwd`` / ``nearl::oca_bwd`` custom ops (CPU: reference maths;
CUDA, or CPU under TRITON_INTERPRET=1: Triton) -> ``OCAFunction`` -> ``oca()``.
"""

import math
from typing import Optional, Tuple

import torch
import triton

from .._checks import check_heads, check_same_device, check_shape, check_tensor
from .._dispatch import no_autocast, interpreting, is_low_precision, new_output, next_pow2, use_triton
from ..audit import launch
from .kernels import oca_bwd_dwu_kernel, oca_bwd_kernel, oca_fwd_kernel
from .reference import down_project, oca_reference

# The kernels hold a (BLOCK_L, r) query tile and a (M, r) key/value tile in
# registers; these bounds keep them there on every GPU we target.
MAX_HEAD_WIDTH = 128
MAX_QUERIES = 128


def _check_oca_inputs(x, z, w_down, b_down, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, h):
    check_tensor("x", x, 3, "(G, L, d)")
    check_tensor("z", z, 3, "(G // group_size, M, r)")
    check_tensor("w_down", w_down, 2, "(d, r)")
    G, L, d = x.shape
    if w_down.shape[0] != d:
        raise ValueError(
            f"x must be (G, L, d) with d == w_down.shape[0]; got x {tuple(x.shape)} and w_down {tuple(w_down.shape)}"
        )
    r = w_down.shape[1]
    rh = check_heads(r, n_heads)
    if not 1 <= rh <= MAX_HEAD_WIDTH:
        raise ValueError(f"head width r / n_heads must be in [1, {MAX_HEAD_WIDTH}]; got {rh}")
    if not isinstance(group_size, int) or group_size < 1 or G % group_size:
        raise ValueError(f"group_size must be a positive int dividing G={G}; got {group_size!r}")
    M = z.shape[1]
    if not 1 <= M <= MAX_QUERIES:
        raise ValueError(f"the number of synergy queries M = z.shape[1] must be in [1, {MAX_QUERIES}]; got {M}")
    check_shape("z", z, (G // group_size, M, r), "(G // group_size, M, r)")
    for name, t, shape, doc in (
        ("b_down", b_down, (r,), "(r,)"),
        ("w_k", w_k, (r, r), "(r, r)"),
        ("w_v", w_v, (r, r), "(r, r)"),
        ("w_up", w_up, (r, d), "(r, d)"),
        ("b_up", b_up, (d,), "(d,)"),
        ("s_novel", s_novel, (), "a 0-dim tensor"),
        ("s_incr", s_incr, (), "a 0-dim tensor"),
    ):
        check_tensor(name, t, len(shape), doc)
        check_shape(name, t, shape, doc)
    if h is not None:
        check_tensor("h", h, 3, "(G, L, r)")
        check_shape("h", h, (G, L, r), "(G, L, r)")
    check_same_device(x=x, z=z, w_down=w_down, w_up=w_up)


def _tile_config(d: int, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps): full rows of d in registers, 16 to 64 rows (tl.dot needs 16).

    The backward holds five (BLOCK_L, BLOCK_D) fp32 tiles to the forward's
    three, so it gets twice the warps. A heuristic: no GPU has tuned it yet.
    """
    block_d = next_pow2(d)
    block_l = max(16, min(64, 8192 // block_d))
    warps = 4 if block_l * block_d <= 8192 else 8
    return block_l, block_d, 2 * warps if backward else warps


def _kv(z, w_k, w_v):
    # Once per group, not per token: (Gz, M, r) keys and values in fp32.
    zf = z.float()
    return (zf @ w_k.float()).contiguous(), (zf @ w_v.float()).contiguous()


def _scales(s_novel, s_incr):
    return torch.stack([s_novel.detach().float(), s_incr.detach().float()])


@no_autocast
def oca_fwd_triton(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps):
    """Launch oca_fwd_kernel: y (G, L, d) in x.dtype."""
    x, h, w_up = x.contiguous(), h.contiguous(), w_up.contiguous()
    G, L, d = x.shape
    M, r = z.shape[1], h.shape[2]
    k, v = _kv(z, w_k, w_v)
    scales = _scales(s_novel, s_incr)
    y = new_output(*x.shape, like=x)
    BL, BD, warps = _tile_config(d)
    grid = (triton.cdiv(L, BL), G)
    launch(
        oca_fwd_kernel, grid, dict(x=x, h=h, y=y, k=k, v=v, w_up=w_up, b_up=b_up, scales=scales),
        x, h, k, v, w_up, b_up, scales, y, L, eps, 1.0 / math.sqrt(r // n_heads),
        D=d, R=r, M=M, RH=r // n_heads, H=n_heads, T=group_size,
        BL=BL, BD=BD, BR=next_pow2(r), BM=next_pow2(M), LOWP=is_low_precision(x), INTERPRET=interpreting(),
        num_warps=warps,
    )
    return y


def _dwu_splits(n_tokens: int, d: int, block_d: int) -> int:
    # Enough (column block, token split) programs to fill a GPU; one split when interpreting.
    if interpreting():
        return 1
    target = 4 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(triton.cdiv(n_tokens, 256), target // triton.cdiv(d, block_d)))


@no_autocast
def oca_bwd_triton(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps):
    """Launch the two backward kernels, then reduce the per-tile partials in a fixed order."""
    dy, x, h, w_up = dy.contiguous(), x.contiguous(), h.contiguous(), w_up.contiguous()
    G, L, d = x.shape
    M, r = z.shape[1], h.shape[2]
    k, v = _kv(z, w_k, w_v)
    scales = _scales(s_novel, s_incr)
    BL, BD, warps = _tile_config(d, backward=True)
    NL = triton.cdiv(L, BL)
    f32 = dict(like=x, dtype=torch.float32)
    dx, dh = new_output(*x.shape, like=x), new_output(*h.shape, like=h)
    o, dp = new_output(G, L, r, **f32), new_output(G, L, **f32)
    dk_part, dv_part = new_output(G, NL, M, r, **f32), new_output(G, NL, M, r, **f32)
    ds_part = new_output(G, NL, 2, **f32)
    meta = dict(D=d, R=r, M=M, RH=r // n_heads, H=n_heads, T=group_size, BR=next_pow2(r), BM=next_pow2(M))
    lowp = is_low_precision(x)
    tensors = dict(dy=dy, x=x, h=h, k=k, v=v, w_up=w_up, b_up=b_up, scales=scales,
                   dx=dx, dh=dh, o=o, dp=dp, dk_part=dk_part, dv_part=dv_part, ds_part=ds_part)
    launch(
        oca_bwd_kernel, (NL, G), tensors,
        dy, x, h, k, v, w_up, b_up, scales, dx, dh, o, dp, dk_part, dv_part, ds_part,
        L, NL, eps, 1.0 / math.sqrt(r // n_heads), BL=BL, BD=BD, LOWP=lowp, INTERPRET=interpreting(),
        num_warps=warps, **meta,
    )

    N = G * L
    BD2 = min(128, next_pow2(d))
    splits = _dwu_splits(N, d, BD2)
    rows = triton.cdiv(N, splits)
    dwu_part, dbu_part = new_output(splits, r, d, **f32), new_output(splits, d, **f32)
    launch(
        oca_bwd_dwu_kernel, (triton.cdiv(d, BD2), splits),
        dict(dy=dy, x=x, o=o, dp=dp, scales=scales, dwu_part=dwu_part, dbu_part=dbu_part),
        dy, x, o, dp, scales, dwu_part, dbu_part, N, rows,
        D=d, R=r, BT=32, BD=BD2, BR=next_pow2(r), LOWP=lowp, INTERPRET=interpreting(), num_warps=4,
    )

    # Fixed-order sums over tiles and group members: deterministic by construction.
    dk = dk_part.view(-1, group_size * NL, M, r).sum(1)  # [Gz, M, r]
    dv = dv_part.view(-1, group_size * NL, M, r).sum(1)
    zf = z.float().reshape(-1, r)
    dz = dk @ w_k.float().t() + dv @ w_v.float().t()
    dw_k = zf.t() @ dk.reshape(-1, r)
    dw_v = zf.t() @ dv.reshape(-1, r)
    # Outputs of a custom op may not alias each other: separate scalars.
    ds_novel, ds_incr = ds_part.view(-1, 2).sum(0).unbind()
    return (
        dx, dh, dz.to(z.dtype), dw_k.to(w_k.dtype), dw_v.to(w_v.dtype),
        dwu_part.sum(0).to(w_up.dtype), dbu_part.sum(0).to(b_up.dtype),
        ds_novel.to(s_novel.dtype, copy=True), ds_incr.to(s_incr.dtype, copy=True),
    )


@torch.library.custom_op("nearl::oca_fwd", mutates_args=())
def oca_fwd(
    x: torch.Tensor, h: torch.Tensor, z: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
    w_up: torch.Tensor, b_up: torch.Tensor, s_novel: torch.Tensor, s_incr: torch.Tensor,
    n_heads: int, group_size: int, eps: float,
) -> torch.Tensor:
    if use_triton(x):
        return oca_fwd_triton(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)
    return oca_reference(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)


@oca_fwd.register_fake
def _oca_fwd_fake(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps):
    return torch.empty_like(x)


@torch.library.custom_op("nearl::oca_bwd", mutates_args=())
def oca_bwd(
    dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, z: torch.Tensor, w_k: torch.Tensor,
    w_v: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor, s_novel: torch.Tensor,
    s_incr: torch.Tensor, n_heads: int, group_size: int, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr)."""
    if use_triton(x):
        return oca_bwd_triton(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)
    # Without Triton the backward is the vjp of the reference: the maths exists once.
    _, vjp = torch.func.vjp(
        lambda *t: oca_reference(*t, n_heads, group_size, eps), x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr
    )
    return tuple(g.clone() for g in vjp(dy.to(x.dtype)))


@oca_bwd.register_fake
def _oca_bwd_fake(dy, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps):
    return tuple(torch.empty_like(t) for t in (x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr))


class OCAFunction(torch.autograd.Function):
    """Autograd glue: saves the inputs, recomputes the attention in backward."""

    @staticmethod
    def forward(ctx, x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps):
        ctx.save_for_backward(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr)
        ctx.config = (n_heads, group_size, eps)
        return torch.ops.nearl.oca_fwd(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)

    @staticmethod
    def backward(ctx, dy):
        grads = torch.ops.nearl.oca_bwd(dy.contiguous(), *ctx.saved_tensors, *ctx.config)
        return (*grads, None, None, None)


def oca(
    x: torch.Tensor,
    z: torch.Tensor,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    s_novel: torch.Tensor,
    s_incr: torch.Tensor,
    n_heads: int = 2,
    group_size: int = 1,
    eps: float = 1e-6,
    h: Optional[torch.Tensor] = None,
    fused: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal Cross-Attention adapter: ``y = x + s_novel (delta - c x) + s_incr c x``.

    Args:
        x: tokens (G, L, d); group ``g`` is sequences ``g*group_size .. (g+1)*group_size - 1``.
        z: synergy queries (G // group_size, M, r), one set per group.
        w_down, b_down: down-projection (d, r), (r,). w_k, w_v: (r, r).
        w_up, b_up: up-projection (r, d), (d,). s_novel, s_incr: 0-dim scales.
        h: the down-projected queries if the caller already has them (the
            model computes them once for the USEformer context too).
        fused: route through the ``nearl::oca_*`` custom ops (Triton on CUDA);
            False calls the reference maths directly.

    Returns:
        ``(y, h)``: y with x's shape and dtype, h (G, L, r).

    Example:
        >>> y, h = oca(x, z, w_d, b_d, w_k, w_v, w_u, b_u, s_n, s_i, n_heads=2)
    """
    _check_oca_inputs(x, z, w_down, b_down, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, h)
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive finite float; got {eps}")
    # The down-projection stays a library GEMM: h must be materialised anyway
    # as the USEformer's context, so fusing it here would save no traffic.
    if h is None:
        h = down_project(x, w_down, b_down)
    if fused:
        y = OCAFunction.apply(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)
    else:
        y = oca_reference(x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr, n_heads, group_size, eps)
    return y, h
