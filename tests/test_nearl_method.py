"""NEARL in the comparison harness: its recipe's keywords reach the optimiser and the adapters."""

import pytest
import torch

from nearl_model import create_clip
from nearl_model.data import load_dataset
from nearl_model.methods import METHODS, Backbone, ClassSet, Task
from nearl_model.methods import nearl as nearl_module
from nearl_model.methods.nearl import Nearl
from nearl_model.compare import class_view
from nearl_model.prompts import DEMO_TEMPLATE


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return Backbone(create_clip("nearl-tiny"), "nearl-tiny", torch.device("cpu"))


def fresh(backbone, **keywords) -> Nearl:
    method = Nearl("paired", **keywords)
    method.setup(backbone, Task(ClassSet(["a", "b"], "{}"), None, None, seed=1))
    return method


def test_the_harness_recipe_is_the_default(backbone):
    """``METHODS["nearl"]`` trains at the module's recipe: one rate for every adapter, s_novel from 1.

    The nearl_gap study (docs/nearl_vs_baselines.md) found no change of these
    that is ahead on average over its three data sets without losing on one,
    so they stay the defaults until a study says otherwise.
    """
    method = METHODS["nearl"]()
    assert (method.lr, method.steps, method.weight_decay) == (1e-3, 200, 0.01)
    assert (method.lr, method.steps, method.weight_decay) == (nearl_module.LR, nearl_module.STEPS,
                                                              nearl_module.WEIGHT_DECAY)
    assert (method.text_lr_scale, method.s_novel_init) == (1.0, 1.0)
    method.setup(backbone, Task(ClassSet(["a", "b"], "{}"), None, None, seed=1))
    assert {g["lr"] for g in method.param_groups()} == {1e-3}
    ocas = [*method.model.adapters.oca_image, *method.model.adapters.oca_text]
    assert all(oca.s_novel.item() == 1.0 for oca in ocas)


def test_param_groups_cover_every_trainable_parameter_once(backbone):
    method = fresh(backbone, text_lr_scale=0.1, weight_decay=0.5)
    grouped = [p for g in method.param_groups() for p in g["params"]]
    trainable = [p for p in method.model.parameters() if p.requires_grad]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    for group in method.param_groups():
        assert group["weight_decay"] == (0.5 if group["params"][0].dim() >= 2 else 0.0)
        assert all((p.dim() >= 2) == (group["params"][0].dim() >= 2) for p in group["params"])


def test_text_lr_scale_slows_only_the_text_tower_ocas(backbone):
    method = fresh(backbone, lr=2e-3, text_lr_scale=0.1)
    text = {id(p) for p in method.model.adapters.oca_text.parameters()}
    for group in method.param_groups():
        in_text = {id(p) in text for p in group["params"]}
        assert len(in_text) == 1
        assert group["lr"] == pytest.approx(2e-4 if in_text.pop() else 2e-3)


def test_s_novel_init_sets_every_oca_and_stays_trainable(backbone):
    method = fresh(backbone, s_novel_init=0.1)
    for oca in (*method.model.adapters.oca_image, *method.model.adapters.oca_text):
        assert oca.s_novel.item() == pytest.approx(0.1) and oca.s_novel.requires_grad


def test_steps_reach_the_schedule(backbone, monkeypatch):
    """``steps`` is the optimiser's step count (no early stop before it when validation keeps improving)."""
    data = load_dataset(None, backbone.image_size)
    classes = ClassSet(list(data.classes), DEMO_TEMPLATE)
    ids = list(range(len(classes)))
    task = Task(classes, class_view("train", data.splits["train"], ids, 1, 1),
                class_view("val", data.splits["val"], ids, 1, 1), 1)
    method = Nearl("paired", steps=3)
    method.fit(backbone, task)
    assert method.summary["steps"] == 3
