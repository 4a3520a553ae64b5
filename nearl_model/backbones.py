"""Creating open_clip backbones: built-in names, BiomedCLIP, JSON configs, and pretrained weights.

Loading stays real (open_clip tags, ``hf-hub:`` ids, local checkpoint files)
but the machines this project is built on have no network. So every download
is preceded by a quick reachability check (Hugging Face's own offline mode,
``HF_HUB_OFFLINE``, is honoured), files already in the Hugging Face cache
are used without the network, and a failure says how to load the
downloaded files instead, in a form that works when followed.

Checkpoint files are read without unpickling code: safetensors, or
``torch.load(weights_only=True)``.
"""

import contextlib
import copy
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from torch import nn

log = logging.getLogger(__name__)

# A small CLIP for the demo and the tests: random weights, seconds on 2 CPU cores.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 96, "layers": 4, "head_width": 48},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
}
BUILTIN_CONFIGS = {"nearl-tiny": TINY_CLIP_CONFIG}

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
# Names that build a bundled architecture offline (or the hub model online).
BUNDLED_MODELS = {"biomedclip": (BIOMEDCLIP_HUB_ID, MODEL_CONFIG_DIR / "biomedclip" / "open_clip_config.json")}
# Hugging Face text towers whose configuration ships with nearl, so they build without the hub.
BUNDLED_HF_CONFIGS = {
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": MODEL_CONFIG_DIR / "biomedclip" / "pubmedbert",
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": MODEL_CONFIG_DIR / "biomedclip" / "pubmedbert",
}
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
HUB_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 3.0

_reachable_cache = {}


