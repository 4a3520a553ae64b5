"""The trainable parts of NEARL-CLIP as nn.Modules over the nearl_kernels ops."""

import math

import torch
from torch import nn

import nearl_kernels as nk
from nearl_kernels.oca.reference import down_project, oca_delta, oca_parallel_fraction
from nearl_kernels.synergy import PARAM_NAMES


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
        """``h = x W_d + b_d`` (G, L, r): the OCA query and the USEformer context."""
        return down_project(x, self.w_down, self.b_down)

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
