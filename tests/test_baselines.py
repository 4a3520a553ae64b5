"""The baselines at their best (issue 19), on real images: scikit-learn's handwritten digits 0-4.

nearl-tiny at random init puts every digit in a narrow cone (mean pairwise
cosine 0.99) under a near-degenerate text head, which is where the published
settings of the linear probe, CLIP-Adapter and Tip-Adapter had collapsed to
chance. Each is checked here against an independent minimal version of
itself, or against zero-shot, with bounds derived from the test size.
"""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from nearl_model import create_clip
from nearl_model.compare import class_view
from nearl_model.data import load_dataset
from nearl_model.methods import METHODS, Backbone, ClassSet, Task
from nearl_model.methods.tip_adapter import TipAdapter
from nearl_model.methods.zeroshot import ZeroShot
from nearl_model.prompts import default_template

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    backbone = Backbone(create_clip("nearl-tiny"), "nearl-tiny", torch.device("cpu"))
    data = load_dataset("sklearn-digits", backbone.image_size)
    classes = ClassSet(list(data.classes), default_template("sklearn-digits"))
    ids = list(range(len(classes)))
    test = class_view("test", data.splits["test"], ids)
    return backbone, data, classes, ids, test


def task(digits, shots, seed):
    backbone, data, classes, ids, _ = digits
    return Task(classes, class_view("train", data.splits["train"], ids, shots, seed),
                class_view("val", data.splits["val"], ids, shots, seed), seed)


def accuracy(probs, view):
    return float((np.asarray(probs).argmax(1) == np.asarray(view.labels)).mean())


def noise(n_test, n_seeds):
    """Two standard deviations of the difference of two mean accuracies, each over ``n_seeds`` scorings of
    ``n_test`` images, taken as independent binomials at the worst case p = 1/2: 2 sqrt(2 * 0.25 / (n S))."""
    return 2 * math.sqrt(0.5 / (n_test * n_seeds))


@pytest.mark.parametrize("shots", [1, 4, 16])
def test_linear_probe_is_never_worse_than_fixed_C_logistic_regression(digits, shots):
    backbone, _, classes, _, test = digits
    xt = backbone.image_features(test).numpy()
    ours, references = [], {C: [] for C in (1.0, 100.0)}
    for seed in SEEDS:
        t = task(digits, shots, seed)
        method = METHODS["linear-probe"]()
        method.fit(backbone, t)
        ours.append(accuracy(method.predict_proba(backbone, test, classes), test))
        x, y = backbone.image_features(t.train).numpy(), np.asarray(t.train.labels)
        for C, accs in references.items():
            accs.append(float((LogisticRegression(C=C, max_iter=1000).fit(x, y).predict(xt) == test.labels).mean()))
    bound = noise(len(test), len(SEEDS))
    for C, accs in references.items():
        assert np.mean(ours) >= np.mean(accs) - bound, (
            f"{shots}-shot: probe {np.mean(ours):.3f} vs LogisticRegression(C={C:g}) {np.mean(accs):.3f}")


def test_linear_probe_does_not_collapse_at_few_shots(digits):
    """Issue 19: C chosen by accuracy on a 4-image-per-class validation view predicted one class."""
    backbone, _, classes, _, test = digits
    method = METHODS["linear-probe"]()
    method.fit(backbone, task(digits, 4, 1))
    predicted = method.predict_proba(backbone, test, classes).argmax(1)
    assert len(np.unique(predicted)) == len(classes)
    assert accuracy(method.predict_proba(backbone, test, classes), test) >= 0.40


def test_clip_adapter_moves_away_from_zero_shot(digits):
    backbone, _, classes, _, test = digits
    zero_shot = ZeroShot().predict_proba(backbone, test, classes)
    chance = 1 / len(classes)
    accs, probe = [], []
    for seed in SEEDS:
        method = METHODS["clip-adapter"]()
        method.fit(backbone, task(digits, 4, seed))
        probs = method.predict_proba(backbone, test, classes)
        assert not np.allclose(probs, zero_shot, atol=1e-3)
        accs.append(accuracy(probs, test))
        reference = METHODS["linear-probe"]()
        reference.fit(backbone, task(digits, 4, seed))
        probe.append(accuracy(reference.predict_proba(backbone, test, classes), test))
    # Zero-shot reads chance here (one class for every image); the adapter must clear it by more than noise,
    # and, learning on the same features as the probe (its input standardised as the probe's is), stay in the
    # probe's league: an adapter on raw features in this narrow cone read about 0.30 against the probe's 0.54.
    bound = noise(len(test), len(SEEDS))
    assert accuracy(zero_shot, test) <= chance + 1e-9
    assert np.mean(accs) >= chance + bound, accs
    assert np.mean(accs) >= np.mean(probe) - bound, (accs, probe)


@pytest.mark.parametrize("name", ["tip-adapter", "tip-adapter-f"])
def test_tip_adapter_cache_learns_and_searches_alpha_beta(digits, name):
    backbone, _, classes, _, test = digits
    chance = 1 / len(classes)
    accs = []
    for seed in SEEDS:
        method = METHODS[name]()
        method.fit(backbone, task(digits, 16, seed))
        accs.append(accuracy(method.predict_proba(backbone, test, classes), test))
        assert (method.alpha, method.beta) != (1.0, 5.5) or method.summary["val_accuracy"] > chance
    assert np.mean(accs) >= chance + noise(len(test), len(SEEDS)), accs


def test_tip_adapter_with_alpha_zero_is_zero_shot_and_f_moves_the_keys(digits):
    backbone, _, classes, _, test = digits
    t = task(digits, 4, 1)
    method = TipAdapter()
    method.build(backbone, t)
    method.alpha = 0.0
    np.testing.assert_allclose(method.predict_proba(backbone, test, classes),
                               ZeroShot().predict_proba(backbone, test, classes), rtol=1e-5, atol=1e-6)
    tuned = METHODS["tip-adapter-f"]()
    tuned.fit(backbone, t)
    assert tuned.trainable_parameters() == tuned.keys.numel() == 20 * backbone.image_features(test).shape[1]
    assert not torch.equal(tuned.keys, backbone.image_features(t.train))
