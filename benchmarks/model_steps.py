"""The whole-model steps users compare, built once and shared by the timings, the launch counts and the tests.

Per interaction mode (paired, shared):

- ``nearl``: a NearlCLIP training step (forward, backward, AdamW);
- ``floor``: its own frozen floor, the same frozen blocks, heads and loss with
  no adapters, gradients flowing back only as far as NearlCLIP's do (every
  block after the first interaction point); paired runs B*K text sequences,
  shared runs K;
- ``finetune``: a full fine-tune step of the same CLIP (every parameter, AdamW);
- ``lora``: the CLIP-LoRA step of ``nearl_model.methods.lora`` (AdamW);
- inference: NearlCLIP's scores and plain CLIP zero-shot (image + K texts).

Every optimiser is AdamW with ``fused=True`` (one kernel per step for all
parameters, on CPU and CUDA alike), so the step issues the same ops on any device.
"""

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from nearl_model import NearlCLIP, NearlConfig, class_prompts, tokenize_prompts
from nearl_model.methods.coop import run_text_tower, text_parts
from nearl_model.methods.lora import apply_lora

CLASSES = ["normal lungs", "bacterial pneumonia", "viral pneumonia", "pleural effusion", "atelectasis",
           "cardiomegaly", "pneumothorax", "nodule", "mass", "infiltration"]
MODES = ("paired", "shared")
# The smoke shape: what the launch counts and the tests run on CPU.
SMOKE = dict(model="nearl-tiny", B=2, K=2)


@dataclass
class Batch:
    images: torch.Tensor
    texts: torch.Tensor
    labels: torch.Tensor


def make_batch(model: NearlCLIP, B: int, K: int, device: torch.device) -> Batch:
    """B random images at the model's size, K class prompts, labels cycling over the classes."""
    if not 1 <= K <= len(CLASSES):
        raise ValueError(f"K must be in [1, {len(CLASSES)}]; got {K}")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, model.image_tower.in_channels, *model.image_size, generator=g).to(device)
    texts = tokenize_prompts(class_prompts(CLASSES[:K], "a chest X-ray showing {}.")).to(device)
    return Batch(images, texts, torch.arange(B, device=device) % K)


def make_nearl(model_name: str, mode: str, fused: bool, device: torch.device) -> NearlCLIP:
    """A seeded NearlCLIP with non-zero up-projections, so every adapter term is live."""
    torch.manual_seed(0)
    model = NearlCLIP.from_pretrained(model_name, config=NearlConfig(mode=mode), fused=fused).to(device)
    with torch.no_grad():
        for oca in (*model.adapters.oca_image, *model.adapters.oca_text):
            oca.w_up.normal_(0, 0.02)
    return model


def adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-4, fused=True)


def _autocast(device: torch.device, dtype):
    # No autocast object at all without a dtype: the meta device has no autocast dtype to look up.
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _train(loss_fn: Callable[[], torch.Tensor], optimizer: Optional[torch.optim.Optimizer]) -> None:
    if optimizer is None:
        loss_fn().backward()
        return
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    optimizer.step()


def clip_text_features(clip, texts: torch.Tensor) -> torch.Tensor:
    """open_clip's text features for K prompts cut to their n tokens (as NearlCLIP runs them)."""
    text = text_parts(clip)
    return run_text_tower(text, text.token_embedding(texts).to(text.transformer.get_cast_dtype()), texts)


def clip_logits(clip, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Plain CLIP zero-shot logits (B, K): image features against K prompts."""
    img = F.normalize(clip.encode_image(images).float(), dim=-1)
    txt = F.normalize(clip_text_features(clip, texts).float(), dim=-1)
    return clip.logit_scale.exp() * img @ txt.t()


def floor_loss(model: NearlCLIP, batch: Batch) -> torch.Tensor:
    """The frozen floor's loss: NearlCLIP's walk with no adapters, inputs to the first interaction detached.

    The blocks before the first interaction point run without gradients (no
    adapter sits below them); the tokens entering the next block require a
    gradient, so the backward runs through every later block, as NearlCLIP's
    does. Paired gives each image its copy of the K prompts (B*K sequences),
    shared scores all images against the one set of K.
    """
    image, text = model.image_tower, model.text_tower
    images, texts = batch.images, batch.texts.long()
    B, (K, n) = images.shape[0], texts.shape
    paired = model.config.mode == "paired"
    v_first, t_first = model.image_schedule[0] + 1, model.text_schedule[0] + 1
    with torch.no_grad():
        x_v, x_t = image.embed(images), text.embed(texts)
        mask = text.attention(texts, x_t)
        for i in range(v_first):
            x_v = image.block(i, x_v)
        for i in range(t_first):
            x_t = text.block(i, x_t, mask)
    tokens = texts
    if paired:
        tokens = texts.repeat(B, 1)
        x_t = x_t.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * K, n, -1)
        mask = text.attention(tokens, x_t)
    x_v, x_t = x_v.requires_grad_(), x_t.requires_grad_()
    for i in range(v_first, image.n_blocks):
        x_v = image.block(i, x_v)
    for i in range(t_first, text.n_blocks):
        x_t = text.block(i, x_t, mask)
    txt = text.head(x_t, tokens)
    logits = model.logits_from_features(image.head(x_v), txt.view(B, K, -1) if paired else txt)
    return F.cross_entropy(logits.float(), batch.labels)


def training_steps(model: NearlCLIP, batch: Batch, dtype=None, baselines: bool = True) -> Dict[str, Callable[[], None]]:
    """``{"nearl", "floor", "finetune", "lora"}``: one training step each, same CLIP, same batch.

    The fine-tune and LoRA steps train private copies of the backbone;
    ``baselines=False`` leaves them out (``{"nearl", "floor"}``). On the meta
    device (shapes only, where fused AdamW cannot go) the NEARL step stops
    after its backward.
    """
    device = batch.images.device
    nearl_opt = adamw([p for p in model.parameters() if p.requires_grad]) if device.type != "meta" else None

    def nearl_loss():
        with _autocast(device, dtype):
            return model.loss(batch.images, batch.texts, batch.labels)[0]

    def floor():
        with _autocast(device, dtype):
            loss = floor_loss(model, batch)
        loss.backward()

    steps = {"nearl": lambda: _train(nearl_loss, nearl_opt), "floor": floor}
    if not baselines:
        return steps
    full = copy.deepcopy(model.clip).requires_grad_(True)
    full_opt = adamw(full.parameters())
    lora_clip = copy.deepcopy(model.clip)
    layers = apply_lora(lora_clip)
    lora_params = [p for layer in layers for p in (*layer.lora_a.values(), *layer.lora_b.values())]
    lora_opt = adamw(lora_params)

    def clip_loss(clip):
        def loss():
            with _autocast(device, dtype):
                return F.cross_entropy(clip_logits(clip, batch.images, batch.texts), batch.labels)
        return loss

    steps["finetune"] = lambda: _train(clip_loss(full), full_opt)
    steps["lora"] = lambda: _train(clip_loss(lora_clip), lora_opt)
    return steps


def inference_steps(model: NearlCLIP, batch: Batch, dtype=None) -> Dict[str, Callable[[], torch.Tensor]]:
    """``{"nearl", "clip"}``: class scores for the batch, NearlCLIP's and plain CLIP zero-shot's."""
    device = batch.images.device

    def run(fn):
        def go():
            with torch.no_grad(), _autocast(device, dtype):
                return fn()
        return go

    return {"nearl": run(lambda: model(batch.images, batch.texts)),
            "clip": run(lambda: clip_logits(model.clip, batch.images, batch.texts))}
