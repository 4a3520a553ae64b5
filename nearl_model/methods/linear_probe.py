"""Linear probe: L2-regularised logistic regression on the frozen, normalised image features.

Radford et al., ICML 2021, section 3.2 and appendix A.3 (as CoOp's baseline):
scikit-learn's L-BFGS logistic regression, the inverse regularisation C chosen
on the validation view. The paper searches C over [1e-6, 1e6]; we take the 13
decades of that range and keep the best validation accuracy (ties: smaller C,
the stronger regulariser).
"""

import numpy as np
from sklearn.linear_model import LogisticRegression

from .base import Backbone, ClassSet, Method, Task, View, check_same_classes

C_GRID = [10.0 ** e for e in range(-6, 7)]


class LinearProbe(Method):
    name = "linear-probe"
    scores_unseen_classes = False
    paper = "Radford et al., ICML 2021 (CLIP linear probe)"

    def __init__(self):
        self.model = None
        self.classes = None
        self.C = None

    def fit(self, backbone: Backbone, task: Task) -> None:
        x = backbone.image_features(task.train).cpu().numpy()
        y = np.asarray(task.train.labels)
        xv = backbone.image_features(task.val).cpu().numpy()
        yv = np.asarray(task.val.labels)
        best = None
        for C in C_GRID:
            model = LogisticRegression(C=C, max_iter=1000).fit(x, y)
            acc = float((model.predict(xv) == yv).mean())
            if best is None or acc > best[0]:
                best = (acc, C, model)
        _, self.C, self.model = best
        self.classes = task.classes
        self.n_classes = len(task.classes)

    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        check_same_classes(classes, self.classes)
        probs = self.model.predict_proba(backbone.image_features(view).cpu().numpy())
        # A class absent from the few-shot set (never, with K >= 1 shots) would be missing here.
        out = np.zeros((probs.shape[0], self.n_classes))
        out[:, self.model.classes_] = probs
        return out

    def trainable_parameters(self) -> int:
        return int(self.model.coef_.size + self.model.intercept_.size) if self.model is not None else 0
