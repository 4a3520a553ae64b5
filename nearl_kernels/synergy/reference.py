"""Pure-PyTorch maths of one USEformer block (SPEC.md, step 2).

The single source of truth for the synergy-query update: the model's reference
path calls it, the Triton kernels are tested against it, and the benchmarks
time it as the ``reference`` provider. Per group g (pre-LN)::

    c = LN_c(ctx_g)                               padding tokens masked out of the keys
    z = z + MHA(LN_1(z), c, c) W_o + b_o          q, v: x W + b; k: x W (a key bias
                                                  shifts every score of a query equally,
                                                  so softmax cancels it: it would never learn)
    z = z + GELU(LN_2(z) W_1 + b_1) W_2 + b_2     r -> f*r -> r
"""

import math
from typing import Callable, Mapping, Optional

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
