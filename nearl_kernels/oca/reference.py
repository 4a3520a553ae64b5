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

:func:`oca_reference` is that maths as written. :func:`oca_reference_fwd` and
:func:`oca_reference_bwd` are the same maths rearranged for speed, with the
backward written out from saved tensors; the custom ops run them on CPU.
"""

from typing import Callable, Optional, Sequence, Tuple

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


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # A dtype test costs less than a no-op .float() dispatch, which small shapes feel.
    return t if t.dtype == torch.float32 else t.float()


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _split_heads(t: torch.Tensor, n_heads: int, group_size: int) -> torch.Tensor:
    """(G, L, r) -> (Gz, H, T*L, r_h): a group's sequences side by side, one head per batch entry."""
    G, L, r = t.shape
    t = t.reshape(-1, group_size, L, n_heads, r // n_heads).permute(0, 3, 1, 2, 4)
    return t.reshape(-1, n_heads, group_size * L, r // n_heads)


def _merge_heads(t: torch.Tensor, L: int) -> torch.Tensor:
    """(Gz, H, T*L, r_h) -> (G*L, r), the inverse of :func:`_split_heads`."""
    Gz, H, TL, rh = t.shape
    return t.view(Gz, H, TL // L, L, rh).permute(0, 2, 3, 1, 4).reshape(-1, H * rh)


def _z_heads(z: torch.Tensor, w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Keys or values ``z W`` as (Gz, H, M, r_h), fp32."""
    Gz, M, r = z.shape
    return (_fp32(z) @ _fp32(w)).view(Gz, M, n_heads, r // n_heads).transpose(1, 2)


def _up_weights(w_up: torch.Tensor, b_up: torch.Tensor) -> torch.Tensor:
    # [W_u; b_u] (r + 1, d): with a ones column on o, delta = o1 @ wb is one GEMM.
    return torch.cat([_fp32(w_up), _fp32(b_up)[None]])


def oca_reference_fwd(
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
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """:func:`oca_reference` in fp32, plus what :func:`oca_reference_bwd` needs.

    The same maths in fewer passes over the (G, L, d) tensors, since on CPU
    those passes are the cost: ``y = s_novel delta + (1 + (s_incr - s_novel) c) x``
    is one GEMM and one fused multiply-add, and ``<delta, x> = <o1, x wb^T>``
    (``o1 = [o, 1]``, ``wb = [W_u; b_u]``) reads x once in a thin GEMM instead
    of materialising ``delta * x``.

    Args:
        as :func:`oca_reference` (x, h, z, w_k, w_v, w_up, b_up, s_novel,
        s_incr, n_heads, group_size, eps); any float dtypes, maths in fp32.

    Returns:
        ``(y, saved)``: y (G, L, d) in ``x.dtype``; ``saved`` is four fp32
        tensors, ``o1`` (G*L, r+1) the attention output with a ones column,
        ``xw`` (G*L, r+1) = ``x [W_u; b_u]^T``, ``p`` (Gz, H, T*L, M) the
        attention probabilities, and ``stats`` (G*L, 2) = (c, 1 / (<x,x> + eps)).

    Example:
        >>> y, saved = oca_reference_fwd(x, h, z, w_k, w_v, w_u, b_u, s_n, s_i, 2, 1, 1e-6)
        >>> grads = oca_reference_bwd(dy, x, h, z, w_k, w_v, w_u, b_u, s_n, s_i, saved, 2, 1, 1e-6)
    """
    G, L, d = x.shape
    rh = h.shape[-1] // n_heads
    xf = _fp32(x.reshape(G * L, d))
    wb = _up_weights(w_up, b_up)
    q = _split_heads(_fp32(h), n_heads, group_size)
    k, v = _z_heads(z, w_k, n_heads), _z_heads(z, w_v, n_heads)
    p = torch.softmax((q @ k.transpose(-1, -2)).mul_(rh**-0.5), -1)  # [Gz, H, T*L, M]
    o1 = F.pad(_merge_heads(p @ v, L), (0, 1), value=1.0)  # [G*L, r+1]
    xw = xf @ wb.t()  # [G*L, r+1]
    rxx = torch.linalg.vector_norm(xf, dim=-1).square_().add_(eps).reciprocal_()
    c = torch.linalg.vecdot(o1, xw) * rxx
    sn, si = _fp32(s_novel), _fp32(s_incr)
    y = (o1 @ (wb * sn)).addcmul_(xf, (c * (si - sn)).add_(1.0)[:, None])
    return _cast(y.view(G, L, d), x.dtype), (o1, xw, p, torch.stack([c, rxx], -1))


def oca_reference_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    s_novel: torch.Tensor,
    s_incr: torch.Tensor,
    saved: Sequence[torch.Tensor],
    n_heads: int = 2,
    group_size: int = 1,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, ...]:
    """The vjp of :func:`oca_reference`, from the tensors :func:`oca_reference_fwd` saved.

    With ``a = (s_incr - s_novel) <dy, x> / (<x, x> + eps)`` (dL/dc over the norm)::

        ddelta = s_novel dy + a x
        dx     = (1 + (s_incr - s_novel) c) dy + a delta - 2 a c x
        ds_novel = <dy, delta - c x>,  ds_incr = <dy, c x>

    ``ddelta`` and ``delta`` are never formed: only their products with the thin
    o1, W_u are, as GEMMs over dy and x. The attention backward is the usual
    softmax one, summed over a group's sequences for k and v.

    Args:
        dy: gradient of y (G, L, d).
        x ... s_incr: the forward's inputs.
        saved: the second output of :func:`oca_reference_fwd`.
        n_heads, group_size: as the forward. eps: unused here (the saved
            ``1 / (<x,x> + eps)`` carries it); taken so both halves share one config.

    Returns:
        gradients for (x, h, z, w_k, w_v, w_up, b_up, s_novel, s_incr), each in
        its input's dtype.
    """
    o1, xw, p, stats = saved
    G, L, d = x.shape
    r = h.shape[-1]
    scale = (r // n_heads) ** -0.5
    xf, dyf = _fp32(x.reshape(G * L, d)), _fp32(dy.reshape(G * L, d))
    wb = _up_weights(w_up, b_up)
    sn, si = _fp32(s_novel), _fp32(s_incr)
    c, rxx = stats.unbind(-1)
    dyw = dyf @ wb.t()  # [G*L, r+1]: <dy, delta> = <dyw, o1>
    dyx = torch.linalg.vecdot(dyf, xf)
    a = dyx * rxx * (si - sn)
    ao1 = o1 * a[:, None]
    dwb = torch.addmm(ao1.t() @ xf, (o1 * sn).t(), dyf)  # [r+1, d]: o1^T ddelta
    do = torch.addcmul(dyw[:, :r] * sn, xw[:, :r], a[:, None])  # ddelta W_u^T
    dx = (ao1 @ wb).addcmul_(dyf, (c * (si - sn)).add_(1.0)[:, None]).addcmul_(xf, (a * c).mul_(-2.0)[:, None])
    # Sums of many signed terms: torch's cascade sum, not a BLAS dot, keeps them exact enough.
    cdyx = (c * dyx).sum()
    ds_novel = (dyw * o1).sum() - cdyx

    k, v = _z_heads(z, w_k, n_heads), _z_heads(z, w_v, n_heads)
    q = _split_heads(_fp32(h), n_heads, group_size)
    do = _split_heads(do.view(G, L, r), n_heads, group_size)
    dp = do @ v.transpose(-1, -2)  # [Gz, H, T*L, M]
    # softmax's own backward, p * (dp - <dp, p>), then the score scale.
    ds = torch.ops.aten._softmax_backward_data(dp, p, -1, torch.float32).mul_(scale)  # [Gz, H, T*L, M]
    dh = _merge_heads(ds @ k, L)
    Gz, M = z.shape[:2]
    dk = (ds.transpose(-1, -2) @ q).transpose(1, 2).reshape(Gz * M, r)
    dv = (p.transpose(-1, -2) @ do).transpose(1, 2).reshape(Gz * M, r)
    zf = _fp32(z.reshape(Gz * M, r))
    dz = torch.addmm(dk @ _fp32(w_k).t(), dv, _fp32(w_v).t())
    return (
        _cast(dx.view(G, L, d), x.dtype), _cast(dh.view(G, L, r), h.dtype), _cast(dz.view(Gz, M, r), z.dtype),
        _cast(zf.t() @ dk, w_k.dtype), _cast(zf.t() @ dv, w_v.dtype),
        # b_up's gradient gets storage of its own: a custom op's outputs may not alias.
        _cast(dwb[:r], w_up.dtype), dwb[r].to(b_up.dtype, copy=True), _cast(ds_novel, s_novel.dtype),
        _cast(cdyx, s_incr.dtype),
    )
