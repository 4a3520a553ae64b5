"""CLIP-Adapter: a residual bottleneck MLP on the frozen image feature.

Gao et al., "CLIP-Adapter: Better Vision-Language Models with Feature
Adapters", IJCV 2023 (arXiv 2110.04544). Visual adapter
``A(f) = ReLU(ReLU(f W_1) W_2)`` with reduction 4 and no biases, blended as
``f' = ratio * A(f) + (1 - ratio) * f`` with ratio 0.2; the text side is the
frozen prompt classifier. Trained as the paper's released code does (the CoOp
recipe): SGD, momentum 0.9, weight decay 5e-4, lr 2e-3, batch 32, 200 epochs,
cosine decay after one warm-up epoch at a constant 1e-5.

One change from the paper, and why: ``W_2`` starts at zero (the paper uses
PyTorch's default init), so a fresh adapter gives ``0.8 f``, which normalises
to ``f``: at initialisation the method is exactly zero-shot CLIP, as NEARL's
and LoRA's are. The outer ReLU is written ``y * (y >= 0)`` (the same function)
because its subgradient at 0 is 1 where ``relu``'s (and ``clamp``'s) is 0:
with ``relu`` the zero-init ``W_2`` would never receive a gradient. ``W_1`` gets its gradient
once ``W_2`` moves.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, ClassSet, Method, Schedule, Task, View, cosine_warmup, fit_loop, softmax_np, val_scores

RATIO = 0.2
REDUCTION = 4
LR, MOMENTUM, WEIGHT_DECAY, BATCH, EPOCHS, WARMUP_LR = 2e-3, 0.9, 5e-4, 32, 200, 1e-5


class Adapter(nn.Module):
    """``ratio * ReLU(ReLU(f W_1) W_2) + (1 - ratio) * f``."""

    def __init__(self, dim: int, reduction: int = REDUCTION, ratio: float = RATIO):
        super().__init__()
        self.ratio = ratio
        self.fc1 = nn.Linear(dim, dim // reduction, bias=False)
        self.fc2 = nn.Linear(dim // reduction, dim, bias=False)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        y = self.fc2(F.relu(self.fc1(f)))
        return self.ratio * y * (y >= 0) + (1 - self.ratio) * f


class ClipAdapter(Method):
    name = "clip-adapter"
    paper = "Gao et al., IJCV 2023 (CLIP-Adapter)"

    def __init__(self):
        self.adapter = None
        self.summary = {}

    def logits(self, backbone: Backbone, feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return backbone.logit_scale * F.normalize(self.adapter(feats), dim=-1) @ text.t()

    def fit(self, backbone: Backbone, task: Task) -> None:
        torch.manual_seed(task.seed)
        x, y = backbone.image_features(task.train), backbone.labels(task.train)
        xv, yv = backbone.image_features(task.val), backbone.labels(task.val)
        text = backbone.text_features(task.classes.prompts)
        self.adapter = Adapter(x.shape[1]).to(backbone.device)
        params = list(self.adapter.parameters())
        schedule = Schedule.from_epochs(EPOCHS, len(y), BATCH, backbone.max_steps)
        per_epoch = max(1, len(y) // schedule.batch_size)
        optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        def loss_fn(idx):
            self.adapter.train()
            return F.cross_entropy(self.logits(backbone, x[idx], text), y[idx])

        def val_fn():
            self.adapter.eval()
            with torch.no_grad():
                return val_scores(self.logits(backbone, xv, text), yv)

        lr_at = cosine_warmup(schedule.steps, min(per_epoch, schedule.steps - 1), WARMUP_LR / LR)
        self.summary = fit_loop(backbone, params, schedule, task.seed, loss_fn, val_fn, optimizer, lr_at,
                                self.name, len(y))

    @torch.no_grad()
    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        self.adapter.eval()
        return softmax_np(self.logits(backbone, backbone.image_features(view), backbone.text_features(classes.prompts)))

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.adapter.parameters()) if self.adapter is not None else 0
