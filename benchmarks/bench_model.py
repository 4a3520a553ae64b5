"""Whole NearlCLIP: inference forward and training step, and the adapter overhead.

The adapter overhead is a NearlCLIP training step (forward + backward to the
adapter parameters) over the same frozen CLIP's step with gradients flowing
back through the same blocks and no adapters: the median ratio over rounds
in which the two run back to back (``interleaved_overhead``).
"""

import pytest
import torch
import torch.nn.functional as F

from common import DEVICE, interleaved_overhead, peak_memory, size_class, sync, traffic
from nearl_model import NearlCLIP, NearlConfig, class_prompts, tokenize_prompts

SHAPES = {
    "gpu": [dict(id="ViT-B-16-B64-K4", model="ViT-B-16", B=64, K=4, rounds=10)],
    "cpu": [dict(id="ViT-B-16-B4-K4", model="ViT-B-16", B=4, K=4, rounds=6)],
    "smoke": [dict(id="tiny-B2-K2", model="nearl-tiny", B=2, K=2, rounds=1)],
}
CLASSES = ["normal lungs", "bacterial pneumonia", "viral pneumonia", "pleural effusion"]
_MODELS = {}


def model_case(shape, fused: bool):
    """The setup factory: a NearlCLIP at ``shape`` with non-zero adapters, images, prompts, labels."""
    key = (shape["id"], fused)
    if key not in _MODELS:
        torch.manual_seed(0)
        model = NearlCLIP.from_pretrained(shape["model"], config=NearlConfig(), fused=fused).to(DEVICE)
        with torch.no_grad():
            for oca in (*model.adapters.oca_image, *model.adapters.oca_text):
                oca.w_up.normal_(0, 0.02)
        _MODELS[key] = model
    model = _MODELS[key]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(shape["B"], 3, *model.image_size, generator=g).to(DEVICE)
    texts = tokenize_prompts(class_prompts(CLASSES[: shape["K"]], "a chest X-ray showing {}.")).to(DEVICE)
    labels = torch.arange(shape["B"], device=DEVICE) % shape["K"]
    return model, images, texts, labels


def _autocast():
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=DEVICE.type == "cuda")


def nearl_step(model, images, texts, labels):
    with _autocast():
        loss, _ = model.loss(images, texts, labels)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(loss, params)
    sync()


def frozen_clip_step(model, images, texts, labels):
    """The same frozen blocks, heads and loss with no adapters.

    It runs the backbone exactly as NearlCLIP does (the K prompts' first text
    blocks once, then a copy per image) and lets gradients flow from the loss
    back through every block after the first interaction point, which is as
    far as NearlCLIP's gradients reach: the difference is the adapters' cost.
    """
    image, text = model.image_tower, model.text_tower
    B, (K, n) = images.shape[0], texts.shape
    v_first, t_first = model.image_schedule[0] + 1, model.text_schedule[0] + 1
    tokens = texts.repeat(B, 1)
    with _autocast():
        with torch.no_grad():
            x_v, x_t = image.embed(images), text.embed(texts)
            mask = text.attention(texts, x_t)
            for i in range(v_first):
                x_v = image.block(i, x_v)
            for i in range(t_first):
                x_t = text.block(i, x_t, mask)
        x_v = x_v.requires_grad_()
        x_t = x_t.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * K, n, -1).requires_grad_()
        mask = text.attention(tokens, x_t)
        h_v, h_t = x_v, x_t
        for i in range(v_first, image.n_blocks):
            h_v = image.block(i, h_v)
        for i in range(t_first, text.n_blocks):
            h_t = text.block(i, h_t, mask)
        img = image.head(h_v)
        txt = text.head(h_t, tokens).view(B, K, -1)
        logits = model._logits(img, txt)
        loss = F.cross_entropy(logits.float(), labels)
    torch.autograd.grad(loss, [x_v, x_t])
    sync()


def _record(benchmark, shape, mode, provider, run):
    benchmark.extra_info.update(op="nearl_clip", shape=shape["id"], mode=mode, provider=provider, device=str(DEVICE))
    figures = traffic(run, provider, 0)
    benchmark.extra_info.update(launches=figures["launches"], bytes_moved=figures["bytes_moved"],
                                peak_memory_bytes=peak_memory(run, provider))
    benchmark.pedantic(run, rounds=shape["rounds"], warmup_rounds=1 if shape["rounds"] > 1 else 0)
    return getattr(benchmark, "stats", None) is not None


def test_frozen_clip_train_step(benchmark, shape):
    benchmark.group = f"nearl_clip {shape['id']} train_step"
    model, images, texts, labels = model_case(shape, fused=False)
    _record(benchmark, shape, "train_step", "frozen_clip", lambda: frozen_clip_step(model, images, texts, labels))
    assert benchmark.extra_info["launches"] > 0


@pytest.mark.parametrize("provider", ["reference", "fused"])
def test_nearl_train_step(benchmark, shape, provider):
    benchmark.group = f"nearl_clip {shape['id']} train_step"
    model, images, texts, labels = model_case(shape, fused=provider == "fused")
    timed = _record(benchmark, shape, "train_step", provider, lambda: nearl_step(model, images, texts, labels))
    if timed:
        median, low, high = interleaved_overhead(
            lambda: nearl_step(model, images, texts, labels),
            lambda: frozen_clip_step(model, images, texts, labels), shape["rounds"],
        )
        benchmark.extra_info.update(adapter_overhead=median, adapter_overhead_range=[low, high])
    assert benchmark.extra_info["mode"] == "train_step"


@pytest.mark.parametrize("provider", ["reference", "fused", "compiled"])
def test_nearl_forward(benchmark, shape, provider, request):
    if provider == "compiled" and size_class(request.config) != "gpu":
        pytest.skip("inductor takes minutes to compile the whole ViT-B/16 graph on 2 CPU cores; timed on GPU only")
    benchmark.group = f"nearl_clip {shape['id']} forward"
    model, images, texts, _ = model_case(shape, fused=provider != "reference")
    fn = torch.compile(model) if provider == "compiled" else model

    def run():
        with torch.no_grad(), _autocast():
            fn(images, texts)
        sync()

    run()
    _record(benchmark, shape, "forward", provider, run)
    assert benchmark.extra_info["launches"] is None or benchmark.extra_info["launches"] > 0
