"""Zero-shot CLIP: cosine between the frozen image feature and each class prompt's feature.

Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021. Nothing is trained.
"""

import numpy as np

from .base import Backbone, ClassSet, Method, Task, View, softmax_np


class ZeroShot(Method):
    name = "zeroshot"
    paper = "Radford et al., ICML 2021 (CLIP)"

    def fit(self, backbone: Backbone, task: Task) -> None:
        pass

    def logits(self, backbone: Backbone, view: View, classes: ClassSet):
        """``logit_scale * cos(image, text)`` (N, K) from ``encode_image`` / ``encode_text``."""
        return backbone.logit_scale * backbone.image_features(view) @ backbone.text_features(classes.prompts).t()

    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        return softmax_np(self.logits(backbone, view, classes))
