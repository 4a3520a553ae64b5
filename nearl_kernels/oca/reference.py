"""Pure-PyTorch maths of the Orthogonal Cross-Attention adapter (OCA).

This file is the single source of truth for the OCA maths (SPEC.md, step 3):
the model's reference path calls it, the Triton kernels are tested against it,
and the benchmarks time it as the ``reference`` provider.

For a sequence ``s`` of group ``s // group_size`` with tokens ``x`` (L, d),
queries ``h = x W_d + b_d`` (L, r) and synergy queries ``z`` (M, r)::

    k = z W_k,  v = z W_v
    a_e = softmax(h_e k_e^T / sqrt(r_h))       per head e, over the M queries
    delta = concat_e(a_e v_e) W_u + b_u          (L, d)
    c = <delta, x> / (<x, x> + eps)              per token, fp32
    y = x + s_novel * (delta - c x) + s_incr * c x
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(r_h)) v: PyTorch's SDPA, k and v broadcast over q's batch dims.

    SDPA (not a hand-written softmax) also keeps torch.compile's attention
    pattern rewrite away from the broadcast group dimension, which it mishandles.
    """
    batch = q.shape[:-2]
    return F.scaled_dot_product_attention(q, k.expand(*batch, *k.shape[-2:]), v.expand(*batch, *v.shape[-2:]))


def down_project(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor) -> torch.Tensor:
    """``h = x W_d + b_d``: the OCA attention query and the USEformer context."""
    return torch.addmm(b_down.to(x.dtype), x.reshape(-1, x.shape[-1]), w_down.to(x.dtype)).view(
        *x.shape[:-1], w_down.shape[1]
    )


def oca_delta(
    h: torch.Tensor,
    z: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    n_heads: int,
    group_size: int,
    compute_dtype: torch.dtype = torch.float32,
    attention: Optional[Callable] = None,
) -> torch.Tensor:
    """The cross-attention update ``delta`` (G, L, d) in ``compute_dtype``, before the split.

    ``attention(q, k, v)`` takes q (Gz, T, H, L, r_h) and k, v (Gz, 1, H, M, r_h);
    the default is :func:`softmax_attention` (the benchmarks swap in xformers').
    """
    G, L, r = h.shape
    M = z.shape[1]
    rh = r // n_heads
    zc = z.to(compute_dtype)
    k = (zc @ w_k.to(compute_dtype)).view(-1, 1, M, n_heads, rh).transpose(2, 3)  # [Gz, 1, H, M, rh]
    v = (zc @ w_v.to(compute_dtype)).view(-1, 1, M, n_heads, rh).transpose(2, 3)
    # Sequences of one group share its queries: view them as (Gz, T, ...) so
    # the broadcast below reads k, v once per group without copying them.
    q = h.to(compute_dtype).view(-1, group_size, L, n_heads, rh).transpose(2, 3)  # [Gz, T, H, L, rh]
    o = (attention or softmax_attention)(q, k, v).transpose(2, 3).reshape(G, L, r)
    return o @ w_up.to(compute_dtype) + b_up.to(compute_dtype)


def oca_reference(
    x: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    s_novel: torch.Tensor,
    s_incr: torch.Tensor,
    n_heads: int = 2,
    group_size: int = 1,
    eps: float = 1e-6,
    compute_dtype: torch.dtype = torch.float32,
    attention: Optional[Callable] = None,
) -> torch.Tensor:
    """OCA apply: attention over the group's queries, orthogonal split, residual.

    Args:
        x: tokens (G, L, d), any float dtype.
        h: down-projected queries (G, L, r), see :func:`down_project`.
        z: synergy queries (G // group_size, M, r).
        w_k, w_v: (r, r). w_up: (r, d). b_up: (d,). s_novel, s_incr: scalars.
        compute_dtype: fp32 always in the library; tests pass bf16/fp16 to
            measure PyTorch's own low-precision error on the same maths.
        attention: see :func:`oca_delta`.

    Returns:
        y (G, L, d) in ``x.dtype``; all statistics are computed in ``compute_dtype``.
    """
    cd = compute_dtype
    delta = oca_delta(h, z, w_k, w_v, w_up, b_up, n_heads, group_size, cd, attention)
    xc = x.to(cd)
    c = (delta * xc).sum(-1, keepdim=True) / ((xc * xc).sum(-1, keepdim=True) + eps)
    y = xc + s_novel.to(cd) * (delta - c * xc) + s_incr.to(cd) * (c * xc)
    return y.to(x.dtype)


def oca_parallel_fraction(x: torch.Tensor, delta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean parallel energy fraction ``c^2 <x,x> / (<delta,delta> + eps)``.

    The soft-constraint ablation (``oca_constraint="penalty"``) adds
    ``lambda`` times this to the loss instead of projecting ``delta``.
    """
    xf = x.float()
    xx = (xf * xf).sum(-1)
    c = (delta * xf).sum(-1) / (xx + eps)
    return (c * c * xx / ((delta * delta).sum(-1) + eps)).mean()
