"""NEARL-CLIP over open_clip: ``from nearl_model import NearlCLIP, NearlConfig``."""

from .backbones import TINY_CLIP_CONFIG, create_clip
from .adapter_io import adapter_config, load_trained, read_adapter
from .clip import NearlCLIP
from .config import NearlConfig
from .prompts import class_prompts, tokenize_prompts

__all__ = [
    "NearlCLIP", "NearlConfig", "create_clip", "TINY_CLIP_CONFIG",
    "class_prompts", "tokenize_prompts", "adapter_config", "read_adapter", "load_trained",
]
