"""The tower interface NearlCLIP walks through, and its open_clip / timm / Hugging Face kinds.

NearlCLIP runs both towers block by block and composes the adapters between
blocks, so it needs each tower in three pieces: the embedding (tokens before
the first block), the blocks with whatever attention mask they take, and the
pooling head (everything after the last block). Every open_clip layout is
taken apart here, and only here: NearlCLIP never touches an open_clip,
timm or transformers internal itself.

Image towers: ``image_tower(clip)`` returns an :class:`ImageTower`.
Text towers: ``text_tower(clip)`` returns a :class:`TextTower`.
Anything else is refused with a TypeError that names what is supported.
"""

from typing import List, Optional, Tuple

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

SUPPORTED_IMAGE_TOWERS = (
    "open_clip VisionTransformer (class-token or average pooling, no attentional pooler), "
    "or open_clip TimmModel over a timm VisionTransformer trunk (token, average or MAP pooling, "
    "'linear', 'mlp' or no projection)"
)
SUPPORTED_TEXT_TOWERS = (
    "open_clip TextTransformer, causal (CLIP) or bidirectional with fixed padding (SigLIP), without "
    "a class token; or open_clip HFTextEncoder over a BERT, RoBERTa or XLM-RoBERTa encoder"
)
SUPPORTED_TOWERS = f"image towers: {SUPPORTED_IMAGE_TOWERS}; text towers: {SUPPORTED_TEXT_TOWERS}"

# Encoder-only Hugging Face families whose layers take (hidden_states, attention_mask).
HF_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta")


class ImageTower:
    """One image tower in three pieces: ``embed``, ``block(i, x)`` for i < ``n_blocks``, ``head``.

    Attributes:
        kind: a short name of the layout (``"open_clip-vit"``, ``"timm-vit"``).
        width: token width d of every block.
        n_blocks: number of transformer blocks.
        image_size: (H, W) the tower expects.
        in_channels: image channels the tower expects.
    """

    kind = ""
    width = 0
    n_blocks = 0
    image_size: Tuple[int, int] = (0, 0)
    in_channels = 3

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, d) entering the first block."""
        raise NotImplementedError

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``i`` applied to tokens (B, L, d)."""
        raise NotImplementedError

    def block_modules(self) -> List[nn.Module]:
        """The ``n_blocks`` block modules, in order (what regional compilation compiles)."""
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised image features (B, D) from the last block's tokens."""
        raise NotImplementedError


class TextTower:
    """One text tower in pieces: ``embed``, ``attention``, ``block``, ``head``, and which tokens are padding.

    Attributes:
        kind: ``"causal"``, ``"bidirectional"`` (fixed padding, no mask) or ``"hf"``.
        width: token width d of every block.
        n_blocks: number of transformer blocks.
        context_length: the most tokens a sequence may have.
        trims_padding: True where cutting every prompt to the longest one
            leaves its feature unchanged (a causal tower pooling at the end
            token, or a tower that masks its padding); False where the tower
            must see the fixed padding it was trained with.
    """

    kind = ""
    width = 0
    n_blocks = 0
    context_length = 0
    trims_padding = True

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (S, n, d) of token ids (S, n)."""
        raise NotImplementedError

    def valid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bool (S, n): True for prompt tokens, False for padding (kept out of the USEformer context)."""
        raise NotImplementedError

    def attention(self, tokens: torch.Tensor, x: torch.Tensor):
        """The attention mask ``block`` takes for the sequences ``tokens`` (S, n) with embeddings ``x``."""
        raise NotImplementedError

    def block(self, i: int, x: torch.Tensor, mask) -> torch.Tensor:
        """Block ``i`` applied to tokens (S, n, d) under ``mask`` from :meth:`attention`."""
        raise NotImplementedError

    def block_modules(self) -> List[nn.Module]:
        """The ``n_blocks`` block modules, in order (what regional compilation compiles)."""
        raise NotImplementedError

    def head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features (S, D) from the last block's tokens and the token ids."""
        raise NotImplementedError