def hub_reachable(host: str = HUB_HOST, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``host`` answers on port 443 within ``timeout`` seconds (False under ``HF_HUB_OFFLINE``).

    The answer is kept for the process, so an offline machine pays for one
    probe, not one per file.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if host not in _reachable_cache:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _reachable_cache[host] = True
        except OSError:
            _reachable_cache[host] = False
    return _reachable_cache[host]


@contextlib.contextmanager
def _hub_guard():
    """Run Hugging Face downloads in offline mode when the hub cannot be reached.

    Cached files then load at once and missing ones fail at once, instead of
    a minute of retries.
    """
    from huggingface_hub import constants

    if hub_reachable():
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _hub_repo_available(repo: str, filename: str = "open_clip_config.json") -> bool:
    """True when the hub answers or ``filename`` of ``repo`` is already in the Hugging Face cache."""
    if hub_reachable():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


def _hub_advice(model: str, repo: str) -> str:
    alias = next((name for name, (hub, _) in BUNDLED_MODELS.items() if hub == model), None)
    also = f", or --model {alias} --pretrained /dl/open_clip_pytorch_model.bin" if alias else ""
    return (
        f"download open_clip_config.json and open_clip_pytorch_model.bin (and the tokenizer files, if the "
        f"repository has them) from https://huggingface.co/{repo} into one folder, say /dl, then use "
        f"--model /dl/open_clip_config.json --pretrained /dl/open_clip_pytorch_model.bin{also} "
        f"(in Python: create_clip('/dl/open_clip_config.json', '/dl/open_clip_pytorch_model.bin'))"
    )


def _tag_advice(model: str, tag: str) -> str:
    cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    hub = cfg.get("hf_hub", "").rstrip("/")
    source = f"https://huggingface.co/{hub}" if hub else cfg.get("url") or "its source"
    return (
        f"download the checkpoint of {model} {tag!r} elsewhere (from {source}) and pass its local path: "
        f"--model {model} --pretrained /path/to/open_clip_pytorch_model.bin "
        f"(in Python: create_clip({model!r}, '/path/to/open_clip_pytorch_model.bin'))"
    )


def _offline_error(what: str, err: Exception, advice: str) -> RuntimeError:
    reason = "the Hugging Face Hub is not reachable from this machine" if not hub_reachable() else (
        f"{type(err).__name__}: {err}")
    return RuntimeError(f"could not fetch {what} ({reason}); {advice}")


def load_checkpoint_file(path: str) -> dict:
    """Read a checkpoint's tensors without running any pickled code.

    Args:
        path: a ``.safetensors`` file, or a PyTorch file that
            ``torch.load(weights_only=True)`` accepts (tensors, dicts, lists,
            numbers, strings).

    Returns:
        its state dict (a ``state_dict`` entry is unwrapped, ``module.``
        prefixes from DataParallel are dropped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupt, truncated, not a checkpoint, or holds
            objects other than tensors; the message names the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {path!r} does not exist; if it moved, pass its "
                                f"current path (--pretrained /new/path)")
    fix = ("download it again (a partial download or a file of another format gives this), "
           "or convert it to .safetensors")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            checkpoint = load_file(path, device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # A pickled global (a class or function) is what weights_only refuses; other errors are damage.
        if "Unsupported global" in str(err):
            raise ValueError(
                f"pretrained checkpoint {path!r} holds pickled Python objects other than tensors, which are "
                f"not loaded (that would run code from the file); save only the model's state_dict, "
                f"or convert it to .safetensors"
            ) from err
        # torch's own text would suggest weights_only=False, which is exactly what must not be done.
        raise ValueError(f"pretrained checkpoint {path!r} is not a readable checkpoint ({type(err).__name__}: "
                         f"damaged, truncated, or not a PyTorch/safetensors file); {fix}") from err
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint or not all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        raise ValueError(f"pretrained checkpoint {path!r} is not a state dict of tensors "
                         f"(got {type(checkpoint).__name__}); {fix}")
    if next(iter(checkpoint)).startswith("module."):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def load_pretrained_file(clip: nn.Module, path: str) -> None:
    """Load a local checkpoint into ``clip``, safely, with open_clip's key conversions.

    Raises:
        FileNotFoundError / ValueError: see :func:`load_checkpoint_file`; also
            a ValueError when the checkpoint does not fit the architecture.
    """
    if path.endswith(".npz"):
        # big_vision (SigLIP) weights: numpy arrays, read by open_clip with pickling disabled.
        if not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained checkpoint {path!r} does not exist; if it moved, pass its "
                                f"current path (--pretrained /new/path)")
        if not hasattr(getattr(clip, "visual", None), "trunk"):
            raise ValueError(f"pretrained checkpoint {path!r} is a .npz, the big_vision format of SigLIP weights, but "
                             "this model's image tower is not a timm SigLIP trunk; pass a SigLIP --model "
                             "(e.g. ViT-B-16-SigLIP), or a .safetensors/.pt checkpoint of this model")
        try:
            open_clip.load_checkpoint(clip, path)
        except Exception as err:  # numpy, zipfile and open_clip's key mapping raise many types
            # numpy's own text suggests allow_pickle, which would run code from the file: never passed on.
            raise ValueError(f"pretrained checkpoint {path!r} is not a readable big_vision .npz of this model "
                             f"({type(err).__name__}: damaged, truncated, holding pickled objects, which are never "
                             "loaded, or from another architecture); download it again") from err
        return
    # Validated here first: open_clip's own loader would end a corrupt file in a bare KeyError.
    # The tensors are read once more by open_clip, for its key conversions.
    load_checkpoint_file(path)
    try:
        open_clip.load_checkpoint(clip, path, weights_only=True)
    except (RuntimeError, KeyError) as err:
        raise ValueError(
            f"pretrained checkpoint {path!r} does not fit this architecture ({str(err).splitlines()[0]}); "
            "pass the model name or open_clip_config.json the checkpoint was trained with as --model"
        ) from err


# What a model config may ask for: far above every open_clip architecture (ViT-bigG: 48 layers, width 1664;
# EVA-CLIP-8B: width 4096), far below a size that only an allocator error would stop.
MAX_LAYERS = 256
MAX_WIDTH = 16384
MAX_IMAGE_SIZE = 4096
MAX_CONTEXT = 4096
MAX_VOCAB = 4_194_304
MAX_MLP_RATIO = 64
# The ids open_clip's SimpleTokenizer (CLIP's BPE) gives; a text tower using it needs this many embeddings.
SIMPLE_TOKENIZER_IDS = 49408


def _int_field(source: str, name: str, value, low: int, high: int, why: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"model config {source}: {name} = {value!r} must be an int in {low}..{high}{why}")
    return value


def _ratio_field(source: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_MLP_RATIO:
        raise ValueError(f"model config {source}: {name} = {value!r} must be a number in (0, {MAX_MLP_RATIO}]")
    return float(value)


def _image_side(source: str, value) -> int:
    sides = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(sides) not in (1, 2):
        raise ValueError(f"model config {source}: vision_cfg.image_size = {value!r} must be an int or [height, width]")
    return min(_int_field(source, "vision_cfg.image_size", v, 1, MAX_IMAGE_SIZE) for v in sides)


def check_model_config(cfg: dict, model: Union[str, dict]) -> int:
    """Check an open_clip model config against what can be built, before anything is allocated.

    Every size open_clip's own towers read is an int in a bounded range,
    heads divide widths, a patch fits in the image, and a text tower using
    CLIP's tokenizer has an embedding for each of its ids. Fields of timm or
    Hugging Face towers are left to those libraries.

    Args:
        cfg: the model config (``embed_dim``, ``vision_cfg``, ``text_cfg``).
        model: where it came from, for the message (a name, a file, a dict).

    Returns:
        the estimated number of parameters (0 for parts that cannot be
        estimated, such as timm trunks), for :func:`check_model_memory`.

    Raises:
        ValueError: naming the source, the field, the value and the bound,
            e.g. ``model config 'big.json': vision_cfg.layers = 0 must be an int in 1..256``.
    """
    source = repr(model) if isinstance(model, str) else "(the config dict)"
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    embed = _int_field(source, "embed_dim", cfg.get("embed_dim"), 1, MAX_WIDTH)
    n = 0
    side = _image_side(source, vision.get("image_size", 224))
    if not vision.get("timm_model_name"):
        layers = vision.get("layers", 12)
        width = _int_field(source, "vision_cfg.width", vision.get("width", 768), 1, MAX_WIDTH)
        if isinstance(layers, (list, tuple)):
            # open_clip's ModifiedResNet: four stages of bottleneck blocks, width the first stage's channels.
            if len(layers) != 4:
                raise ValueError(f"model config {source}: vision_cfg.layers = {layers!r} must be an int (ViT) or "
                                 "four ints (ResNet stages)")
            blocks = sum(_int_field(source, "vision_cfg.layers[]", v, 1, MAX_LAYERS) for v in layers)
            n += 17 * blocks * (4 * width) ** 2
        else:
            layers = _int_field(source, "vision_cfg.layers", layers, 1, MAX_LAYERS)
            head_width = _int_field(source, "vision_cfg.head_width", vision.get("head_width", 64), 1, width,
                                    f" (at most vision_cfg.width = {width})")
            if width % head_width:
                raise ValueError(f"model config {source}: vision_cfg.width = {width} must be a multiple of "
                                 f"vision_cfg.head_width = {head_width}")
            patch = _int_field(source, "vision_cfg.patch_size", vision.get("patch_size", 16), 1, side,
                               f" (at most vision_cfg.image_size = {side}: a patch larger than the image gives no "
                               "tokens)")
            mlp = _ratio_field(source, "vision_cfg.mlp_ratio", vision.get("mlp_ratio", 4.0))
            grid = (side // patch) ** 2
            n += layers * (4 + 2 * mlp) * width ** 2 + 3 * patch ** 2 * width + (grid + 1) * width + width * embed
    context = _int_field(source, "text_cfg.context_length", text.get("context_length", 77), 2, MAX_CONTEXT)
    if not text.get("hf_model_name"):
        width = _int_field(source, "text_cfg.width", text.get("width", 512), 1, MAX_WIDTH)
        heads = _int_field(source, "text_cfg.heads", text.get("heads", 8), 1, width,
                           f" (at most text_cfg.width = {width})")
        if width % heads:
            raise ValueError(f"model config {source}: text_cfg.width = {width} must be a multiple of "
                             f"text_cfg.heads = {heads}")
        layers = _int_field(source, "text_cfg.layers", text.get("layers", 12), 1, MAX_LAYERS)
        mlp = _ratio_field(source, "text_cfg.mlp_ratio", text.get("mlp_ratio", 4.0))
        simple = not text.get("hf_tokenizer_name") and not (isinstance(model, str) and "siglip" in model.lower())
        low = SIMPLE_TOKENIZER_IDS if simple else 1
        vocab = _int_field(source, "text_cfg.vocab_size", text.get("vocab_size", 49408), low, MAX_VOCAB,
                           " (CLIP's tokenizer gives ids up to 49407)" if simple else "")
        n += layers * (4 + 2 * mlp) * width ** 2 + (vocab + context) * width + width * embed
    return int(n)


def physical_memory() -> int:
    """This machine's memory in bytes (0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_model_memory(n_params: int, model: Union[str, dict], activations: int = 0, where: str = "",
                       available: Optional[int] = None) -> None:
    """Refuse a model whose fp32 parameters (plus ``activations`` bytes) cannot fit in ``available`` bytes.

    Args:
        n_params: the estimate of :func:`check_model_config`.
        model: the model, for the message.
        activations: estimated activation bytes of a training batch (see
            :func:`activation_bytes`), 0 to check the parameters alone.
        where: how that batch was sized, for the message (``"at --batch-size 32"``).
        available: bytes to compare with; this machine's memory by default.

    Raises:
        ValueError: with the estimate and the memory it exceeds.
    """
    available = physical_memory() if available is None else available
    need = 4 * n_params + activations
    if available and need > available:
        source = repr(model) if isinstance(model, str) else "(the config dict)"
        parts = f"{n_params / 1e6:,.0f}M parameters ({4 * n_params / 2 ** 30:,.1f} GiB in fp32)"
        if activations:
            parts += f" and about {activations / 2 ** 30:,.1f} GiB of activations {where}".rstrip()
        raise ValueError(f"model config {source}: {parts} need more than the {available / 2 ** 30:,.1f} GiB of "
                         "memory here; use a smaller model" + (" or a smaller --batch-size" if activations else ""))


