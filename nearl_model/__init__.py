"""NEARL-CLIP over open_clip: ``from nearl_model import NearlCLIP, NearlConfig``.

Names are imported on first use, so ``python -m nearl_model.train`` can print
its first line before torch and open_clip have loaded.
"""

import importlib

_EXPORTS = {
    "NearlCLIP": ".clip", "NearlConfig": ".config", "create_clip": ".backbones", "TINY_CLIP_CONFIG": ".backbones",
    "class_prompts": ".prompts", "tokenize_prompts": ".prompts", "adapter_config": ".adapter_io",
    "read_adapter": ".adapter_io", "load_trained": ".loading",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nearl_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