class OpenClipViT(ImageTower):
    """open_clip's own VisionTransformer (CLIP ViT-B/32, B/16, L/14...)."""

    kind = "open_clip-vit"

    def __init__(self, visual: VisionTransformer):
        if visual.attn_pool is not None:
            raise TypeError(
                "image towers with an attentional pooler (visual.attn_pool, as in CoCa) are not supported: "
                f"the pooler's queries would need their own adapters; supported: {SUPPORTED_IMAGE_TOWERS}"
            )
        if visual.pool_type not in ("tok", "avg"):
            raise TypeError(f"image pool type {visual.pool_type!r} is not supported; supported: {SUPPORTED_IMAGE_TOWERS}")
        if not visual.transformer.batch_first:
            raise TypeError("open_clip towers must be batch_first (open_clip >= 2.23)")
        self.visual = visual
        self.width = visual.transformer.width
        self.n_blocks = len(visual.transformer.resblocks)
        self.image_size = tuple(visual.image_size)
        self.in_channels = visual.conv1.in_channels

    def embed(self, images):
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x)

    def block(self, i, x):
        return self.visual.transformer.resblocks[i](x)

    def block_modules(self):
        return list(self.visual.transformer.resblocks)

    def head(self, x):
        v = self.visual
        if v.final_ln_after_pool:
            pooled = v.ln_post(_vit_pool(x, v.pool_type))
        else:
            pooled = _vit_pool(v.ln_post(x), v.pool_type)
        return pooled @ v.proj if v.proj is not None else pooled


