"""Pure-PyTorch maths of one USEformer block (SPEC.md, step 2).

The single source of truth for the synergy-query update: the model's reference
path calls it, the Triton kernels are tested against it, and the benchmarks
time it as the ``reference`` provider. Per group g (pre-LN)::

    c = LN_c(ctx_g)                               padding tokens masked out of the keys
    z = z + MHA(LN_1(z), c, c) W_o + b_o          q, v: x W + b; k: x W (a key bias
                                                  shifts every score of a query equally,
                                                  so softmax cancels it: it would never learn)
    z = z + GELU(LN_2(z) W_1 + b_1) W_2 + b_2     r -> f*r -> r

:func:`synergy_reference` is that maths as written. :func:`synergy_reference_fwd`
and :func:`synergy_reference_bwd` are the same maths with the backward written
out from saved tensors; the custom ops run them on CPU.
"""

import math
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# The order in which the block's tensors travel through the custom ops.
PARAM_NAMES = (
    "ln_c_w", "ln_c_b", "ln_1_w", "ln_1_b",
    "w_q", "b_q", "w_k", "w_v", "b_v", "w_o", "b_o",
    "ln_2_w", "ln_2_b", "w_1", "b_1", "w_2", "b_2",
)

LN_EPS = 1e-5


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q (G, H, M, r_h), k/v (G, H, Lc, r_h), mask (G, Lc) bool -> (G, H, M, r_h).

    Masked keys get finfo.min, not -inf, so a fully masked group stays NaN-free
    (the kernel does the same).
    """
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask[:, None, None, :], torch.finfo(s.dtype).min)
    return torch.softmax(s, dim=-1) @ v


def synergy_reference(
    z: torch.Tensor,
    ctx: torch.Tensor,
    ctx_mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    n_heads: int = 2,
    compute_dtype: torch.dtype = torch.float32,
    attention: Optional[Callable] = None,
) -> torch.Tensor:
    """One USEformer block on every group at once.

    Args:
        z: synergy queries (G, M, r).
        ctx: context tokens (G, Lc, r): the group's image queries ``h_v`` and
            its texts' ``h_t``, concatenated.
        ctx_mask: (G, Lc) bool, True where the context token is real. Every
            group needs at least one real token.
        params: the block's tensors by the names in ``PARAM_NAMES``.
        compute_dtype: fp32 always in the library; tests pass bf16/fp16 to
            measure PyTorch's own low-precision error on the same maths.
        attention: ``attention(q, k, v, mask)``, default
            :func:`masked_softmax_attention` (the benchmarks swap in xformers').

    Returns:
        the updated queries (G, M, r) in ``z.dtype``; maths in ``compute_dtype``.
    """
    p = {k: params[k].to(compute_dtype) for k in PARAM_NAMES}
    G, M, r = z.shape
    rh = r // n_heads
    zf = z.to(compute_dtype)
    c = F.layer_norm(ctx.to(compute_dtype), (r,), p["ln_c_w"], p["ln_c_b"], LN_EPS)
    q = F.layer_norm(zf, (r,), p["ln_1_w"], p["ln_1_b"], LN_EPS) @ p["w_q"] + p["b_q"]
    k = c @ p["w_k"]
    v = c @ p["w_v"] + p["b_v"]
    q, k, v = (t.view(G, -1, n_heads, rh).transpose(1, 2) for t in (q, k, v))
    o = (attention or masked_softmax_attention)(q, k, v, ctx_mask).transpose(1, 2).reshape(G, M, r)
    zf = zf + o @ p["w_o"] + p["b_o"]
    u = F.layer_norm(zf, (r,), p["ln_2_w"], p["ln_2_b"], LN_EPS) @ p["w_1"] + p["b_1"]
    zf = zf + F.gelu(u) @ p["w_2"] + p["b_2"]
    return zf.to(z.dtype)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # A dtype test costs less than a no-op .float() dispatch, and the block has 17 parameters.
    return t if t.dtype == torch.float32 else t.float()


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _split_heads(t: torch.Tensor, G: int, n_heads: int) -> torch.Tensor:
    """(G*S, r) -> (G, H, S, r_h), contiguous.

    Kept 4-D: inductor mis-strides a custom op's saved output that is a 3-D
    view of a 4-D copy ("mismatch in length of strides and shape").
    """
    S, r = t.shape[0] // G, t.shape[1]
    return t.view(G, S, n_heads, r // n_heads).transpose(1, 2).contiguous()


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(G, H, S, r_h) -> (G*S, r), the inverse of :func:`_split_heads`."""
    G, H, S, rh = t.shape
    return t.transpose(1, 2).reshape(G * S, H * rh)


def synergy_reference_fwd(
    z: torch.Tensor,
    ctx: torch.Tensor,
    ctx_mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    n_heads: int = 2,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """:func:`synergy_reference` in fp32, plus what :func:`synergy_reference_bwd` needs.

    The score scale rides on the q projection (one GEMM computes
    ``(LN_1(z) W_q + b_q) / sqrt(r_h)``), the padding mask is a bias added to
    the scores, and the LayerNorms keep their mean and 1/std for the backward.

    Args:
        as :func:`synergy_reference`; any float dtypes, maths in fp32.

    Returns:
        ``(z_new, saved)``: z_new (G, M, r) in ``z.dtype``; ``saved`` is a
        list of 17 fp32 tensors, to be handed back unchanged: the LayerNorm
        outputs with their means and 1/stds, the scaled q and k, v as
        (G, H, S, r_h), the attention probabilities (G, H, M, Lc), the attention
        output, the first residual, and the FFN pre-activation and activation.

    Example:
        >>> z_new, saved = synergy_reference_fwd(z, ctx, mask, params, 2)
        >>> dz, dctx, *dparams = synergy_reference_bwd(dz_new, z, ctx, mask, params, saved, 2)
    """
    p = {k: _fp32(params[k]) for k in PARAM_NAMES}
    G, M, r = z.shape
    Lc = ctx.shape[1]
    scale = (r // n_heads) ** -0.5
    zf, cf = _fp32(z.reshape(G * M, r)), _fp32(ctx.reshape(G * Lc, r))
    c, mean_c, rstd_c = torch.native_layer_norm(cf, (r,), p["ln_c_w"], p["ln_c_b"], LN_EPS)
    n1, mean_1, rstd_1 = torch.native_layer_norm(zf, (r,), p["ln_1_w"], p["ln_1_b"], LN_EPS)
    q = _split_heads(torch.addmm(p["b_q"], n1, p["w_q"], beta=scale, alpha=scale), G, n_heads)
    k = _split_heads(c @ p["w_k"], G, n_heads)
    v = _split_heads(torch.addmm(p["b_v"], c, p["w_v"]), G, n_heads)
    # finfo.min added to a score is finfo.min (|q.k| is far below its spacing, 2^104): the
    # reference's masked_fill, as one broadcast add of a (G, Lc) bias.
    bias = _fp32(torch.where(ctx_mask, 0.0, torch.finfo(torch.float32).min))
    a = torch.softmax((q @ k.transpose(-1, -2)).add_(bias[:, None, None, :]), -1)  # [G, H, M, Lc]
    o = _merge_heads(a @ v)  # [G*M, r]
    z1 = torch.addmm(p["b_o"], o, p["w_o"]).add_(zf)
    n2, mean_2, rstd_2 = torch.native_layer_norm(z1, (r,), p["ln_2_w"], p["ln_2_b"], LN_EPS)
    u = torch.addmm(p["b_1"], n2, p["w_1"])
    gu = F.gelu(u)
    z2 = torch.addmm(p["b_2"], gu, p["w_2"]).add_(z1)
    saved = [c, mean_c, rstd_c, n1, mean_1, rstd_1, q, k, v, a, o, z1, mean_2, rstd_2, n2, u, gu]
    return _cast(z2.view(G, M, r), z.dtype), saved


def synergy_reference_bwd(
    dz: torch.Tensor,
    z: torch.Tensor,
    ctx: torch.Tensor,
    ctx_mask: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    saved: Sequence[torch.Tensor],
    n_heads: int = 2,
) -> List[torch.Tensor]:
    """The vjp of :func:`synergy_reference`, from the tensors :func:`synergy_reference_fwd` saved.

    Each step backwards through the block: FFN (GELU's derivative), LN_2, the
    output projection, the masked softmax attention (masked scores get no
    gradient, as masked_fill's backward gives them none: this matters for a
    group whose context is entirely masked, where the softmax is uniform),
    the q/k/v projections, LN_1 and LN_c. The LayerNorm, GELU and softmax
    derivatives are PyTorch's own backward ops, the ones autograd would call.

    Args:
        dz: gradient of the updated queries (G, M, r).
        z, ctx, ctx_mask, params, n_heads: the forward's inputs.
        saved: the second output of :func:`synergy_reference_fwd`.

    Returns:
        gradients ``[dz, dctx, *dparams]`` with the params in ``PARAM_NAMES``
        order, each in its input's dtype.
    """
    p = {k: _fp32(params[k]) for k in PARAM_NAMES}
    c, mean_c, rstd_c, n1, mean_1, rstd_1, q, k, v, a, o, z1, mean_2, rstd_2, n2, u, gu = saved
    G, M, r = z.shape
    Lc = ctx.shape[1]
    scale = (r // n_heads) ** -0.5
    aten = torch.ops.aten
    all3 = [True, True, True]
    dz2 = _fp32(dz.reshape(G * M, r))
    g = {"b_2": dz2.sum(0), "w_2": gu.t() @ dz2}
    du = aten.gelu_backward(dz2 @ p["w_2"].t(), u)
    g["b_1"], g["w_1"] = du.sum(0), n2.t() @ du
    dz1, g["ln_2_w"], g["ln_2_b"] = aten.native_layer_norm_backward(
        du @ p["w_1"].t(), z1, (r,), mean_2, rstd_2, p["ln_2_w"], p["ln_2_b"], all3)
    dz1 = dz1.add_(dz2)
    g["b_o"], g["w_o"] = dz1.sum(0), o.t() @ dz1
    do = _split_heads(dz1 @ p["w_o"].t(), G, n_heads)
    ds = aten._softmax_backward_data(do @ v.transpose(-1, -2), a, -1, torch.float32)
    # masked_fill's backward: masked scores get no gradient. Where a group has a real token
    # their probability is exactly 0 and so is ds; a fully masked group needs the zeros.
    ds = ds.mul_(ctx_mask.to(torch.float32)[:, None, None, :])  # [G, H, M, Lc]
    # q was scaled in the forward, so dk needs no scale and dq one.
    dq = _merge_heads(ds @ k).mul_(scale)
    dk = _merge_heads(ds.transpose(-1, -2) @ q)
    dv = _merge_heads(a.transpose(-1, -2) @ do)
    g["b_q"], g["w_q"] = dq.sum(0), n1.t() @ dq
    dzq, g["ln_1_w"], g["ln_1_b"] = aten.native_layer_norm_backward(
        dq @ p["w_q"].t(), _fp32(z.reshape(G * M, r)), (r,), mean_1, rstd_1, p["ln_1_w"], p["ln_1_b"], all3)
    g["w_k"], g["w_v"], g["b_v"] = c.t() @ dk, c.t() @ dv, dv.sum(0)
    dctx, g["ln_c_w"], g["ln_c_b"] = aten.native_layer_norm_backward(
        torch.addmm(dk @ p["w_k"].t(), dv, p["w_v"].t()), _fp32(ctx.reshape(G * Lc, r)), (r,),
        mean_c, rstd_c, p["ln_c_w"], p["ln_c_b"], all3)
    return [_cast(dz1.add_(dzq).view(G, M, r), z.dtype), _cast(dctx.view(G, Lc, r), ctx.dtype),
            *(_cast(g[k], params[k].dtype) for k in PARAM_NAMES)]
