"""The trainable parts of NEARL-CLIP as nn.Modules over the nearl_kernels ops."""

import math

import torch
import torch.nn.functional as F
from torch import nn

import nearl_kernels as nk
from nearl_kernels._dispatch import no_autocast
from nearl_kernels.oca.reference import down_project, oca_delta, oca_parallel_fraction
from nearl_kernels.synergy import PARAM_NAMES


_down_project = no_autocast(down_project)


def _normal(*shape: int, fan_in: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) / math.sqrt(fan_in))


class OCAAdapter(nn.Module):
    """One tower's OCA at one interaction layer: down-projection, attention to z, split.

    ``w_up`` and ``b_up`` start at zero, so a fresh adapter is the identity.
    """

    def __init__(self, width: int, r: int, n_heads: int, train_incremental: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.w_down = _normal(width, r, fan_in=width)
        self.b_down = nn.Parameter(torch.zeros(r))
        self.w_k = _normal(r, r, fan_in=r)
        self.w_v = _normal(r, r, fan_in=r)
        self.w_up = nn.Parameter(torch.zeros(r, width))
        self.b_up = nn.Parameter(torch.zeros(width))
        self.s_novel = nn.Parameter(torch.tensor(1.0))
        self.s_incr = nn.Parameter(torch.tensor(0.0), requires_grad=train_incremental)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``h = x W_d + b_d`` (G, L, r) in x's dtype: the OCA query and the USEformer context.

        Outside autocast: under it the fp32 residual stream would first be copied to the autocast
        dtype (a pass over every token, and casts of W_d, b_d and of their gradients back), for a
        thin GEMM that reads x once either way.
        """
        return _down_project(x, self.w_down, self.b_down)

    def forward(self, x, h, z, group_size: int, eps: float, fused: bool) -> torch.Tensor:
        y, _ = nk.oca(
            x, z, self.w_down, self.b_down, self.w_k, self.w_v, self.w_up, self.b_up, self.s_novel, self.s_incr,
            n_heads=self.n_heads, group_size=group_size, eps=eps, h=h, fused=fused,
        )
        return y

    def forward_penalty(self, x, h, z, group_size: int, eps: float):
        """Soft-constraint ablation: ``y = x + s_novel delta`` and the parallel fraction."""
        delta = oca_delta(h, z, self.w_k, self.w_v, self.w_up, self.b_up, self.n_heads, group_size)
        y = (x.float() + self.s_novel.float() * delta).to(x.dtype)
        return y, oca_parallel_fraction(x, delta, eps)


class USEformerBlock(nn.Module):
    """One pre-LN USEformer block: synergy queries attend to the group's context, then an FFN."""

    def __init__(self, r: int, n_heads: int, ffn_ratio: int):
        super().__init__()
        self.n_heads = n_heads
        hidden = ffn_ratio * r
        for ln in ("ln_c", "ln_1", "ln_2"):
            setattr(self, f"{ln}_w", nn.Parameter(torch.ones(r)))
            setattr(self, f"{ln}_b", nn.Parameter(torch.zeros(r)))
        for proj in ("q", "k", "v", "o"):
            setattr(self, f"w_{proj}", _normal(r, r, fan_in=r))
        # No key bias: softmax cancels it, so it would never receive a gradient.
        for proj in ("q", "v", "o"):
            setattr(self, f"b_{proj}", nn.Parameter(torch.zeros(r)))
        self.w_1 = _normal(r, hidden, fan_in=r)
        self.b_1 = nn.Parameter(torch.zeros(hidden))
        self.w_2 = _normal(hidden, r, fan_in=hidden)
        self.b_2 = nn.Parameter(torch.zeros(r))

    def params(self) -> dict:
        return {name: getattr(self, name) for name in PARAM_NAMES}

    def forward(self, z, ctx, ctx_mask, fused: bool) -> torch.Tensor:
        return nk.synergy_block(z, ctx, ctx_mask, self.params(), n_heads=self.n_heads, fused=fused)


class NearlAdapters(nn.Module):
    """Everything NEARL-CLIP trains: z0, J USEformer blocks, J image and J text OCAs."""

    def __init__(self, config, n_layers: int, vision_width: int, text_width: int):
        super().__init__()
        c = config
        self.z0 = nn.Parameter(torch.randn(c.n_queries, c.r) / math.sqrt(c.r))
        self.useformer = nn.ModuleList(USEformerBlock(c.r, c.n_heads, c.ffn_ratio) for _ in range(n_layers))
        self.oca_image = nn.ModuleList(
            OCAAdapter(vision_width, c.r, c.n_heads, c.train_incremental) for _ in range(n_layers)
        )
        self.oca_text = nn.ModuleList(
            OCAAdapter(text_width, c.r, c.n_heads, c.train_incremental) for _ in range(n_layers)
        )


def interaction_layer(oca_v: OCAAdapter, oca_t: OCAAdapter, block: USEformerBlock, x_v: torch.Tensor,
                      x_t: torch.Tensor, z: torch.Tensor, ctx_mask: torch.Tensor, K: int, paired: bool, eps: float,
                      fused: bool, penalty: bool):
    """One interaction layer after its frozen blocks: down-projections, the USEformer block, both OCAs.

    The same code at every layer, so regional compilation compiles it once
    (:meth:`NearlCLIP.compile_regions`).

    Args:
        oca_v, oca_t, block: the layer's image OCA, text OCA and USEformer block.
        x_v: image tokens (B, Lv, dv). x_t: text tokens (B*K or K, n, dt).
        z: synergy queries (B, M, r) paired; (B + 1, M, r) shared, the text group last.
        ctx_mask: (groups, Lv + K*n) bool, True where a context token is real.
        K: prompts per group. paired: the interaction mode. eps: the OCA's.
        fused: route through the custom ops. penalty: the soft-constraint ablation.

    Returns:
        ``(x_v, x_t, z, term)``: the updated tokens and queries, and the layer's
        parallel-energy term (p_v + p_t) under ``penalty`` (else None).
    """
    B = x_v.shape[0]
    h_v, h_t = oca_v.down(x_v), oca_t.down(x_t)
    ctx_t = h_t.reshape(-1, K * h_t.shape[1], h_t.shape[2])  # [B or 1, K*n, r]
    if paired:
        ctx = torch.cat([h_v, ctx_t], dim=1)
    else:
        # One pad and one cat: the text group's image slot is a zero row of h_v (masked out).
        ctx = torch.cat([F.pad(h_v, (0, 0, 0, 0, 0, 1)), ctx_t.expand(B + 1, -1, -1)], dim=1)
    z = block(z, ctx, ctx_mask, fused=fused)
    # split's backward is one cat; two slices' would be two zero-filled copies and an add.
    z_v, z_t = (z, z) if paired else z.split([B, 1])
    if penalty:
        x_v, p_v = oca_v.forward_penalty(x_v, h_v, z_v, 1, eps)
        x_t, p_t = oca_t.forward_penalty(x_t, h_t, z_t, K, eps)
        return x_v, x_t, z, p_v + p_t
    return oca_v(x_v, h_v, z_v, 1, eps, fused), oca_t(x_t, h_t, z_t, K, eps, fused), z, None
