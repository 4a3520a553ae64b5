"""OCA: input checks, launchers, autograd Function, custom ops, functional API.

Layering (STYLE.md): kernels.py (raw Triton) -> launchers here -> the
``nearl::oca_fwd`` / ``nearl::oca_bwd`` custom ops (CPU: reference maths;
CUDA, or CPU under TRITON_INTERPRET=1: Triton) -> ``OCAFunction`` -> ``oca()``.
"""

import math
from typing import Optional, Tuple

import torch

from .._checks import check_heads, check_same_device, check_shape, check_tensor
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


@torch.library.custom_op("nearl::oca_fwd", mutates_args=())
def oca_fwd(
    x: torch.Tensor, h: torch.Tensor, z: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
    w_up: torch.Tensor, b_up: torch.Tensor, s_novel: torch.Tensor, s_incr: torch.Tensor,
    n_heads: int, group_size: int, eps: float,
) -> torch.Tensor:
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
