"""CoOp: learned context vectors in front of each class name, through the frozen text tower.

Zhou et al., "Learning to Prompt for Vision-Language Models", IJCV 2022.
Published defaults: 16 context tokens shared by all classes ("unified"),
class token at the end, initialised from N(0, 0.02); SGD lr 2e-3, momentum
0.9, weight decay 5e-4, batch 32, cosine decay after one warm-up epoch at a
constant 1e-5; 50 epochs at 1 shot, 100 at 2-4 shots, 200 at 8-16 shots.
``ctx_init="a photo of a"`` (the paper's 4-token variant) starts the context
from a phrase's token embeddings instead; with the phrase the zero-shot
template puts before the class name, CoOp at initialisation is zero-shot CLIP.
"""

from typing import List, Optional, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from .base import Backbone, ClassSet, Method, Schedule, Task, View, cosine_warmup, fit_loop, softmax_np, val_scores

N_CTX, CTX_STD = 16, 0.02
LR, MOMENTUM, WEIGHT_DECAY, BATCH, WARMUP_LR = 2e-3, 0.9, 5e-4, 32, 1e-5
PLACEHOLDER = "X"


def coop_epochs(shots: int) -> int:
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def text_parts(clip: nn.Module) -> nn.Module:
    """The module holding the text tower (open_clip CLIP keeps it on itself, CustomTextCLIP on ``.text``)."""
    if isinstance(clip, open_clip.CLIP):
        return clip
    text = getattr(clip, "text", None)
    if isinstance(text, open_clip.transformer.TextTransformer) and text.cls_emb is None:
        return text
    raise TypeError(f"CoOp needs an open_clip causal text transformer; got {type(clip).__name__} "
                    f"with text tower {type(text).__name__}")


def split_template(template: str):
    """``"a chest X-ray showing {}."`` -> ("a chest X-ray showing", ".")."""
    before, after = template.split("{}")
    return before.strip(), after


class PromptLearner(nn.Module):
    """Context vectors (n_ctx, width) and the frozen embeddings of SOS, class names and suffix."""

    def __init__(self, backbone: Backbone, n_ctx: int, ctx_init: Optional[str]):
        super().__init__()
        text = text_parts(backbone.clip)
        self.backbone = backbone
        width = text.token_embedding.weight.shape[1]
        if ctx_init:
            init_tokens = backbone.tokens([ctx_init])[0]
            n_ctx = int((init_tokens != 0).sum()) - 2
            with torch.no_grad():
                emb = text.token_embedding(init_tokens)[1 : 1 + n_ctx]
            self.ctx = nn.Parameter(emb.float().clone())
        else:
            self.ctx = nn.Parameter(torch.randn(n_ctx, width, device=backbone.device) * CTX_STD)
        self.n_ctx = n_ctx

    def encode(self, names: List[str], suffix: str) -> torch.Tensor:
        """Unnormalised text features (K, D) of ``[SOS] ctx name suffix [EOT]``."""
        text = text_parts(self.backbone.clip)
        prompts = [" ".join([PLACEHOLDER] * self.n_ctx) + " " + name + suffix for name in names]
        tokens = self.backbone.tokens(prompts)
        cast = text.transformer.get_cast_dtype()
        emb = text.token_embedding(tokens).to(cast)
        ctx = self.ctx.to(cast).unsqueeze(0).expand(len(names), -1, -1)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx :]], dim=1)
        return run_text_tower(text, x, tokens)


def run_text_tower(text: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's ``encode_text`` from token embeddings ``x`` (K, n, width), cut to n tokens.

    The tower is causal, so running n tokens instead of the padded context
    length gives the same features at the end token, for a fraction of the work.
    """
    cast = text.transformer.get_cast_dtype()
    n = x.shape[1]
    x = x + text.positional_embedding[:n].to(cast)
    mask = text.attn_mask
    x = text.transformer(x, attn_mask=None if mask is None else mask[:n, :n])
    x = text.ln_final(x)
    pool = getattr(text, "text_pool_type", getattr(text, "pool_type", "argmax"))
    eos = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
    x = text_global_pool(x, tokens, pool, eos_token_id=eos)
    proj = text.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


class CoOp(Method):
    name = "coop"
    paper = "Zhou et al., IJCV 2022 (CoOp)"

    def __init__(self, n_ctx: int = N_CTX, ctx_init: Optional[str] = None):
        self.n_ctx, self.ctx_init = n_ctx, ctx_init
        self.learner = None
        self.summary = {}

    def setup(self, backbone: Backbone, task: Task) -> None:
        """Fresh context vectors for ``task`` (seeded); ``fit`` calls it, tests use it alone."""
        torch.manual_seed(task.seed)
        self.learner = PromptLearner(backbone, self.n_ctx, self.ctx_init)
        self.suffix = split_template(task.classes.template)[1]

    def text_features(self, backbone: Backbone, names: Sequence[str]) -> torch.Tensor:
        with backbone.autocast():
            return F.normalize(self.learner.encode(list(names), self.suffix).float(), dim=-1)

    def fit(self, backbone: Backbone, task: Task) -> None:
        self.setup(backbone, task)
        x, y = backbone.image_features(task.train), backbone.labels(task.train)
        xv, yv = backbone.image_features(task.val), backbone.labels(task.val)
        shots = max(1, len(y) // len(task.classes))
        schedule = Schedule.from_epochs(coop_epochs(shots), len(y), BATCH, backbone.max_steps)
        per_epoch = max(1, len(y) // schedule.batch_size)
        params = [self.learner.ctx]
        optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

        def loss_fn(idx):
            # The text tower runs once per step for all K classes; the image features are cached.
            return F.cross_entropy(backbone.logit_scale * x[idx] @ self.text_features(backbone, task.classes.names).t(), y[idx])

        def val_fn():
            with torch.no_grad():
                return val_scores(backbone.logit_scale * xv @ self.text_features(backbone, task.classes.names).t(), yv)

        lr_at = cosine_warmup(schedule.steps, min(per_epoch, schedule.steps - 1), WARMUP_LR / LR)
        self.summary = fit_loop(backbone, params, schedule, task.seed, loss_fn, val_fn, optimizer, lr_at,
                                self.name, len(y))

    @torch.no_grad()
    def logits(self, backbone: Backbone, view: View, classes: ClassSet) -> torch.Tensor:
        """The learned context with ``classes``' names: unseen names work too."""
        return backbone.logit_scale * backbone.image_features(view) @ self.text_features(backbone, classes.names).t()

    def predict_proba(self, backbone: Backbone, view: View, classes: ClassSet) -> np.ndarray:
        return softmax_np(self.logits(backbone, view, classes))

    def trainable_parameters(self) -> int:
        return self.learner.ctx.numel() if self.learner is not None else 0
