"""Tip-Adapter: a key-value cache of the few-shot features beside zero-shot CLIP; Tip-Adapter-F fine-tunes the keys.

Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV 2022. ``logits = zero-shot logits + alpha * A @ L`` with
``A = exp(-beta (1 - f F_train^T))`` and ``L`` the one-hot train labels. The
paper starts at alpha = 1, beta = 5.5 and searches both on the validation set
(its code: beta over 200 steps of [0.1, 7], alpha over 20 steps of [0.1, 3]);
we run the same search on the validation view, ties kept at the paper's
start. Tip-Adapter-F (the paper's section 3.3) makes the keys learnable,
initialised from the train features, trains them for 20 epochs (AdamW, lr
1e-3, eps 1e-4, cosine) at alpha = 1, beta = 5.5, then runs the same search.
The cache covers only the training classes, so neither scores unseen ones.

One change from the paper, and why: the distance ``1 - f k`` is measured in
units of its mean over pairs of training images (``A = exp(-beta d / d_mean)``).
The paper's beta range was set for a pretrained CLIP, whose image features
spread widely; a randomly initialised or far-from-domain tower puts every
image in a narrow cone (cosines around 0.99 on the digits), where
``exp(-7 (1 - f k))`` is the same for every key and the cache cannot tell
neighbours from strangers: Tip-Adapter stayed near chance while a linear probe
on the same features reached 0.89 (issue 19). On a pretrained CLIP the mean
distance is of order one, so the searched range is close to the paper's.
"""

import numpy as np
import torch
import torch.nn.functional as F

from .base import (Backbone, ClassSet, Method, Schedule, Task, View, check_same_classes, cosine_warmup, fit_loop,
                   softmax_np, val_scores)

BETAS = [0.1 + i * (7 - 0.1) / 200 for i in range(200)]
ALPHAS = [0.1 + i * (3 - 0.1) / 20 for i in range(20)]
ALPHA, BETA = 1.0, 5.5
# Tip-Adapter-F's fine-tuning of the keys.
F_LR, F_EPS, F_EPOCHS, F_BATCH = 1e-3, 1e-4, 20, 256


class TipAdapter(Method):
    name = "tip-adapter"
    scores_unseen_classes = False
    paper = "Zhang et al., ECCV 2022 (Tip-Adapter, training-free)"

    def __init__(self):
        self.alpha, self.beta = ALPHA, BETA
        self.keys = None
        self.summary = {}

    def _logits(self, backbone, feats, text, alpha, beta):
        distance = (1 - feats @ self.keys.t()) / self.scale
        cache = torch.exp(-beta * distance) @ self.values
        return backbone.logit_scale * feats @ text.t() + alpha * cache

    def build(self, backbone: Backbone, task: Task) -> None:
        """The training-free cache: the train features as keys, their one-hot labels as values."""
        self.classes = task.classes
        self.keys = backbone.image_features(task.train).clone()
        self.values = F.one_hot(backbone.labels(task.train), len(task.classes)).float()
        pairs = 1 - self.keys @ self.keys.t()
        n = len(self.keys)
        mean = float(pairs.sum() / (n * (n - 1))) if n > 1 else 1.0
        self.scale = max(mean, float(torch.finfo(torch.float32).eps))

    @torch.no_grad()
    def search(self, backbone: Backbone, task: Task) -> None:
        """The paper's grid over alpha and beta on the validation view; the paper's start wins ties."""
        text = backbone.text_features(task.classes.prompts)
        val, yv = backbone.image_features(task.val), backbone.labels(task.val)
        self.alpha, self.beta = ALPHA, BETA
        best = float((self._logits(backbone, val, text, ALPHA, BETA).argmax(1) == yv).float().mean())
        for beta in BETAS:
            for alpha in ALPHAS:
                acc = float((self._logits(backbone, val, text, alpha, beta).argmax(1) == yv).float().mean())
                if acc > best:
                    best, self.alpha, self.beta = acc, alpha, beta
        self.summary.update(alpha=self.alpha, beta=self.beta, val_accuracy=best)

    def fit(self, backbone: Backbone, task: Task) -> None:
        self.build(backbone, task)
        self.search(backbone, task)

    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        check_same_classes(classes, self.classes)
        with torch.no_grad():
            logits = self._logits(backbone, backbone.image_features(view), backbone.text_features(classes.prompts),
                                  self.alpha, self.beta)
        return softmax_np(logits)


class TipAdapterF(TipAdapter):
    name = "tip-adapter-f"
    paper = "Zhang et al., ECCV 2022 (Tip-Adapter-F, fine-tuned cache keys)"

    def fit(self, backbone: Backbone, task: Task) -> None:
        self.build(backbone, task)
        x, y = backbone.image_features(task.train), backbone.labels(task.train)
        xv, yv = backbone.image_features(task.val), backbone.labels(task.val)
        text = backbone.text_features(task.classes.prompts)
        self.keys.requires_grad_(True)
        schedule = Schedule.from_epochs(F_EPOCHS, len(y), F_BATCH, backbone.max_steps)
        optimizer = torch.optim.AdamW([self.keys], lr=F_LR, eps=F_EPS)

        def loss_fn(idx):
            return F.cross_entropy(self._logits(backbone, x[idx], text, ALPHA, BETA), y[idx])

        def val_fn():
            with torch.no_grad():
                return val_scores(self._logits(backbone, xv, text, ALPHA, BETA), yv)

        self.summary = fit_loop(backbone, [self.keys], schedule, task.seed, loss_fn, val_fn, optimizer,
                                cosine_warmup(schedule.steps), self.name, len(y))
        self.keys.requires_grad_(False)
        self.search(backbone, task)

    def trainable_parameters(self) -> int:
        return self.keys.numel() if self.keys is not None else 0
