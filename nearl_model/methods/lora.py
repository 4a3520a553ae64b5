"""CLIP-LoRA: low-rank updates of the attention's q, k, v projections in both towers.

Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models",
CVPR Workshops 2024 (arXiv 2405.18541). Published defaults (its run_utils.py
and lora.py): rank 2, alpha 1 (scale alpha / r), dropout 0.25 on the LoRA
branch's input, on q, k and v of every block of both encoders; AdamW lr 2e-4,
weight decay 1e-2, betas (0.9, 0.999), batch 32, 500 x shots iterations,
cosine decay to 1e-6. LoRA's usual init: A Kaiming-uniform, B zero, so a fresh
model is the frozen one.

Why not ``peft``: open_clip's blocks use ``nn.MultiheadAttention``, whose
q, k, v projections are one fused ``in_proj_weight``. peft's support for it
wraps the fused matrix (one rank-r update of the (3d, d) weight, merged into
the weight inside every forward), which is neither CLIP-LoRA's three separate
rank-2 updates nor compatible with dropout on the LoRA input. The wrapper here
is small: it composes the frozen MultiheadAttention with the three updates.
"""

import copy
import math
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, ClassSet, Method, Schedule, Task, View, cosine_warmup, fit_loop, softmax_np, val_scores
from .coop import run_text_tower, text_parts

RANK, ALPHA, DROPOUT = 2, 1, 0.25
LR, WEIGHT_DECAY, BETAS, BATCH, ITERS_PER_SHOT, LR_MIN = 2e-4, 1e-2, (0.9, 0.999), 32, 500, 1e-6
TARGETS = ("q", "k", "v")


class LoRAMultiheadAttention(nn.Module):
    """A frozen ``nn.MultiheadAttention`` with LoRA on the chosen input projections.

    Called as open_clip's blocks call ``nn.MultiheadAttention`` (batch-first,
    ``need_weights=False``, an additive float ``attn_mask``); returns ``(out, None)``.
    """

    def __init__(self, mha: nn.MultiheadAttention, r: int = RANK, alpha: float = ALPHA, dropout: float = DROPOUT,
                 targets=TARGETS):
        super().__init__()
        if not mha.batch_first or mha.in_proj_weight is None:
            raise TypeError("LoRA needs batch-first nn.MultiheadAttention with a fused in_proj_weight (open_clip's)")
        self.mha = mha
        d = mha.embed_dim
        self.targets = tuple(targets)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for t in self.targets:
            a = torch.empty(r, d, device=mha.in_proj_weight.device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_a[t] = nn.Parameter(a)
            self.lora_b[t] = nn.Parameter(torch.zeros(d, r, device=mha.in_proj_weight.device))

    def forward(self, query, key, value, need_weights: bool = False, attn_mask=None):
        mha, d = self.mha, self.mha.embed_dim
        w, b = mha.in_proj_weight, mha.in_proj_bias
        projected = []
        for i, (name, x) in enumerate(zip("qkv", (query, key, value))):
            y = F.linear(x, w[i * d : (i + 1) * d], None if b is None else b[i * d : (i + 1) * d])
            if name in self.targets:
                a, bb = self.lora_a[name], self.lora_b[name]
                y = y + self.scale * (self.dropout(x) @ a.t().to(x.dtype)) @ bb.t().to(x.dtype)
            projected.append(y)
        q, k, v = projected
        B, Lq, _ = q.shape
        h = mha.num_heads
        q, k, v = (t.view(B, -1, h, d // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(B, Lq, d)
        return mha.out_proj(out), None


def apply_lora(clip: nn.Module) -> List[LoRAMultiheadAttention]:
    """Replace every attention of both towers of ``clip`` (a copy the caller owns) with its LoRA wrapper."""
    wrapped = []
    for transformer in (clip.visual.transformer, text_parts(clip).transformer):
        for block in transformer.resblocks:
            block.attn = LoRAMultiheadAttention(block.attn)
            wrapped.append(block.attn)
    return wrapped


class LoRA(Method):
    name = "lora"
    paper = "Zanella & Ben Ayed, CVPRW 2024 (CLIP-LoRA)"

    def __init__(self):
        self.clip = None
        self.layers = []
        self.summary = {}

    def setup(self, backbone: Backbone, task: Task) -> None:
        """A private copy of the backbone with fresh LoRA layers (seeded); the shared backbone stays untouched."""
        torch.manual_seed(task.seed)
        self.clip = copy.deepcopy(backbone.clip)
        self.layers = apply_lora(self.clip)
        self.params = [p for layer in self.layers for p in (*layer.lora_a.values(), *layer.lora_b.values())]
        for p in self.params:
            p.requires_grad_(True)

    def _train_mode(self, on: bool) -> None:
        # Only the LoRA dropout changes; the frozen backbone stays in eval mode.
        for layer in self.layers:
            layer.dropout.train(on)

    def logits(self, backbone: Backbone, images: torch.Tensor, classes: ClassSet) -> torch.Tensor:
        with backbone.autocast():
            img = self.clip.encode_image(images)
            tokens = backbone.tokens(classes.prompts)
            text = text_parts(self.clip)
            txt = run_text_tower(text, text.token_embedding(tokens).to(text.transformer.get_cast_dtype()), tokens)
        return backbone.logit_scale * F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).t()

    def fit(self, backbone: Backbone, task: Task) -> None:
        self.setup(backbone, task)
        x, y = backbone.pixels(task.train), backbone.labels(task.train)
        xv, yv = backbone.pixels(task.val), backbone.labels(task.val)
        shots = max(1, len(y) // len(task.classes))
        schedule = Schedule.from_steps(ITERS_PER_SHOT * shots, len(y), BATCH, backbone.max_steps)
        optimizer = torch.optim.AdamW(self.params, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)

        def loss_fn(idx):
            self._train_mode(True)
            return F.cross_entropy(self.logits(backbone, x[idx], task.classes), y[idx])

        def val_fn():
            self._train_mode(False)
            with torch.no_grad():
                return val_scores(self.logits(backbone, xv, task.classes), yv)

        lr_at = cosine_warmup(schedule.steps, floor=LR_MIN / LR)
        self.summary = fit_loop(backbone, self.params, schedule, task.seed, loss_fn, val_fn, optimizer, lr_at,
                                self.name, len(y))
        self._train_mode(False)

    @torch.no_grad()
    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        self._train_mode(False)
        return np.concatenate([softmax_np(self.logits(backbone, backbone.pixels(part, cache=False), classes))
                               for part in backbone.chunks(view)])

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params) if self.layers else 0