def activation_bytes(cfg: dict, images: int, texts: int) -> int:
    """Estimated bytes a training step keeps for backward through the frozen towers.

    Gradients reach the adapters in every layer, so each block keeps its
    inputs, attention probabilities and MLP activations for ``images`` image
    and ``texts`` text sequences (full context: an upper bound).
    """
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    total = 0
    if not vision.get("timm_model_name") and isinstance(vision.get("layers", 12), int):
        side = min(vision.get("image_size", 224)) if isinstance(vision.get("image_size"), (list, tuple)) else \
            vision.get("image_size", 224)
        width, patch = vision.get("width", 768), vision.get("patch_size", 16)
        tokens, heads = (side // patch) ** 2 + 1, max(1, width // vision.get("head_width", 64))
        per_token = (8 + 2 * vision.get("mlp_ratio", 4.0)) * width + heads * tokens
        total += images * tokens * vision.get("layers", 12) * per_token
    if not text.get("hf_model_name"):
        tokens, width = text.get("context_length", 77), text.get("width", 512)
        per_token = (8 + 2 * text.get("mlp_ratio", 4.0)) * width + text.get("heads", 8) * tokens
        total += texts * tokens * text.get("layers", 12) * per_token
    return int(4 * total)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(CHECKPOINT_SUFFIXES)


def _read_json_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read model config {path!r}: {err}") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"model config {path!r} must be a JSON object; got {type(cfg).__name__}")
    return cfg


def model_config(model: Union[str, dict]) -> Tuple[dict, Optional[Path]]:
    """The open_clip model config of ``model`` and the folder it came from (None if built in).

    Args:
        model: see :func:`create_clip`. ``hf-hub:`` ids fetch the hub's
            ``open_clip_config.json`` (from the cache when offline).

    Returns:
        (model_cfg, base_dir): the dict open_clip's model classes take
        (``embed_dim``, ``vision_cfg``, ``text_cfg``...), a deep copy; and the
        folder of a JSON config, where relative paths and tokenizer files
        are looked up.
    """
    base_dir = None
    if isinstance(model, dict):
        cfg = model
    elif not isinstance(model, str) or not model:
        raise ValueError(f"model must be an open_clip model name, 'hf-hub:' id or JSON config; got {model!r}")
    elif model in BUILTIN_CONFIGS:
        cfg = BUILTIN_CONFIGS[model]
    elif model in BUNDLED_MODELS:
        path = BUNDLED_MODELS[model][1]
        cfg, base_dir = _read_json_config(str(path)), path.parent
    elif model.endswith(".json"):
        cfg, base_dir = _read_json_config(model), Path(model).resolve().parent
    elif model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        from open_clip.pretrained import download_pretrained_from_hf

        try:
            with _hub_guard():
                path = download_pretrained_from_hf(repo, filename="open_clip_config.json")
        except Exception as err:
            raise _offline_error(f"the config of {model!r}", err, _hub_advice(model, repo)) from err
        cfg, base_dir = _read_json_config(path), Path(path).parent
    elif model in open_clip.list_models():
        cfg = open_clip.get_model_config(model)
    else:
        raise ValueError(
            f"unknown model {model!r}: use one of open_clip.list_models() (e.g. ViT-B-16), "
            f"{', '.join(repr(n) for n in (*BUILTIN_CONFIGS, *BUNDLED_MODELS))}, an 'hf-hub:org/repo' id, "
            "or a path to a JSON model config (open_clip's format, or a hub repo's open_clip_config.json)"
        )
    cfg = copy.deepcopy(cfg.get("model_cfg", cfg))
    if not isinstance(cfg.get("vision_cfg"), dict) or not isinstance(cfg.get("text_cfg"), dict):
        what = repr(model) if isinstance(model, str) else "the model config dict"
        raise ValueError(f"bad model config in {what}: expected open_clip's embed_dim, vision_cfg, text_cfg")
    check_model_memory(check_model_config(cfg, model), model)
    return cfg, base_dir


def _local_hf_dir(name: str, base_dir: Optional[Path]) -> Optional[Path]:
    """A local folder holding the Hugging Face config ``name`` refers to, if there is one."""
    for candidate in ([base_dir / name] if base_dir is not None else []) + [Path(name)]:
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    bundled = BUNDLED_HF_CONFIGS.get(name)
    return bundled if bundled is not None and (bundled / "config.json").is_file() else None


def build_from_config(cfg: dict, base_dir: Optional[Path] = None) -> nn.Module:
    """Instantiate an open_clip model from its config, with random weights and no download.

    Tower weights never come from timm or the hub here (a full checkpoint, or
    nothing, is loaded afterwards); a Hugging Face text tower's architecture
    comes from a local folder or nearl's bundled configs when there is one.
    The class is open_clip's choice: CoCa with a ``multimodal_cfg``,
    CustomTextCLIP for ``custom_text`` or a Hugging Face text tower, else CLIP.
    """
    cfg = copy.deepcopy(cfg)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if vision.get("timm_model_name"):
        vision["timm_model_pretrained"] = False
    hf_name = text.get("hf_model_name")
    if hf_name:
        text["hf_model_pretrained"] = False
        local = _local_hf_dir(hf_name, base_dir)
        if local is not None:
            text["hf_model_name"] = str(local)
    custom_text = cfg.pop("custom_text", False) or bool(hf_name)
    if "multimodal_cfg" in cfg:
        model_class = open_clip.CoCa
    else:
        model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        with _hub_guard():
            return model_class(**cfg)
    except TypeError as err:
        raise ValueError(f"bad model config: {err}; expected open_clip's embed_dim, vision_cfg, text_cfg") from err
    except (OSError, ValueError) as err:
        if hf_name:
            raise _offline_error(
                f"the Hugging Face config of the text tower {hf_name!r}", err,
                "put that model's config.json in a folder and set text_cfg.hf_model_name to it "
                "(a path relative to the JSON config works)",
            ) from err
        raise


def create_clip(model: Union[str, dict], pretrained: Optional[str] = None) -> nn.Module:
    """Build an open_clip CLIP.

    Args:
        model: an open_clip model name (``"ViT-B-16"``), ``"biomedclip"``, an
            ``hf-hub:org/repo`` id, ``"nearl-tiny"``, a path to a JSON model
            config (open_clip's format, or a hub repo's ``open_clip_config.json``
            with its ``model_cfg`` key), or such a dict.
            ``"biomedclip"`` loads the hub's real weights where the hub is
            reachable (or cached) and no ``pretrained`` file is given;
            otherwise it builds the bundled BiomedCLIP architecture.
        pretrained: None (random init), an open_clip tag (``"openai"``), or a
            local checkpoint path (``.safetensors``, or a PyTorch file of
            tensors). For an ``hf-hub:`` id a local file is loaded into the
            architecture of the ``open_clip_config.json`` beside it.

    Returns:
        the open_clip model, in eval mode. Its ``nearl_weights`` attribute
        says where the weights came from (``"random init"`` for none), for
        the CLIs to print.

    Raises:
        ValueError: unknown model name, unreadable config, or a corrupt or
            unfitting checkpoint (the message names the file).
        FileNotFoundError: ``pretrained`` looks like a path and does not exist.
        RuntimeError: a download failed; the message says how to load offline.

    Example:
        >>> clip = create_clip("biomedclip")            # offline: random init, bundled architecture
        >>> clip = create_clip("/dl/open_clip_config.json", "/dl/open_clip_pytorch_model.bin")
    """
    if isinstance(pretrained, str) and not pretrained:
        pretrained = None
    if pretrained and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained checkpoint {pretrained!r} does not exist; if it moved, pass its "
                                f"current path (--pretrained /new/path)")

    if isinstance(model, str) and model in BUNDLED_MODELS and not pretrained:
        hub_id = BUNDLED_MODELS[model][0]
        if _hub_repo_available(hub_id[len("hf-hub:"):]):
            return _create_from_hub(hub_id)
        log.info("%s: the hub is not reachable; building the bundled architecture with random weights", model)

    if isinstance(model, str) and model.startswith("hf-hub:"):
        if pretrained:
            return _hub_id_with_file(model, pretrained)
        return _create_from_hub(model)

    is_named = isinstance(model, str) and model in open_clip.list_models()
    if pretrained and is_named and not os.path.isfile(pretrained):
        return _create_with_tag(model, pretrained)
    cfg, base_dir = model_config(model)
    clip = build_from_config(cfg, base_dir)
    if pretrained:
        if not os.path.isfile(pretrained):
            raise ValueError(
                f"pretrained {pretrained!r} is neither a file nor an open_clip tag of a built-in model; "
                "pass a local checkpoint path"
            )
        load_pretrained_file(clip, pretrained)
        clip.nearl_weights = f"weights from {pretrained}"
    else:
        clip.nearl_weights = "random init"
    return clip.eval()


