"""What every comparison method shares: the frozen backbone, the splits, features, training loop.

A method sees one ``Task`` (the few-shot train and validation views, the class
names and their prompts) and the grid-wide ``Backbone`` (the frozen open_clip
model, device, precision and the feature caches). It fits on ``task.train``,
may use ``task.val`` only through :func:`fit_loop`'s early-stopping rule or its
own published validation search, and predicts probabilities for any view and
any list of prompts (which is how base-to-novel scores unseen classes).
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._cli import AUTOCAST_DTYPES
from ..data import LabeledImages
from ..prompts import tokenize_prompts
from ..towers import text_tower


@dataclass
class View:
    """Some images of one split: ``indices`` into ``dataset`` with their (possibly remapped) labels.

    Features are cached per (split, index), so every few-shot sample drawn from
    a split reuses the features computed for it once.
    """

    split: str
    dataset: LabeledImages
    indices: List[int]
    labels: List[int]

    def __len__(self) -> int:
        return len(self.indices)

    def images(self) -> LabeledImages:
        d = self.dataset
        return LabeledImages([d.items[i] for i in self.indices], list(self.labels), d.image_size, d.mean, d.std)


@dataclass
class ClassSet:
    """Classes in label order: their names and the prompt template with one ``{}``."""

    names: List[str]
    template: str

    @property
    def prompts(self) -> List[str]:
        return [self.template.format(name) for name in self.names]

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class Task:
    """One cell's data: the few-shot train and validation views and the classes they cover."""

    classes: ClassSet
    train: View
    val: View
    seed: int


class Backbone:
    """The frozen open_clip model every method shares, with its feature caches.

    Args:
        clip: an open_clip CLIP; frozen in place.
        model_name: the open_clip name (picks the tokenizer).
        device: where everything runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast, as ``nearl_model.train``).
        max_steps: cap on the optimiser steps of every iterative method (None: each paper's schedule).
        batch_size: batch for feature extraction and prediction.
        heartbeat: called as ``heartbeat(text)`` from training loops, for progress reports.
    """

    def __init__(self, clip: nn.Module, model_name: str, device: torch.device, precision: str = "fp32",
                 max_steps: Optional[int] = None, batch_size: int = 64,
                 heartbeat: Optional[Callable[[str], None]] = None):
        self.clip = clip.to(device).eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.model_name = model_name
        self.device = device
        self.precision = precision
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.heartbeat = heartbeat or (lambda text: None)
        self._image_cache: Dict[Tuple[str, int], torch.Tensor] = {}
        self._token_cache: Dict[Tuple[str, ...], torch.Tensor] = {}
        self._pixel_cache: Dict[Tuple[str, int], torch.Tensor] = {}

    @property
    def context_length(self) -> int:
        text = self.clip if hasattr(self.clip, "token_embedding") else getattr(self.clip, "text", self.clip)
        return text.positional_embedding.shape[0]

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().float()

    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (K, n), cut to the longest prompt (exact for causal towers); cached, since
        building open_clip's tokenizer costs far more than a training step."""
        key = tuple(prompts)
        if key not in self._token_cache:
            self._token_cache[key] = tokenize_prompts(list(prompts), self.model_name, self.context_length).to(self.device)
        return self._token_cache[key]

    def full_tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded back to the context length, as ``clip.encode_text`` expects."""
        t = self.tokens(prompts)
        # The tower's own pad id: 0 for CLIP's tokenizer, 1 for RoBERTa's.
        pad = getattr(text_tower(self.clip), "pad_id", 0)
        return F.pad(t, (0, self.context_length - t.shape[1]), value=pad)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Frozen, normalised text features (K, D) in fp32: ``clip.encode_text``."""
        with self.autocast():
            f = self.clip.encode_text(self.full_tokens(prompts))
        return F.normalize(f.float(), dim=-1)

    def pixels(self, view: View, cache: bool = True) -> torch.Tensor:
        """The view's preprocessed images (N, 3, H, W) on the device.

        ``cache=True`` (the few-shot train and validation views, which every
        step reads) decodes each image once; prediction streams without caching,
        so a large test split never sits in memory as pixels.
        """
        if not cache:
            return torch.stack([view.dataset[i][0] for i in view.indices]).to(self.device)
        missing = [i for i in view.indices if (view.split, i) not in self._pixel_cache]
        for i in missing:
            self._pixel_cache[(view.split, i)] = view.dataset[i][0]
        return torch.stack([self._pixel_cache[(view.split, i)] for i in view.indices]).to(self.device)

    def chunks(self, view: View):
        """``view`` in prediction batches of ``batch_size`` images."""
        for start in range(0, len(view), self.batch_size):
            end = start + self.batch_size
            yield View(view.split, view.dataset, view.indices[start:end], view.labels[start:end])

    @torch.no_grad()
    def image_features(self, view: View) -> torch.Tensor:
        """Frozen, normalised image features (N, D) in fp32: ``clip.encode_image``, cached per image."""
        missing = [i for i in view.indices if (view.split, i) not in self._image_cache]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            images = torch.stack([view.dataset[i][0] for i in chunk]).to(self.device)
            with self.autocast():
                f = self.clip.encode_image(images)
            for i, row in zip(chunk, F.normalize(f.float(), dim=-1)):
                self._image_cache[(view.split, i)] = row
        return torch.stack([self._image_cache[(view.split, i)] for i in view.indices])

    def labels(self, view: View) -> torch.Tensor:
        return torch.tensor(view.labels, device=self.device)


