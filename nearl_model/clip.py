"""NearlCLIP: a frozen open_clip CLIP with NEARL-CLIP adapters composed around its blocks."""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_io import load_into, write_adapter
from .backbones import create_clip
from .config import NearlConfig
from .modules import NearlAdapters, interaction_layer
from .towers import SUPPORTED_TOWERS, check_supported

__all__ = ["NearlCLIP", "SUPPORTED_TOWERS"]


def _layer_schedule(n_blocks: int, n_layers: int) -> list:
    """Block index after which interaction layer j sits: round((j+1) * n_blocks / J) - 1, halves up."""
    return [math.floor((j + 1) * n_blocks / n_layers + 0.5) - 1 for j in range(n_layers)]


class NearlCLIP(nn.Module):
    """NEARL-CLIP over a frozen open_clip model.

    The backbone's blocks run unchanged; after each mapped block pair the
    adapters compute the down-projections, update the synergy queries with a
    USEformer block, and apply the OCA to both towers' tokens.

    The towers are reached only through ``nearl_model.towers`` (open_clip
    ViT, timm ViT, causal or bidirectional TextTransformer, Hugging Face
    BERT/RoBERTa encoders), so any supported pair works the same way.

    Args:
        clip: an open_clip CLIP or CustomTextCLIP (see ``SUPPORTED_TOWERS``);
            it is frozen in place.
        config: adapter configuration; ``NearlConfig()`` by default.
        fused: route the adapters through the ``nearl_kernels`` custom ops
            (Triton on CUDA, the reference maths on CPU, so always valid);
            False calls the reference maths directly. Same state dict.

    Example:
        >>> model = NearlCLIP.from_pretrained("ViT-B-16", pretrained=None)
        >>> logits = model(images, texts)          # (B, K)
    """

    def __init__(self, clip: nn.Module, config: Optional[NearlConfig] = None, fused: bool = True):
        super().__init__()
        config = config or NearlConfig()
        if not isinstance(config, NearlConfig):
            raise TypeError(f"config must be a NearlConfig; got {type(config).__name__}")
        if fused:
            config.check_fused()
        # Plain objects, not submodules: the backbone's parameters stay registered once, under clip.
        self.image_tower, self.text_tower = check_supported(clip)
        self.clip = clip
        self.config = config
        self.fused = fused
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()

        n_img, n_txt = self.image_tower.n_blocks, self.text_tower.n_blocks
        self.n_layers = min(n_img, n_txt)
        self.image_schedule = _layer_schedule(n_img, self.n_layers)
        self.text_schedule = _layer_schedule(n_txt, self.n_layers)
        self.adapters = NearlAdapters(config, self.n_layers, self.image_tower.width, self.text_tower.width)
        # The interaction layer's code: torch.compile'd once by compile_regions().
        self._interaction = interaction_layer

    @classmethod
    def from_pretrained(
        cls, model: str, pretrained: Optional[str] = None, config: Optional[NearlConfig] = None, fused: bool = True
    ) -> "NearlCLIP":
        """Build the open_clip backbone and attach fresh adapters.

        Args:
            model: an open_clip name, ``"biomedclip"``, an ``hf-hub:`` id, or a
                JSON config (see :func:`nearl_model.create_clip`).
            pretrained: an open_clip tag or a local checkpoint; offline
                download failures raise a RuntimeError that says how to load
                a downloaded file instead.
            config: adapter configuration; ``NearlConfig()`` by default.
            fused: see the class docstring; on by default, as in the CLIs.

        Returns:
            the NearlCLIP, backbone frozen, adapters at their identity init.
        """
        return cls(create_clip(model, pretrained), config, fused=fused)

    def train(self, mode: bool = True) -> "NearlCLIP":
        super().train(mode)
        # The frozen backbone keeps eval() for its norms and dropout.
        self.clip.eval()
        return self

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.image_tower.image_size)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def build_kernels(self, texts: torch.Tensor, dtype: Optional[torch.dtype] = None, backward: bool = True) -> None:
        """Compile every Triton kernel a step launches, on a throw-away batch of two blank images.

        On CUDA with ``fused=True`` this turns a kernel that does not build on this machine's
        Triton into one :class:`nearl_kernels.KernelBuildError` before any training or scoring
        starts; elsewhere nothing is compiled and it returns at once. Gradients are left as they were.

        Args:
            texts: the run's prompt tokens (K, n), on the model's device.
            dtype: the autocast dtype the run uses (None: no autocast).
            backward: build the backward kernels too (training).
        """
        device = texts.device
        if not (self.fused and device.type == "cuda"):
            return
        images = torch.zeros(2, self.image_tower.in_channels, *self.image_size, device=device)
        trainable = [p for p in self.parameters() if p.requires_grad]
        grads = [p.grad for p in trainable]
        with torch.set_grad_enabled(backward), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = self(images, texts)
        if backward:
            torch.autograd.grad(logits.float().sum(), trainable, allow_unused=True)
        for p, g in zip(trainable, grads):
            p.grad = g

    def compile_regions(self, **compile_kwargs) -> "NearlCLIP":
        """Regional compilation: torch.compile each repeated region once and reuse it at every layer.

        The frozen blocks of each tower share one class, so one compiled graph
        serves all of a tower's blocks; the interaction layer (down-projections,
        USEformer block, both OCAs) is one function, compiled once for every
        layer. Compiling the whole model instead traces every layer unrolled.
        The custom ops stay opaque to the compiler (Triton on CUDA). In place;
        weights and state dicts are unchanged.

        Args:
            compile_kwargs: passed to ``torch.compile`` (mode, dynamic, backend...).

        Returns:
            self.

        Example:
            >>> model = NearlCLIP.from_pretrained("ViT-B-16").compile_regions()
        """
        for block in (*self.image_tower.block_modules(), *self.text_tower.block_modules()):
            block.compile(**compile_kwargs)
        self._interaction = torch.compile(interaction_layer, **compile_kwargs)
        return self

    def _check_inputs(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        self._check_images(images)
        self._check_texts(texts)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(
                f"images must be a float tensor (B, C, H, W), normalised as the backbone expects; "
                f"got {getattr(images, 'dtype', type(images).__name__)}"
            )
        channels = self.image_tower.in_channels
        if images.dim() != 4 or images.shape[1] != channels or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(
                f"images must be (B, {channels}, {self.image_size[0]}, {self.image_size[1]}); got {tuple(images.shape)}"
            )

    def _check_texts(self, texts: torch.Tensor) -> None:
        if not isinstance(texts, torch.Tensor) or texts.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                f"texts must be token ids (K, n) of dtype int64, e.g. from nearl_model.tokenize_prompts; "
                f"got {getattr(texts, 'dtype', type(texts).__name__)}"
            )
        if texts.dim() != 2 or texts.shape[0] < 1 or texts.shape[1] < 1:
            raise ValueError(f"texts must be (K, n) token ids with K >= 1 prompts; got shape {tuple(texts.shape)}")
        if texts.shape[1] > self.text_tower.context_length:
            raise ValueError(
                f"texts have {texts.shape[1]} tokens but the text tower's context is "
                f"{self.text_tower.context_length}; shorten the prompts"
            )

    def _features(self, images: torch.Tensor, texts: torch.Tensor):
        """Unnormalised image (B, D) and text (B, K, D) or (K, D) features, and the penalty (None unless
        the penalty ablation is on)."""
        self._check_inputs(images, texts)
        texts = texts.long()
        cfg, image, text, ad = self.config, self.image_tower, self.text_tower, self.adapters
        paired = cfg.mode == "paired"
        B, (K, n) = images.shape[0], texts.shape
        x_v = image.embed(images)
        x_t = text.embed(texts)
        t_mask = text.attention(texts, x_t)
        # Padding never enters the USEformer context.
        t_valid = text.valid(texts)  # [K, n]
        tokens = texts.repeat(B, 1) if paired else texts
        Lv = x_v.shape[1]
        # Groups: the B images, and in shared mode the text group last, whose
        # context is its prompts only (its image slot is padding, kept out).
        n_groups = B if paired else B + 1
        img_valid = t_valid.new_ones(B, Lv)
        if not paired:
            img_valid = F.pad(img_valid, (0, 0, 0, 1))
        ctx_mask = torch.cat([img_valid, t_valid.reshape(1, K * n).expand(n_groups, -1)], dim=1)
        z = ad.z0.unsqueeze(0).expand(n_groups, -1, -1)
        penalty = None
        next_img = next_txt = 0
        for j in range(self.n_layers):
            for i in range(next_img, self.image_schedule[j] + 1):
                x_v = image.block(i, x_v)
            for i in range(next_txt, self.text_schedule[j] + 1):
                x_t = text.block(i, x_t, t_mask)
            next_img, next_txt = self.image_schedule[j] + 1, self.text_schedule[j] + 1
            if paired and j == 0:
                # Text blocks before the first interaction are the same for every
                # image: run them once for the K prompts, then give each image its copy.
                x_t = x_t.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * K, n, -1)
                t_mask = text.attention(tokens, x_t)

            x_v, x_t, z, term = self._interaction(
                ad.oca_image[j], ad.oca_text[j], ad.useformer[j], x_v, x_t, z, ctx_mask, K, paired, cfg.eps,
                self.fused, cfg.oca_constraint == "penalty")
            if term is not None:
                term = term / (2 * self.n_layers)
                penalty = term if penalty is None else penalty + term

        for i in range(next_img, image.n_blocks):
            x_v = image.block(i, x_v)
        for i in range(next_txt, text.n_blocks):
            x_t = text.block(i, x_t, t_mask)
        img_f = image.head(x_v)
        txt_f = text.head(x_t, tokens)
        if paired:
            txt_f = txt_f.view(B, K, -1)
        return img_f, txt_f, penalty

    def shared_text(self, texts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shared mode: everything that depends on the K prompts alone, computed once.

        The text group's queries see text only, so neither the text tower nor
        the text context that every image's queries attend to depends on the
        images. Returns ``(text_ctx, text_valid, txt_f)``: the text tokens'
        down-projections per interaction layer (n_layers, K*n, r), which of
        them are real tokens (K*n,) bool, and the unnormalised text features
        (K, D). :meth:`image_features` takes the first two; an exported
        classifier keeps all three as constants and runs only the image tower.
        """
        if self.config.mode != "shared":
            raise ValueError("shared_text needs mode='shared': in paired mode each image has its own text copies")
        self._check_texts(texts)
        texts = texts.long()
        text, ad = self.text_tower, self.adapters
        K, n = texts.shape
        x_t = text.embed(texts)
        t_mask = text.attention(texts, x_t)
        valid = text.valid(texts).reshape(1, K * n)
        z = ad.z0.unsqueeze(0)
        contexts, next_txt = [], 0
        for j in range(self.n_layers):
            for i in range(next_txt, self.text_schedule[j] + 1):
                x_t = text.block(i, x_t, t_mask)
            next_txt = self.text_schedule[j] + 1
            oca = ad.oca_text[j]
            h_t = oca.down(x_t)
            ctx = h_t.reshape(1, K * n, -1)
            contexts.append(ctx[0])
            z = ad.useformer[j](z, ctx, valid, fused=self.fused)
            x_t = self._oca(oca, x_t, h_t, z, K)
        for i in range(next_txt, text.n_blocks):
            x_t = text.block(i, x_t, t_mask)
        return torch.stack(contexts), valid[0], text.head(x_t, texts)

    def image_features(self, images: torch.Tensor, text_ctx: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
        """Shared mode: unnormalised image features (B, D) against :meth:`shared_text`'s text context.

        The same maths as the image half of :meth:`encode` in shared mode, with
        the text side read from ``text_ctx`` instead of recomputed.
        """
        self._check_images(images)
        image, ad = self.image_tower, self.adapters
        x_v = image.embed(images)
        B, Lv = x_v.shape[:2]
        ctx_mask = torch.cat([text_valid.new_ones(B, Lv), text_valid.unsqueeze(0).expand(B, -1)], dim=1)
        z = ad.z0.unsqueeze(0).expand(B, -1, -1)
        next_img = 0
        for j in range(self.n_layers):
            for i in range(next_img, self.image_schedule[j] + 1):
                x_v = image.block(i, x_v)
            next_img = self.image_schedule[j] + 1
            oca = ad.oca_image[j]
            h_v = oca.down(x_v)
            ctx = torch.cat([h_v, text_ctx[j].unsqueeze(0).expand(B, -1, -1)], dim=1)
            z = ad.useformer[j](z, ctx, ctx_mask, fused=self.fused)
            x_v = self._oca(oca, x_v, h_v, z, 1)
        for i in range(next_img, image.n_blocks):
            x_v = image.block(i, x_v)
        return image.head(x_v)

    def _oca(self, oca, x, h, z, group_size: int) -> torch.Tensor:
        """One OCA's output under the configured constraint (the penalty ablation's term is not needed here)."""
        if self.config.oca_constraint == "penalty":
            return oca.forward_penalty(x, h, z, group_size, self.config.eps)[0]
        return oca(x, h, z, group_size, self.config.eps, self.fused)

    def encode(self, images: torch.Tensor, texts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised image (B, D) and text features: (B, K, D) paired, (K, D) shared."""
        img_f, txt_f, _ = self._features(images, texts)
        return F.normalize(img_f, dim=-1), F.normalize(txt_f, dim=-1)

    def logits_from_features(self, img_f: torch.Tensor, txt_f: torch.Tensor) -> torch.Tensor:
        """``logit_scale * cos``: (B, K) from image features (B, D) and text features (B, K, D) or (K, D)."""
        img_f, txt_f = F.normalize(img_f, dim=-1), F.normalize(txt_f, dim=-1)
        scale = self.clip.logit_scale.exp()
        if txt_f.dim() == 3:
            return scale * torch.einsum("bd,bkd->bk", img_f, txt_f)
        return scale * img_f @ txt_f.t()

    def forward(self, images: torch.Tensor, texts: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """Class logits (B, K): ``logit_scale * cos(image, text)`` for K prompts (K, n).

        With ``labels`` (B,) it returns ``(loss, logits)`` instead, as :meth:`loss`
        does; going through ``forward`` keeps DistributedDataParallel's hooks.
        """
        img_f, txt_f, penalty = self._features(images, texts)
        logits = self.logits_from_features(img_f, txt_f)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits.float(), labels)
        if self.config.oca_constraint == "penalty":
            loss = loss + self.config.penalty_weight * penalty
        return loss, logits

    def loss(self, images: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over the K classes (plus the penalty ablation's term); returns (loss, logits)."""
        return self(images, texts, labels)

    def _shape_metadata(self) -> dict:
        c = self.config
        return {
            "n_layers": self.n_layers, "vision_width": self.image_tower.width,
            "text_width": self.text_tower.width, "r": c.r, "n_heads": c.n_heads,
            "n_queries": c.n_queries, "ffn_ratio": c.ffn_ratio,
        }

    def adapter_state_dict(self) -> dict:
        """The trainable adapter tensors (and the frozen ``s_incr``), detached."""
        return {k: v.detach() for k, v in self.adapters.state_dict().items()}

    def save_adapter(self, path: str, run: Optional[dict] = None) -> None:
        """Write the adapter to ``path`` as safetensors, config embedded, atomically.

        ``run`` (JSON-able) records how to rebuild the model around it: the
        backbone, its weights, the classes and prompts (the CLIs fill it in).
        """
        write_adapter(path, self.adapter_state_dict(), self.config, self._shape_metadata(), run)

    def load_adapter(self, path: str) -> None:
        """Load an adapter written by :meth:`save_adapter`; a mismatched or non-finite one is a ValueError."""
        load_into(self, path)