def _create_with_tag(model: str, tag: str) -> nn.Module:
    if not open_clip.get_pretrained_cfg(model, tag):
        raise ValueError(
            f"pretrained {tag!r} is neither a file nor a tag of {model}; its tags are "
            f"{open_clip.list_pretrained_tags_by_model(model)}"
        )
    try:
        with _hub_guard():
            clip = open_clip.create_model(model, pretrained=tag)
    except Exception as err:
        raise _offline_error(f"pretrained weights {tag!r} for {model!r}", err, _tag_advice(model, tag)) from err
    clip.nearl_weights = f"open_clip {model} {tag!r} weights"
    return clip.eval()


def _create_from_hub(model: str) -> nn.Module:
    repo = model[len("hf-hub:"):]
    try:
        with _hub_guard():
            clip = open_clip.create_model(model)
    except Exception as err:
        raise _offline_error(f"{model!r}", err, _hub_advice(model, repo)) from err
    clip.nearl_weights = f"{model} weights"
    return clip.eval()


def _hub_id_with_file(model: str, pretrained: str) -> nn.Module:
    """A hub id with a local weights file: the architecture from the config beside the file, else the hub's."""
    if not os.path.isfile(pretrained):
        raise ValueError(f"with an hf-hub: model, --pretrained must be a local checkpoint file; got {pretrained!r} "
                         "(hub repositories bring their own weights: omit --pretrained)")
    beside = Path(pretrained).resolve().parent / "open_clip_config.json"
    if beside.is_file():
        return create_clip(str(beside), pretrained)
    cfg, base_dir = model_config(model)
    clip = build_from_config(cfg, base_dir)
    load_pretrained_file(clip, pretrained)
    clip.nearl_weights = f"weights from {pretrained}"
    return clip.eval()