class Method:
    """The interface: fit on a task, then predict class probabilities for any view and prompts.

    Class attributes:
        name: the ``--methods`` name.
        scores_unseen_classes: whether prompts alone can define its classes
            (False: base-to-novel reports n/a for the novel classes).
        paper: citation shown in the report.
    """

    name = ""
    scores_unseen_classes = True
    paper = ""

    def fit(self, backbone: Backbone, task: Task) -> None:
        """Train (or build) the method on ``task.train``; ``task.val`` only for early stopping or search."""
        raise NotImplementedError

    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        """Probabilities (N, K) over ``classes`` for the images of ``view``."""
        raise NotImplementedError

    def trainable_parameters(self) -> int:
        return 0


def check_same_classes(classes: ClassSet, fitted: ClassSet) -> None:
    """Check that a closed-set method is asked about the classes it was fitted on."""
    if list(classes.names) != list(fitted.names):
        raise ValueError("this method scores only the classes it was fitted on; "
                         f"fitted on {fitted.names}, asked about {classes.names}")


@dataclass
class Schedule:
    """An optimiser schedule in steps, with the rule that turns a paper's epochs into steps."""

    steps: int
    batch_size: int

    @staticmethod
    def from_epochs(epochs: int, n_train: int, batch_size: int, max_steps: Optional[int]) -> "Schedule":
        """``epochs`` passes over the few-shot set at ``batch_size`` (drop-last, at least one batch)."""
        batch = min(batch_size, n_train)
        steps = epochs * max(1, n_train // batch)
        return Schedule(min(steps, max_steps) if max_steps else steps, batch)

    @staticmethod
    def from_steps(steps: int, n_train: int, batch_size: int, max_steps: Optional[int]) -> "Schedule":
        return Schedule(min(steps, max_steps) if max_steps else steps, min(batch_size, n_train))


# One early-stopping rule for every trained method: evaluate on the validation
# view EVALUATIONS times over the schedule, keep the parameters with the best
# validation accuracy (ties: lower validation loss), and stop when PATIENCE
# evaluations in a row bring no improvement.
EVALUATIONS = 10
PATIENCE = 5


def batches(n: int, batch: int, seed: int, step: int) -> List[int]:
    """The indices of optimiser step ``step``: seeded permutations per epoch, drop-last."""
    per_epoch = max(1, n // batch)
    epoch, i = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return perm[i * batch : (i + 1) * batch]


def fit_loop(backbone: Backbone, params: List[torch.Tensor], schedule: Schedule, seed: int,
             loss_fn: Callable[[List[int]], torch.Tensor],
             val_fn: Callable[[], Tuple[float, float]],
             optimizer: torch.optim.Optimizer,
             lr_at: Callable[[int], float], name: str, n_train: int, grad_clip: Optional[float] = None) -> Dict:
    """Train ``params`` for ``schedule.steps`` steps under the shared early-stopping rule.

    Args:
        loss_fn: the loss of one batch, given its indices into the train view.
        val_fn: (accuracy, loss) on the validation view, in eval mode.
        lr_at: the learning-rate multiplier at each step (LambdaLR).
        name: shown in heartbeat lines.
        grad_clip: clip the gradient norm to this (where the method's paper does).

    Returns:
        a summary: steps run, best step, best validation accuracy and loss.
    """
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    every = max(1, math.ceil(schedule.steps / EVALUATIONS))
    best = (-1.0, math.inf)
    best_state = [p.detach().clone() for p in params]
    best_step, stale, step = 0, 0, 0
    last_beat = time.time()
    for step in range(1, schedule.steps + 1):
        idx = batches(n_train, schedule.batch_size, seed, step - 1)
        loss = loss_fn(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        if time.time() - last_beat > 5:
            backbone.heartbeat(f"{name}: step {step}/{schedule.steps}, loss {loss.item():.3f}")
            last_beat = time.time()
        if step % every == 0 or step == schedule.steps:
            acc, vloss = val_fn()
            if acc > best[0] or (acc == best[0] and vloss < best[1]):
                best, best_step, stale = (acc, vloss), step, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
    with torch.no_grad():
        for p, saved in zip(params, best_state):
            p.copy_(saved)
    return {"steps": step, "best_step": best_step, "val_accuracy": best[0], "val_loss": best[1]}


def val_scores(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[float, float]:
    """Accuracy and cross-entropy of validation logits."""
    logits = logits.float()
    return float((logits.argmax(1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


def cosine_warmup(total: int, warmup: int = 0, warmup_factor: Optional[float] = None, floor: float = 0.0):
    """A LambdaLR multiplier: cosine from 1 to ``floor`` over ``total`` steps.

    ``warmup`` steps first, either linear to 1 or, with ``warmup_factor``, held
    at that constant fraction (CoOp's "constant" warm-up at 1e-5).
    """

    def f(step: int) -> float:
        if step < warmup:
            return warmup_factor if warmup_factor is not None else (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def softmax_np(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()