def _vit_pool(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    # open_clip's VisionTransformer pooling: mean of the patch tokens, or the class token.
    if pool_type == "avg":
        return x[:, 1:].mean(dim=1)
    return x[:, 0]


class TimmViT(ImageTower):
    """open_clip's TimmModel over a timm VisionTransformer trunk (BiomedCLIP, SigLIP).

    The trunk's own pooling (class token, average, MAP attention pool) and
    norms run in the head, followed by the TimmModel's projection.
    """

    kind = "timm-vit"

    def __init__(self, visual: TimmModel):
        from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

        trunk = visual.trunk
        if not isinstance(trunk, TimmVisionTransformer):
            raise TypeError(
                f"timm image tower {type(trunk).__name__} is not supported (it is not a timm VisionTransformer); "
                f"supported: {SUPPORTED_IMAGE_TOWERS}"
            )
        if hasattr(visual.head, "pool"):
            raise TypeError(
                "timm image towers with an attention-pool head ('abs_attn'/'rot_attn' timm_pool) are not "
                f"supported; supported: {SUPPORTED_IMAGE_TOWERS}"
            )
        self.visual = visual
        self.trunk = trunk
        self.width = trunk.embed_dim
        self.n_blocks = len(trunk.blocks)
        self.image_size = tuple(visual.image_size)
        self.in_channels = trunk.patch_embed.proj.in_channels

    def embed(self, images):
        t = self.trunk
        # timm's forward_features up to the blocks; _pos_embed adds the class/register tokens.
        x = t.patch_embed(images)
        x = t._pos_embed(x)
        x = t.patch_drop(x)
        return t.norm_pre(x)

    def block(self, i, x):
        return self.trunk.blocks[i](x)

    def block_modules(self):
        return list(self.trunk.blocks)

    def head(self, x):
        return self.visual.head(self.trunk.forward_head(self.trunk.norm(x)))


class _OpenClipText(TextTower):
    """open_clip's TextTransformer, standalone (CustomTextCLIP.text) or unpacked onto a CLIP."""

    def __init__(self, src: nn.Module, pool_type: str, eos_id: Optional[int], attn_mask, heads: int,
                 use_pad_mask: bool, pad_id: int):
        if pool_type not in ("argmax", "eos", "first", "last"):
            raise TypeError(f"text pool type {pool_type!r} is not supported; supported: {SUPPORTED_TEXT_TOWERS}")
        self.src = src
        self.pool_type = pool_type
        self.eos_id = eos_id
        self.causal = attn_mask is not None
        self.use_pad_mask = use_pad_mask
        self.pad_id = pad_id
        self.heads = heads
        self.kind = "causal" if self.causal else "bidirectional"
        self.width = src.transformer.width
        self.n_blocks = len(src.transformer.resblocks)
        self.context_length = src.positional_embedding.shape[0]
        # Cutting to the longest prompt is exact when nothing after the end
        # token reaches the pooled one (causal, pooled at the end token) or
        # the padding is masked; a bidirectional tower without a pad mask
        # saw its fixed padding in training and keeps it.
        self.trims_padding = (self.causal and pool_type in ("argmax", "eos")) or use_pad_mask

    def _causal_mask(self) -> Optional[torch.Tensor]:
        return self.src.attn_mask

    def embed(self, tokens):
        cast_dtype = self.src.transformer.get_cast_dtype()
        n = tokens.shape[1]
        return self.src.token_embedding(tokens).to(cast_dtype) + self.src.positional_embedding[:n].to(cast_dtype)

    def _end_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def valid(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        if self.use_pad_mask:
            return tokens != self.pad_id
        if self.causal and self.pool_type in ("argmax", "eos"):
            return positions <= self._end_index(tokens)[:, None]
        return positions <= _last_before_trailing_run(tokens)[:, None]

    def attention(self, tokens, x):
        n = tokens.shape[1]
        mask = self._causal_mask()
        mask = None if mask is None else mask[:n, :n]
        if not self.use_pad_mask:
            return mask
        # The tower's own pad mask: padding keys are -inf for every query and head.
        keys = torch.zeros(tokens.shape, dtype=x.dtype, device=x.device).masked_fill(tokens == self.pad_id, float("-inf"))
        additive = keys[:, None, :].expand(-1, n, -1)
        if mask is not None:
            additive = additive + mask.to(x.dtype)
        return additive.repeat_interleave(self.heads, 0)

    def block(self, i, x, mask):
        return self.src.transformer.resblocks[i](x, attn_mask=mask)

    def block_modules(self):
        return list(self.src.transformer.resblocks)

    def head(self, x, tokens):
        x = self.src.ln_final(x)
        x = text_global_pool(x, tokens, self.pool_type, eos_token_id=self.eos_id)
        proj = self.src.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _last_before_trailing_run(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the first token of each sequence's trailing run of its last id (S,).

    Fixed padding is a run of one id to the end of the sequence; its first
    token is kept (it is the end-of-text token where the tokenizer pads with
    it, as SigLIP's does), the rest is padding. A sequence that fills the
    context has a run of length one and keeps every token.
    """
    same = tokens == tokens[:, -1:]
    # Trailing run length: count of True from the end until the first False.
    run = same.flip(1).int().cumprod(dim=1).sum(dim=1)
    return tokens.shape[1] - run


class HFText(TextTower):
    """open_clip's HFTextEncoder over a BERT / RoBERTa / XLM-RoBERTa encoder (BiomedCLIP's PubMedBERT).

    Padding is masked as the encoder's own forward masks it; the head is
    open_clip's pooler (mean, max, class token, or the encoder's pooler
    layer) followed by the tower's projection.
    """

    kind = "hf"
    trims_padding = True

    def __init__(self, text: HFTextEncoder):
        model_type = getattr(text.config, "model_type", None)
        encoder = getattr(text.transformer, "encoder", None)
        if model_type not in HF_ENCODER_TYPES or encoder is None or not hasattr(encoder, "layer"):
            raise TypeError(
                f"Hugging Face text tower of model type {model_type!r} is not supported; supported: "
                f"{SUPPORTED_TEXT_TOWERS}"
            )
        if getattr(text.config, "is_decoder", False):
            raise TypeError(f"Hugging Face text towers must be encoders (is_decoder=False); supported: {SUPPORTED_TEXT_TOWERS}")
        self.text = text
        self.hf = text.transformer
        self.layers = encoder.layer
        self.pad_id = text.config.pad_token_id
        self.width = text.config.hidden_size
        self.n_blocks = len(self.layers)
        # RoBERTa numbers positions from pad_id + 1, so that many fewer tokens fit.
        offset = self.pad_id + 1 if model_type in ("roberta", "xlm-roberta") else 0
        self.context_length = text.config.max_position_embeddings - offset

    def embed(self, tokens):
        return self.hf.embeddings(input_ids=tokens)

    def valid(self, tokens):
        return tokens != self.pad_id

    def attention(self, tokens, x):
        valid = self.valid(tokens).long()
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:
            # transformers 4.x: the additive (S, 1, 1, n) mask its encoder layers take.
            return self.hf.get_extended_attention_mask(valid, tokens.shape)
        return create_bidirectional_mask(config=self.hf.config, inputs_embeds=x, attention_mask=valid)

    def block_modules(self):
        return list(self.layers)

    def block(self, i, x, mask):
        out = self.layers[i](x, mask)
        # transformers 4.x layers return a tuple, 5.x the hidden states.
        return out[0] if isinstance(out, tuple) else out

    def head(self, x, tokens):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        pooler_layer = getattr(self.hf, "pooler", None)
        out = BaseModelOutputWithPooling(
            last_hidden_state=x, pooler_output=pooler_layer(x) if pooler_layer is not None else None
        )
        pooled = self.text.pooler(out, self.valid(tokens).long())
        return self.text.proj(pooled)


def image_tower(clip: nn.Module) -> ImageTower:
    """The :class:`ImageTower` of an open_clip model, or a TypeError naming what is supported."""
    visual = getattr(clip, "visual", None)
    if isinstance(visual, VisionTransformer):
        return OpenClipViT(visual)
    if isinstance(visual, TimmModel):
        return TimmViT(visual)
    found = type(visual).__name__ if visual is not None else f"({type(clip).__name__} has no .visual)"
    raise TypeError(f"unsupported image tower {found}; supported: {SUPPORTED_IMAGE_TOWERS}")


def text_tower(clip: nn.Module) -> TextTower:
    """The :class:`TextTower` of an open_clip model, or a TypeError naming what is supported."""
    if isinstance(clip, open_clip.CLIP):
        # CLIP keeps its text parts on itself and has no pad mask.
        return _OpenClipText(clip, clip.text_pool_type, getattr(clip, "text_eos_id", None), clip.attn_mask, heads=1,
                             use_pad_mask=False, pad_id=0)
    text = getattr(clip, "text", None)
    if isinstance(text, TextTransformer):
        if text.cls_emb is not None:
            raise TypeError(
                "text towers with a class token (text.cls_emb, as in CoCa) are not supported; "
                f"supported: {SUPPORTED_TEXT_TOWERS}"
            )
        return _OpenClipText(text, text.pool_type, getattr(text, "eos_id", None), text.attn_mask, text.heads,
                             use_pad_mask=getattr(text, "use_pad_mask", False), pad_id=getattr(text, "pad_id", 0))
    if isinstance(text, HFTextEncoder):
        return HFText(text)
    found = type(text).__name__ if text is not None else f"{type(clip).__name__} without a text tower"
    raise TypeError(f"unsupported text tower {found}; supported: {SUPPORTED_TEXT_TOWERS}")


def check_supported(clip: nn.Module) -> Tuple[ImageTower, TextTower]:
    """Both towers of ``clip``; a CoCa model is refused naming its attentional pooler first."""
    if isinstance(clip, getattr(open_clip, "CoCa", ())):
        raise TypeError(
            "CoCa models are not supported: their image tower ends in an attentional pooler "
            f"(visual.attn_pool) and their text tower in a class token; supported: {SUPPORTED_TOWERS}"
        )
    return image_tower(clip), text_tower(clip)