def _has_tokenizer_files(folder: Optional[Path]) -> bool:
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES)


def write_wordpiece_vocab(folder: Union[str, Path], words=(), lowercase: bool = True) -> Path:
    """Write a small BERT WordPiece tokenizer (vocab.txt, tokenizer.json, tokenizer_config.json) into ``folder``.

    BERT's special ids are kept ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103), then ``words``, then single characters and their ``##``
    continuations, so any ASCII text tokenizes (character by character where
    a word is not in the vocabulary).

    Returns:
        the folder, loadable with ``transformers.AutoTokenizer.from_pretrained``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not (lowercase and chr(c).isupper())]
    for token in [*words, *chars, *("##" + c for c in chars)]:
        if token not in vocab:
            vocab.append(token)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 builds BERT tokenizers from tokenizer.json, 4.x also from vocab.txt: write both.
    from tokenizers import BertWordPieceTokenizer

    BertWordPieceTokenizer(str(folder / "vocab.txt"), lowercase=lowercase).save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "model_max_length": 512,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return folder


def _generated_tokenizer_dir() -> Path:
    folder = Path(tempfile.gettempdir()) / "nearl-generated-wordpiece"
    if not (folder / "tokenizer.json").is_file():
        # Written aside and renamed into place, so a concurrent run never reads half a vocabulary.
        staging = write_wordpiece_vocab(tempfile.mkdtemp(prefix="nearl-wordpiece-"))
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
    return folder


def _check_vocab(model: Union[str, dict], text_cfg: dict, n_ids: int) -> None:
    """An open_clip text tower needs an embedding for every id its tokenizer gives."""
    if text_cfg.get("hf_model_name"):
        return
    vocab = text_cfg.get("vocab_size", SIMPLE_TOKENIZER_IDS)
    if vocab < n_ids:
        source = repr(model) if isinstance(model, str) else "(the config dict)"
        raise ValueError(f"model config {source}: text_cfg.vocab_size = {vocab} is below the {n_ids} ids its "
                         f"tokenizer {text_cfg.get('hf_tokenizer_name')!r} gives; set it to at least {n_ids}")


def get_tokenizer(
    model: Union[str, dict], context_length: Optional[int] = None, pretrained: Optional[str] = None
) -> Tuple[Callable, dict]:
    """The tokenizer of ``model``'s text tower, and its text config.

    Args:
        model: as for :func:`create_clip`.
        context_length: tokens per prompt before trimming; the config's by default.
        pretrained: the weights the model was built with. When a Hugging Face
            tokenizer cannot be found offline, a bundled model without weights
            (random init) falls back to a generated character vocabulary;
            with weights it is an error, since wrong token ids would give
            wrong answers silently.

    Returns:
        (tokenizer, text_cfg): ``tokenizer(list_of_str)`` gives token ids
        (K, context_length) padded to the full context; ``text_cfg`` is the
        model config's ``text_cfg``.

    Raises:
        RuntimeError: the tokenizer cannot be loaded (offline, not cached);
            the message says where to put its files.
    """
    cfg, base_dir = model_config(model)
    text_cfg = cfg["text_cfg"]
    if context_length is None:
        context_length = text_cfg.get("context_length", 77)
    hf_name = text_cfg.get("hf_tokenizer_name")
    if not hf_name:
        if isinstance(model, str) and "siglip" in model.lower():
            with _hub_guard():
                return open_clip.get_tokenizer(model, context_length=context_length), text_cfg
        return SimpleTokenizer(context_length=context_length), text_cfg
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("tokenizer_mode"):
        kwargs["tokenizer_mode"] = text_cfg["tokenizer_mode"]
    sources = []
    # The files of a downloaded hub repo sit beside its open_clip_config.json.
    if _has_tokenizer_files(base_dir):
        sources.append(base_dir)
    if base_dir is not None and _has_tokenizer_files(base_dir / hf_name):
        sources.append(base_dir / hf_name)
    if _has_tokenizer_files(Path(hf_name)):
        sources.append(Path(hf_name))
    sources.append(hf_name)
    errors = []
    for source in sources:
        try:
            with _hub_guard():
                tokenizer = HFTokenizer(str(source), context_length=context_length, **kwargs)
        except Exception as err:  # transformers raises OSError, ValueError or its own types
            errors.append(f"{source}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        _check_vocab(model, text_cfg, len(tokenizer.tokenizer))
        return tokenizer, text_cfg
    bundled = isinstance(model, str) and model in BUNDLED_MODELS
    # The same condition under which create_clip built the bundled architecture at random init.
    if bundled and not pretrained and not _hub_repo_available(BUNDLED_MODELS[model][0][len("hf-hub:"):]):
        log.warning("%s: tokenizer %r is not available offline; random init, so prompts use a generated "
                    "character vocabulary", model, hf_name)
        return HFTokenizer(str(_generated_tokenizer_dir()), context_length=context_length), text_cfg
    what = repr(model) if isinstance(model, str) else "the model config"
    raise RuntimeError(
        f"cannot load the tokenizer {hf_name!r} of {what} (tried {'; '.join(errors)}); download its files "
        "(tokenizer.json or vocab.txt, and tokenizer_config.json) into the folder of the model's "
        "open_clip_config.json and pass that file as --model, or run once where the hub is reachable"
    )
