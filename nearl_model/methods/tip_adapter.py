"""Tip-Adapter (training-free): a key-value cache of the few-shot features beside zero-shot CLIP.

Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot
Classification", ECCV 2022. ``logits = zero-shot logits + alpha * A @ L`` with
``A = exp(-beta (1 - f F_train^T))`` and ``L`` the one-hot train labels. The
paper starts at alpha = 1, beta = 5.5 and searches both on the validation set
(its code: beta over 200 steps of [0.1, 7], alpha over 20 steps of [0.1, 3]);
we run the same search on the validation view. The cache covers only the
training classes, so it cannot score unseen ones.
"""

import numpy as np
import torch
import torch.nn.functional as F

from .base import Backbone, ClassSet, Method, Task, View, check_same_classes, softmax_np

BETAS = [0.1 + i * (7 - 0.1) / 200 for i in range(200)]
ALPHAS = [0.1 + i * (3 - 0.1) / 20 for i in range(20)]


class TipAdapter(Method):
    name = "tip-adapter"
    scores_unseen_classes = False
    paper = "Zhang et al., ECCV 2022 (Tip-Adapter, training-free)"

    def __init__(self, alpha: float = 1.0, beta: float = 5.5):
        self.alpha, self.beta = alpha, beta
        self.keys = None

    def _logits(self, backbone, feats, text, alpha, beta):
        affinity = feats @ self.keys.t()
        cache = torch.exp(-beta * (1 - affinity)) @ self.values
        return backbone.logit_scale * feats @ text.t() + alpha * cache

    def fit(self, backbone: Backbone, task: Task) -> None:
        self.classes = task.classes
        self.keys = backbone.image_features(task.train)
        self.values = F.one_hot(backbone.labels(task.train), len(task.classes)).float()
        text = backbone.text_features(task.classes.prompts)
        val = backbone.image_features(task.val)
        yv = backbone.labels(task.val)
        best = float((self._logits(backbone, val, text, self.alpha, self.beta).argmax(1) == yv).float().mean())
        for beta in BETAS:
            for alpha in ALPHAS:
                acc = float((self._logits(backbone, val, text, alpha, beta).argmax(1) == yv).float().mean())
                if acc > best:
                    best, self.alpha, self.beta = acc, alpha, beta

    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        check_same_classes(classes, self.classes)
        logits = self._logits(backbone, backbone.image_features(view), backbone.text_features(classes.prompts),
                              self.alpha, self.beta)
        return softmax_np(logits)
