"""NEARL-CLIP (this project's reading of arXiv 2508.04101): OCA adapters and a USEformer.

``nearl`` is the paired mode (each image with its own copy of the K prompts),
``nearl-shared`` the shared mode; both build ``NearlCLIP`` over the shared
frozen backbone (it adds modules around the blocks and changes no weights).
The paper publishes no training recipe. The harness uses ``nearl_model.train``'s
optimiser (AdamW, weight decay 0.01 on matrices, linear warm-up over 10% of
the steps then cosine, gradient norm clipped at 1) at lr 1e-3, batch 32, but
counts a fixed number of optimiser steps (STEPS) instead of epochs: a few-shot
set is one or two batches, so 20 epochs is 20 to 40 steps, and on the demo the
loss does not move before step ~25 (see docs/learning-speed.md).

The constructor's keywords (learning rate, steps, weight decay, a learning-rate
multiplier for the text-tower OCAs, the initial ``s_novel``) default to the
harness's recipe; ``benchmarks/nearl_gap_study.py`` varies them one at a time
(docs/nearl_vs_baselines.md).
"""

import numpy as np
import torch

from ..clip import NearlCLIP
from ..config import NearlConfig
from .base import Backbone, ClassSet, Method, Schedule, Task, View, cosine_warmup, fit_loop, softmax_np, val_scores

LR, WEIGHT_DECAY, WARMUP, BATCH, STEPS, GRAD_CLIP = 1e-3, 0.01, 0.1, 32, 200, 1.0


class Nearl(Method):
    paper = "arXiv 2508.04101 (NEARL-CLIP; this project's reading, SPEC.md)"

    def __init__(self, mode: str = "paired", lr: float = LR, steps: int = STEPS, weight_decay: float = WEIGHT_DECAY,
                 text_lr_scale: float = 1.0, s_novel_init: float = 1.0):
        self.mode = mode
        self.lr, self.steps, self.weight_decay = lr, steps, weight_decay
        self.text_lr_scale, self.s_novel_init = text_lr_scale, s_novel_init
        self.name = "nearl" if mode == "paired" else f"nearl-{mode}"
        self.model = None
        self.summary = {}

    def setup(self, backbone: Backbone, task: Task) -> None:
        """Fresh adapters (seeded) around the shared frozen backbone."""
        torch.manual_seed(task.seed)
        fused = backbone.device.type == "cuda"
        self.model = NearlCLIP(backbone.clip, NearlConfig(mode=self.mode), fused=fused).to(backbone.device)
        if self.s_novel_init != 1.0:
            with torch.no_grad():
                for oca in (*self.model.adapters.oca_image, *self.model.adapters.oca_text):
                    oca.s_novel.fill_(self.s_novel_init)

    def param_groups(self) -> list:
        """AdamW groups: weight decay on matrices only; the text-tower OCAs at ``text_lr_scale`` times the rate."""
        text = {id(p) for p in self.model.adapters.oca_text.parameters()}
        groups = []
        for in_text in (False, True):
            for matrix in (True, False):
                params = [p for p in self.model.parameters()
                          if p.requires_grad and (id(p) in text) == in_text and (p.dim() >= 2) == matrix]
                if params:
                    groups.append({"params": params, "weight_decay": self.weight_decay if matrix else 0.0,
                                   "lr": self.lr * (self.text_lr_scale if in_text else 1.0)})
        return groups

    def logits(self, backbone: Backbone, images: torch.Tensor, classes: ClassSet) -> torch.Tensor:
        with backbone.autocast():
            return self.model(images, backbone.tokens(classes.prompts)).float()

    def fit(self, backbone: Backbone, task: Task) -> None:
        self.setup(backbone, task)
        model = self.model
        x, y = backbone.pixels(task.train), backbone.labels(task.train)
        xv, yv = backbone.pixels(task.val), backbone.labels(task.val)
        texts = backbone.tokens(task.classes.prompts)
        schedule = Schedule.from_steps(self.steps, len(y), BATCH, backbone.max_steps)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr)

        def loss_fn(idx):
            model.train()
            with backbone.autocast():
                loss, _ = model(x[idx], texts, y[idx])
            return loss

        def val_fn():
            model.eval()
            with torch.no_grad():
                return val_scores(self.logits(backbone, xv, task.classes), yv)

        lr_at = cosine_warmup(schedule.steps, max(1, round(WARMUP * schedule.steps)))
        self.summary = fit_loop(backbone, params, schedule, task.seed, loss_fn, val_fn, optimizer, lr_at,
                                self.name, len(y), grad_clip=GRAD_CLIP)
        model.eval()

    @torch.no_grad()
    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        self.model.eval()
        return np.concatenate([softmax_np(self.logits(backbone, backbone.pixels(part, cache=False), classes))
                               for part in backbone.chunks(view)])

    def trainable_parameters(self) -> int:
        return self.model.num_trainable_parameters() if self.model is not None else 0
