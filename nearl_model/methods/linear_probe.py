"""Linear probe: L2-regularised logistic regression on the frozen image features.

Radford et al., ICML 2021, section 3.2 and appendix A.3 (as CoOp's baseline):
scikit-learn's L-BFGS logistic regression on the frozen features, the inverse
regularisation C searched over [1e-6, 1e6] (we take its 13 decades).

How C is chosen, and why: the paper picks C by accuracy on a validation set.
At 1-4 shots the validation view is a handful of images, every C ties, and
the tie went to the strongest regulariser, which predicts one class (issue
19: chance accuracy where a fixed C gives 0.48). Here C is chosen by
stratified cross-validation over train + val pooled (up to 5 folds), on
log-loss, which still ranks the Cs when accuracies tie; remaining ties go to
the larger C. The final model is fitted on the train view only, so the
validation images select, as they do for every other method, and never train.

The features are the backbone's L2-normalised ones, then standardised per
dimension (``StandardScaler``) with the mean and spread of the train and val
images pooled (their labels play no part; at 1 shot the train view alone is
too few images to estimate a spread): a randomly initialised or
domain-shifted tower puts every image in a narrow cone, where one C cannot
suit every direction.
"""

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .base import Backbone, ClassSet, Method, Task, View, check_same_classes

# Largest first: GridSearchCV keeps the first of tied scores, so ties go to the weaker regulariser.
C_GRID = [10.0 ** e for e in range(6, -7, -1)]
FOLDS = 5
# With under two images of some class in train + val there is nothing to cross-validate; scikit-learn's default.
DEFAULT_C = 1.0


def probe(C: float):
    """Standardise, then logistic regression at inverse regularisation ``C``."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))


def choose_C(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The C of ``C_GRID`` with the lowest cross-validated log-loss on ``(x, y)``; ties to the larger C."""
    folds = min(FOLDS, int(np.bincount(y).min()))
    if folds < 2 or len(np.unique(y)) < 2:
        return DEFAULT_C
    search = GridSearchCV(probe(DEFAULT_C), {"logisticregression__C": C_GRID}, scoring="neg_log_loss",
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed), refit=False)
    search.fit(x, y)
    return float(search.best_params_["logisticregression__C"])


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
        pooled = np.concatenate([x, xv])
        self.C = choose_C(pooled, np.concatenate([y, yv]), task.seed)
        self.model = probe(self.C)
        self.model[0].fit(pooled)
        self.model[-1].fit(self.model[0].transform(x), y)
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
        if self.model is None:
            return 0
        linear = self.model[-1]
        return int(linear.coef_.size + linear.intercept_.size)
