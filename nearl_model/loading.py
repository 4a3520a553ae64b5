"""One way to rebuild a trained model from its run: used by evaluate, predict and export.

It sits above both the adapter file format (``adapter_io``) and the model
(``clip``), so neither imports the other to load a run.
"""

import os
from typing import List, Optional

import torch

from .adapter_io import file_identity, load_into, read_adapter, read_run, validate_adapter
from .backbones import create_clip
from .clip import NearlCLIP
from .prompts import tokenize_prompts
from .run_dir import RUN_FILES

RUN_ADAPTER = RUN_FILES[0]
RUN_SUMMARY = "summary.json"
# What a recorded model or weights value ends with when it names a file (older adapters record paths as typed).
_FILE_SUFFIXES = (".json", ".pt", ".pth", ".bin", ".safetensors", ".npz")


def run_adapter(run_dir: str) -> str:
    """The adapter file of a finished training run's directory (``--run``).

    Raises:
        FileNotFoundError / ValueError: naming the directory and what it lacks.
    """
    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"run directory {run_dir!r} does not exist")
    if not os.path.isdir(run_dir):
        raise ValueError(f"--run {run_dir!r} is a file, not a run directory; pass a file with --adapter")
    adapter = os.path.join(run_dir, RUN_ADAPTER)
    if not os.path.isfile(adapter):
        raise FileNotFoundError(f"run directory {run_dir!r} holds no {RUN_ADAPTER}: it is not a nearl_model.train "
                                "output directory")
    if not os.path.isfile(os.path.join(run_dir, RUN_SUMMARY)):
        raise ValueError(f"run {run_dir!r} has not finished (no {RUN_SUMMARY}); finish it with nearl_model.train "
                         f"--resume, or pass its last checkpoint with --adapter {adapter}")
    return adapter


def locate_input(recorded: Optional[str], identity: Optional[str], given: Optional[str], flag: str, what: str,
                 adapter: str) -> Optional[str]:
    """The file (or name) a run used for one input, found again if it has moved.

    Args:
        recorded: the run's value: a resolved path for a file, else a name or tag.
        identity: the run's :func:`file_identity` of it (None where not a file, or an older adapter).
        given: the user's override (``--model``, ``--pretrained``), or None.
        flag: that override's flag, for messages.
        what: the input in words (``"model JSON"``), for messages.
        adapter: the adapter file, for messages; its folder is searched for a moved file.

    Returns:
        ``given``, else ``recorded`` if it is still there with the same contents,
        else a file of the same name and contents in the adapter's folder, its
        parent or the working directory.

    Raises:
        FileNotFoundError / ValueError: naming the input and ``flag``.
    """
    if given:
        if identity and os.path.isfile(given) and file_identity(given) != identity:
            raise ValueError(f"{flag} {given!r} is not the {what} the run of {adapter!r} used (its contents differ "
                             f"from the run's {identity}); pass the {what} the run used")
        return given
    is_file = identity is not None and identity != recorded
    looks_like_path = os.sep in recorded or recorded.endswith(_FILE_SUFFIXES) if recorded else False
    if not (is_file or (looks_like_path and not recorded.startswith("hf-hub:"))):
        return recorded
    if os.path.isfile(recorded):
        if is_file and file_identity(recorded) != identity:
            raise ValueError(f"the {what} {recorded!r} the run of {adapter!r} used has changed since (its contents "
                             f"differ from the run's {identity}); pass the original with {flag}")
        return recorded
    folder = os.path.dirname(os.path.abspath(adapter))
    name = os.path.basename(recorded)
    candidates: List[str] = [os.path.join(d, name) for d in (folder, os.path.dirname(folder), os.getcwd())]
    if is_file:
        for candidate in candidates:
            if os.path.isfile(candidate) and file_identity(candidate) == identity:
                return candidate
    raise FileNotFoundError(f"the {what} the run of {adapter!r} used, {recorded!r}, is not there any more "
                            f"(moved?); pass its new place with {flag}")




def load_trained(path: str, pretrained: Optional[str] = None, fused: bool = True, model: Optional[str] = None):
    """Rebuild a trained model from an adapter written by ``nearl_model.train``.

    The adapter records its backbone (name or model JSON, weights, seed),
    classes and prompts; files by resolved path and content, so this works
    from any working directory, and a file that moved beside the adapter (or
    into the working directory) is found again by its contents. A random-init
    backbone is rebuilt from the same seed.

    Args:
        path: the adapter file.
        pretrained: the backbone weights, if not where the run found them.
        fused: route the adapters through the fused kernels.
        model: the model JSON, if not where the run found it.

    Returns:
        (model, run, texts): the NearlCLIP with the adapter loaded, the run
        record, and its prompts as token ids.
    """
    # Everything the file claims is checked before the backbone is built.
    tensors, metadata = read_adapter(path)
    config = validate_adapter(path, tensors, metadata)
    run = read_run(path, metadata)
    if fused:
        try:
            config.check_fused()
        except ValueError as err:
            raise ValueError(f"adapter {path!r}: {err}") from None
    model_name = locate_input(run["model"], run.get("model_file"), model, "--model", "model JSON", path)
    weights = locate_input(run["pretrained"], run.get("pretrained_file"), pretrained, "--pretrained",
                           "backbone weights", path)
    torch.manual_seed(run["seed"])
    try:
        clip = create_clip(model_name, weights)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}: the backbone weights the run used have moved; pass their new place "
                                "with --pretrained (pretrained= in Python)") from err
    now = getattr(clip, "nearl_weights", None)
    # Weights from a file are checked by their contents above; tags, hub ids and random init by what loaded.
    if not pretrained and not run.get("pretrained_file") and run.get("weights") not in (None, now):
        raise ValueError(f"adapter {path!r} was trained on {run['model']} with {run['weights']}, but here it "
                         f"loads {now}; pass --pretrained with the weights the run used")
    net = NearlCLIP(clip, config, fused=fused)
    load_into(net, path, tensors, metadata)
    texts = tokenize_prompts(run["prompts"], model_name, net.text_tower.context_length, weights)
    return net.eval(), run, texts
