"""Creating open_clip backbones: built-in names, JSON configs, and pretrained weights.

Loading stays real (open_clip tags, ``hf-hub:`` ids, local checkpoint files)
but the machines this project is built on have no network, so every download
failure is turned into a message that says how to pass a local file instead.
"""

import json
import os
from typing import Optional, Union

import open_clip
from torch import nn

# A small CLIP for the demo and the tests: random weights, seconds on 2 CPU cores.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 96, "layers": 4, "head_width": 48},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}
BUILTIN_CONFIGS = {"nearl-tiny": TINY_CLIP_CONFIG}


def _offline_message(model: str, pretrained: str, err: Exception) -> str:
    return (
        f"could not fetch pretrained weights {pretrained!r} for {model!r} ({type(err).__name__}: {err}). "
        "If this machine has no network, download the checkpoint elsewhere (for example the "
        "open_clip_pytorch_model.bin of the matching Hugging Face repository) and pass its local path: "
        f"NearlCLIP.from_pretrained({model!r}, pretrained='/path/to/open_clip_pytorch_model.bin') "
        f"or --model {model} --pretrained /path/to/open_clip_pytorch_model.bin"
    )


def create_clip(model: Union[str, dict], pretrained: Optional[str] = None) -> nn.Module:
    """Build an open_clip CLIP.

    Args:
        model: an open_clip model name (``"ViT-B-16"``), an ``hf-hub:org/repo`` id,
            ``"nearl-tiny"``, a path to a JSON model config (open_clip's format:
            ``embed_dim``, ``vision_cfg``, ``text_cfg``), or such a dict.
        pretrained: None (random init), an open_clip tag (``"openai"``), or a
            local checkpoint path.

    Returns:
        the open_clip model, in eval mode.

    Raises:
        ValueError: unknown model name or unreadable config.
        FileNotFoundError: ``pretrained`` looks like a path and does not exist.
        RuntimeError: a download failed; the message says how to load offline.
    """
    if isinstance(model, dict) or (isinstance(model, str) and (model in BUILTIN_CONFIGS or model.endswith(".json"))):
        cfg = model
        if isinstance(model, str):
            cfg = BUILTIN_CONFIGS.get(model)
            if cfg is None:
                try:
                    with open(model) as f:
                        cfg = json.load(f)
                except (OSError, json.JSONDecodeError) as err:
                    raise ValueError(f"cannot read model config {model!r}: {err}") from err
            cfg = cfg.get("model_cfg", cfg)
        try:
            clip = open_clip.CLIP(**cfg)
        except TypeError as err:
            raise ValueError(f"bad model config: {err}; expected open_clip's embed_dim, vision_cfg, text_cfg") from err
        if pretrained:
            _load_local_checkpoint(clip, pretrained)
        return clip.eval()

    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be an open_clip model name, 'hf-hub:' id or JSON config; got {model!r}")
    is_hub = model.startswith("hf-hub:")
    if not is_hub and model not in open_clip.list_models():
        raise ValueError(
            f"unknown model {model!r}: use one of open_clip.list_models() (e.g. ViT-B-16), an 'hf-hub:org/repo' id, "
            f"'nearl-tiny', or a path to a JSON model config"
        )
    if pretrained and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} does not exist")
    try:
        clip = open_clip.create_model(model, pretrained=None if is_hub else pretrained)
    except RuntimeError as err:
        if is_hub or (pretrained and not os.path.isfile(pretrained)):
            raise RuntimeError(_offline_message(model, pretrained or model, err)) from err
        raise
    return clip.eval()


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".bin", ".pt", ".pth", ".safetensors"))


def _load_local_checkpoint(clip: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {path!r} does not exist")
    open_clip.load_checkpoint(clip, path)
