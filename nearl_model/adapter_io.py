"""The adapter file format: safetensors tensors plus JSON metadata (config, shapes, run record).

Reading never unpickles anything, and everything a file claims is checked
before a model is built around it.
"""

import hashlib
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
    def write(tmp: str) -> None:
        # save_file is looked up at call time so tests can make it fail mid-write.
        try:
            save_file(tensors, tmp, metadata=metadata)
        except OSError:
            raise
        except Exception as err:  # safetensors reports I/O failures (a full disk) as its own error type
            raise OSError(f"cannot write {path!r}: {err}") from err

    atomic_write(path, write)


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


# The run record nearl_model.train writes: key -> accepted types (None where a value may be absent).
RUN_SCHEMA = {
    "model": (str,), "pretrained": (str, type(None)), "seed": (int,), "classes": (list,), "prompts": (list,),
}
SHAPE_KEYS = ("n_layers", "vision_width", "text_width")


def validate_adapter(path: str, tensors: Dict[str, torch.Tensor], metadata: dict) -> NearlConfig:
    """Check everything a file claims before a model is built around it; return its config.

    The file's own config and shape record are laid out on the ``meta`` device
    (no memory), so a config that would need gigabytes is refused by its tensor
    shapes, not discovered by allocating them. Every tensor must be finite.

    Raises:
        ValueError: naming the file and the field, tensor or value that is wrong.
    """
    from .modules import NearlAdapters

    try:
        config = NearlConfig.from_json(metadata["nearl_config"])
        shape = json.loads(metadata["shape"])
        dims = [shape[k] for k in SHAPE_KEYS]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"adapter {path!r} has a malformed config or shape record ({type(err).__name__}: {err})") from err
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in dims):
        raise ValueError(f"adapter {path!r}: shape record {dict(zip(SHAPE_KEYS, dims))} must hold positive ints")
    if dims[0] > len(tensors):
        # Every layer has tensors of its own: more layers than tensors is a damaged record, refused before
        # laying out that many layers even on the meta device.
        raise ValueError(f"adapter {path!r}: its shape record claims {dims[0]} layers but it holds {len(tensors)} "
                         "tensors")
    with torch.device("meta"):
        expected = NearlAdapters(config, *dims).state_dict()
    check_tensors(path, tensors, expected)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"adapter {path!r} has NaN or inf values in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                         "it comes from a diverged run: retrain (e.g. a lower --lr) rather than use it")
    return config


def read_run(path: str, metadata: dict) -> dict:
    """The run record of an adapter written by ``nearl_model.train``, its schema checked."""
    if "nearl_run" not in metadata:
        raise ValueError(f"adapter {path!r} has no run record (backbone, classes); it was not written by "
                         "nearl_model.train, so build the model yourself and call load_adapter")
    try:
        run = json.loads(metadata["nearl_run"])
    except ValueError as err:
        raise ValueError(f"adapter {path!r} has a malformed run record: {err}") from err
    if not isinstance(run, dict):
        raise ValueError(f"adapter {path!r} has a malformed run record: expected a JSON object")
    for key, types in RUN_SCHEMA.items():
        if not isinstance(run.get(key), types):
            raise ValueError(f"adapter {path!r} has a malformed run record: {key!r} is {run.get(key)!r}")
    classes, prompts = run["classes"], run["prompts"]
    if len(classes) < 2 or len(prompts) != len(classes) or not all(isinstance(x, str) for x in classes + prompts):
        raise ValueError(f"adapter {path!r} has a malformed run record: needs >= 2 class names and one prompt "
                         f"string per class; got {len(classes)} classes, {len(prompts)} prompts")
    return run


def check_fits(path: str, tensors: Dict[str, torch.Tensor], metadata: dict, shape: dict,
               current: Dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless the file's shape record and tensors match the model's ``shape`` and ``current``."""
    saved = json.loads(metadata["shape"])
    diff = {k: (saved.get(k), v) for k, v in shape.items() if saved.get(k) != v}
    if diff:
        listing = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in diff.items())
        raise ValueError(f"adapter {path!r} does not fit this model ({listing})")
    check_tensors(path, tensors, current)


def check_tensors(path: str, tensors: Dict[str, torch.Tensor], current: Dict[str, torch.Tensor]) -> None:
    """Same tensor names and shapes as ``current``, or a ValueError naming the first difference."""
    if set(tensors) != set(current):
        missing, extra = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
        raise ValueError(f"adapter {path!r} has the wrong tensors: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in tensors.items():
        if v.shape != current[k].shape:
            raise ValueError(f"adapter {path!r}: {k} has shape {tuple(v.shape)}, model expects {tuple(current[k].shape)}")


def load_into(model, path: str, tensors: Optional[dict] = None, metadata: Optional[dict] = None) -> None:
    """Load the adapter file at ``path`` into ``model`` (a NearlCLIP), validated and fitted first.

    ``tensors`` and ``metadata`` skip the read when the caller has already read
    and validated the file.
    """
    if tensors is None:
        tensors, metadata = read_adapter(path)
        validate_adapter(path, tensors, metadata)
    check_fits(path, tensors, metadata, model._shape_metadata(), model.adapters.state_dict())
    model.adapters.load_state_dict(tensors)


def adapter_config(path: str) -> NearlConfig:
    """The NearlConfig stored in an adapter file."""
    _, metadata = read_adapter(path)
    return NearlConfig.from_json(metadata["nearl_config"])


def file_identity(path: Optional[str]) -> Optional[str]:
    """A name or tag as it is; a file by its size and a digest of its first and last MiB (cheap, content-based).

    Runs record it beside a file's resolved path, so a file is recognised by
    its contents wherever it is reached from, and found again if it moves.
    """
    if not path or not os.path.isfile(path):
        return path
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return f"file of {size} bytes, sha256 of its ends {h.hexdigest()[:16]}"


def resolved(path: Optional[str]) -> Optional[str]:
    """An existing file's resolved absolute path; anything else (a model name, a tag, None) as it is."""
    return os.path.realpath(path) if path and os.path.isfile(path) else path
