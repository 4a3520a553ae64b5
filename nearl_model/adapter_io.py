"""The adapter file format: safetensors tensors plus JSON metadata (config, shapes, run record).

Reading never unpickles anything, and everything a file claims is checked
before a model is built around it.
"""

import json
import os
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ._io import atomic_write
from .config import NearlConfig

ADAPTER_FORMAT = "nearl-adapter-v1"


def write_adapter(path: str, tensors: Dict[str, torch.Tensor], config: NearlConfig, shape: dict,
                  run: Optional[dict] = None) -> None:
    """Write ``tensors`` with the config, the model shape and the optional run record, atomically."""
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": ADAPTER_FORMAT, "nearl_config": config.to_json(), "shape": json.dumps(shape, sort_keys=True)}
    if run is not None:
        metadata["nearl_run"] = json.dumps(run)
    # save_file is looked up at call time so tests can make it fail mid-write.
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_adapter(path: str):
    """Read an adapter file: (tensors, metadata). Raises FileNotFoundError/ValueError with the reason."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path!r} is not a readable safetensors adapter file: {err}") from err
    if metadata.get("format") != ADAPTER_FORMAT or "shape" not in metadata:
        raise ValueError(f"{path!r} is a safetensors file but not a NEARL adapter (no '{ADAPTER_FORMAT}' metadata)")
    return tensors, metadata


def check_fits(path: str, tensors: Dict[str, torch.Tensor], metadata: dict, shape: dict,
               current: Dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless the file's shape record and tensors match the model's ``shape`` and ``current``."""
    saved = json.loads(metadata["shape"])
    diff = {k: (saved.get(k), v) for k, v in shape.items() if saved.get(k) != v}
    if diff:
        listing = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in diff.items())
        raise ValueError(f"adapter {path!r} does not fit this model ({listing})")
    if set(tensors) != set(current):
        missing, extra = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
        raise ValueError(f"adapter {path!r} has the wrong tensors: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in tensors.items():
        if v.shape != current[k].shape:
            raise ValueError(f"adapter {path!r}: {k} has shape {tuple(v.shape)}, model expects {tuple(current[k].shape)}")


def adapter_config(path: str) -> NearlConfig:
    """The NearlConfig stored in an adapter file."""
    _, metadata = read_adapter(path)
    return NearlConfig.from_json(metadata["nearl_config"])


def load_trained(path: str, pretrained: Optional[str] = None, fused: bool = False):
    """Rebuild a trained model from an adapter written by ``nearl_model.train``.

    The adapter records its backbone (name, weights, seed), classes and
    prompts. A random-init backbone is rebuilt from the same seed; pass
    ``pretrained`` if the weights file has moved.

    Returns:
        (model, run, texts): the NearlCLIP with the adapter loaded, the run
        record, and its prompts as token ids.
    """
    from .backbones import create_clip
    from .clip import NearlCLIP
    from .prompts import tokenize_prompts

    _, metadata = read_adapter(path)
    if "nearl_run" not in metadata:
        raise ValueError(f"adapter {path!r} has no run record (backbone, classes); it was not written by "
                         "nearl_model.train, so build the model yourself and call load_adapter")
    run = json.loads(metadata["nearl_run"])
    torch.manual_seed(run["seed"])
    clip = create_clip(run["model"], pretrained or run["pretrained"])
    model = NearlCLIP(clip, NearlConfig.from_json(metadata["nearl_config"]), fused=fused)
    model.load_adapter(path)
    texts = tokenize_prompts(run["prompts"], run["model"], model.text_tower.context_length)
    return model.eval(), run, texts
