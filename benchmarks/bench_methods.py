"""One training step of every comparison method at ViT-B/16 shapes, side by side.

A step is what each method repeats while it trains, on one batch of B images
and K class prompts: forward, loss and the gradients of its trainable
parameters. The methods that work on frozen features (CLIP-Adapter, CoOp; the
linear probe's head) pay the image tower once per image, before training; that
one-off cost is its own row, ``frozen-features``. Zero-shot and Tip-Adapter
train nothing and have no step. Rows report the trainable parameters, the peak
memory of one step (on CPU the live-tensor stand-in of common.py) and images
per second in ``extra_info``.
"""

import pytest
import torch
import torch.nn.functional as F

from common import DEVICE, peak_memory, sync
from nearl_model import create_clip
from nearl_model.methods import Backbone, ClassSet, Task, View
from nearl_model.methods.clip_adapter import Adapter
from nearl_model.methods.coop import CoOp
from nearl_model.methods.lora import LoRA
from nearl_model.methods.nearl import Nearl

SHAPES = {
    "gpu": [dict(id="ViT-B-16-B32-K4", model="ViT-B-16", B=32, K=4, rounds=10)],
    "cpu": [dict(id="ViT-B-16-B2-K4", model="ViT-B-16", B=2, K=4, rounds=2)],
    "smoke": [dict(id="tiny-B2-K2", model="nearl-tiny", B=2, K=2, rounds=1)],
}
CLASSES = ["normal lungs", "bacterial pneumonia", "viral pneumonia", "pleural effusion"]
METHODS = ["frozen-features", "linear-probe", "clip-adapter", "coop", "lora", "nearl", "nearl-shared"]
_BACKBONES = {}


def _backbone(shape) -> Backbone:
    if shape["id"] not in _BACKBONES:
        torch.manual_seed(0)
        _BACKBONES[shape["id"]] = Backbone(create_clip(shape["model"]), shape["model"], DEVICE,
                                           "bf16" if DEVICE.type == "cuda" else "fp32")
    return _BACKBONES[shape["id"]]


def method_case(shape, name):
    """The setup factory: (step function, trainable parameter count) for ``name`` at ``shape``."""
    backbone = _backbone(shape)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(shape["B"], 3, backbone.image_size, backbone.image_size, generator=g).to(DEVICE)
    labels = torch.arange(shape["B"], device=DEVICE) % shape["K"]
    classes = ClassSet(CLASSES[: shape["K"]], "a chest X-ray showing {}.")
    empty = View("train", None, [], [])
    task = Task(classes, empty, empty, seed=0)
    scale = backbone.logit_scale
    with torch.no_grad(), backbone.autocast():
        feats = F.normalize(backbone.clip.encode_image(images).float(), dim=-1)
    text = backbone.text_features(classes.prompts)

    if name == "frozen-features":
        def step():
            with torch.no_grad(), backbone.autocast():
                backbone.clip.encode_image(images)
        return step, 0
    if name == "linear-probe":
        # The probe is an L-BFGS logistic regression; one of its iterations is a
        # linear layer's forward and gradient on the features, timed here.
        head = torch.nn.Linear(feats.shape[1], shape["K"]).to(DEVICE)

        def step():
            torch.autograd.grad(F.cross_entropy(head(feats), labels), list(head.parameters()))
        return step, sum(p.numel() for p in head.parameters())
    if name == "clip-adapter":
        adapter = Adapter(feats.shape[1]).to(DEVICE)

        def step():
            logits = scale * F.normalize(adapter(feats), dim=-1) @ text.t()
            torch.autograd.grad(F.cross_entropy(logits, labels), list(adapter.parameters()))
        return step, sum(p.numel() for p in adapter.parameters())
    if name == "coop":
        method = CoOp()
        method.setup(backbone, task)

        def step():
            logits = scale * feats @ method.text_features(backbone, classes.names).t()
            torch.autograd.grad(F.cross_entropy(logits, labels), [method.learner.ctx])
        return step, method.trainable_parameters()
    if name == "lora":
        method = LoRA()
        method.setup(backbone, task)

        def step():
            loss = F.cross_entropy(method.logits(backbone, images, classes), labels)
            torch.autograd.grad(loss, method.params)
        return step, method.trainable_parameters()
    method = Nearl("paired" if name == "nearl" else "shared")
    method.setup(backbone, task)
    params = [p for p in method.model.parameters() if p.requires_grad]
    texts = backbone.tokens(classes.prompts)

    def step():
        with backbone.autocast():
            loss, _ = method.model(images, texts, labels)
        torch.autograd.grad(loss, params)
    return step, method.trainable_parameters()


@pytest.mark.parametrize("name", METHODS)
def test_method_train_step(benchmark, shape, name):
    benchmark.group = f"methods {shape['id']} train_step"
    step, n_params = method_case(shape, name)

    def run():
        step()
        sync()

    run()
    benchmark.extra_info.update(method=name, shape=shape["id"], device=str(DEVICE), trainable_parameters=n_params,
                                peak_memory_bytes=peak_memory(run, "reference"))
    benchmark.pedantic(run, rounds=shape["rounds"], warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["images_per_second"] = shape["B"] / stats.stats.mean
    assert benchmark.extra_info["peak_memory_bytes"] is None or benchmark.extra_info["peak_memory_bytes"] > 0
