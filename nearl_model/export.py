"""Export a trained run to one AOTInductor package: ``python -m nearl_model.export --run RUN --out model.pt2``.

The package takes a batch of preprocessed images (B, 3, H, W) and returns the
class logits and probabilities (B, K); the K class prompts are baked in. It
loads without this package: ``torch._inductor.aoti_load_package`` in Python,
or ``cpp/nearl_classify`` (``torch::inductor::AOTIModelPackageLoader``) in C++.
A JSON file beside it (``model.json`` for ``model.pt2``) records the classes,
the preprocessing, the hashes of the backbone and adapter, the torch version
and the device; the package holds the same values as its metadata, so the
``.pt2`` alone is enough for the C++ classifier.

Exit codes: 0 done, 2 bad input (a missing or unfinished run, a diverged
adapter, a model torch.export cannot capture), with the reason in one line.
"""

if __name__ == "__main__":
    # torch, open_clip and triton take seconds to import; say something first.
    print("nearl: starting (importing torch, open_clip, triton)", flush=True)

import argparse
import hashlib
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from nearl_kernels import KernelBuildError

from ._cli import CLIError, HelpFormatter, add_backbone_args, check_outputs, fail, pick_device, writing
from ._io import atomic_write, atomic_write_text
from .data.images import file_digest
from .data.splits import LabeledImages

EXPORT_FORMAT = "nearl-export-v1"
# Metadata keys inside the package; cpp/nearl_classify.cpp reads the same names.
META_PREFIX = "nearl."
DEFAULT_MAX_BATCH = 64


class ExportError(Exception):
    """torch.export or AOTInductor refused the model; the message names the operator where one is known."""


class Classifier(nn.Module):
    """What the package runs: images (B, C, H, W), normalised -> (logits (B, K), probabilities (B, K)).

    Paired mode: the prompt tokens are a buffer, so export bakes them in and
    the package runs both towers (each image has its own text copies).
    Shared mode: the text side depends on the prompts alone, so it is
    computed here, once (:meth:`NearlCLIP.shared_text`), and its results are
    the buffers: the package runs only the image tower and its adapters.
    """

    def __init__(self, model: nn.Module, texts: torch.Tensor):
        super().__init__()
        self.model = model
        self.shared = model.config.mode == "shared"
        if self.shared:
            with torch.no_grad():
                text_ctx, text_valid, text_features = model.shared_text(texts)
            self.register_buffer("text_ctx", text_ctx)
            self.register_buffer("text_valid", text_valid)
            self.register_buffer("text_features", text_features)
        else:
            self.register_buffer("texts", texts.long())

    def forward(self, images: torch.Tensor):
        if self.shared:
            img_f = self.model.image_features(images, self.text_ctx, self.text_valid)
            logits = self.model.logits_from_features(img_f, self.text_features)
        else:
            logits = self.model(images, self.texts)
        logits = logits.float()
        return logits, logits.softmax(dim=-1)


def sidecar_path(package: str) -> str:
    """The JSON beside a package: ``model.pt2`` -> ``model.json``."""
    return os.path.splitext(package)[0] + ".json"


def state_hash(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes and bytes, in name order): its weights' identity."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def refused_op(err: BaseException) -> Optional[str]:
    """The operator an export error names (``aten::nonzero``, ``nearl.oca_fwd.default``), or None."""
    text = str(err)
    for pattern in (r"\b([A-Za-z_]\w*::[A-Za-z_]\w*(?:\.\w+)?)", r"\b((?:aten|prims|nearl\w*)\.\w+(?:\.\w+)?)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def export_program(classifier: Classifier, example: torch.Tensor, max_batch: int):
    """torch.export with a dynamic batch dimension in [1, max_batch]; refusals become an ExportError."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        with torch.no_grad():
            return torch.export.export(classifier, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # torch.export raises many types (Unsupported, UserError, fake-tensor errors)
        op = refused_op(err)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        where = f" at operator {op}" if op else ""
        raise ExportError(f"torch.export cannot capture this model{where}: {type(err).__name__}: {first}") from err


def compile_package(program, out: str, metadata: Dict[str, str]) -> None:
    """AOTInductor-compile ``program`` into the package ``out``, written atomically."""
    configs = {"aot_inductor.metadata": metadata}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            try:
                with torch.no_grad():
                    torch._inductor.aoti_compile_and_package(program, package_path=f, inductor_configs=configs)
            except OSError:
                raise
            except Exception as err:  # inductor's lowering and C++ compile errors
                op = refused_op(err)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                where = f" at operator {op}" if op else ""
                raise ExportError(f"AOTInductor cannot compile this model{where}: {type(err).__name__}: "
                                  f"{first}") from err

    atomic_write(out, write)


def package_metadata(info: dict) -> Dict[str, str]:
    """The package's own copy of what a loader needs, as the strings AOTInductor metadata holds."""
    floats = lambda xs: ",".join(repr(float(x)) for x in xs)  # noqa: E731 (repr round-trips a float exactly)
    return {
        META_PREFIX + "format": EXPORT_FORMAT,
        META_PREFIX + "classes": "\n".join(info["classes"]),
        META_PREFIX + "image_size": ",".join(str(s) for s in info["image_size"]),
        META_PREFIX + "channels": str(info["channels"]),
        META_PREFIX + "mean": floats(info["mean"]),
        META_PREFIX + "std": floats(info["std"]),
        META_PREFIX + "min_batch": str(info["batch"]["min"]),
        META_PREFIX + "max_batch": str(info["batch"]["max"]),
        META_PREFIX + "device": info["device"],
        META_PREFIX + "torch": info["torch"],
    }


def check_classes(classes: Sequence[str]) -> None:
    """Class names travel as lines of package metadata and as printed output: one line each, none empty."""
    bad = [c for c in classes if not c.strip() or "\n" in c or "\r" in c]
    if bad:
        raise CLIError(f"class names must be non-empty single lines to export; got {bad[:3]}")


def pick_classes(run: dict, wanted: Optional[str]) -> List[int]:
    """Indices of the run's classes to export: all, or the ``--classes`` names (JSON list or commas), in that order."""
    classes = run["classes"]
    if wanted is None:
        return list(range(len(classes)))
    try:
        names = json.loads(wanted) if wanted.lstrip().startswith("[") else [c.strip() for c in wanted.split(",")]
    except ValueError as err:
        raise CLIError(f"--classes {wanted!r} is not a JSON list of names: {err}") from err
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise CLIError(f"--classes names {unknown[:3]} that the run did not train on; its classes are {classes}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise CLIError(f"--classes must name at least 2 distinct classes of the run; got {names}")
    return [classes.index(n) for n in names]


def export_run(model, run: dict, texts: torch.Tensor, adapter: str, out: str, device: torch.device,
               max_batch: int = DEFAULT_MAX_BATCH, classes: Optional[str] = None) -> dict:
    """Export a loaded run to ``out`` and its JSON; return the JSON record.

    Args:
        model: the NearlCLIP from :func:`nearl_model.loading.load_trained`, on ``device``.
        run: its run record; texts: its prompt tokens (K, n).
        adapter: the adapter file (hashed into the record).
        out: the package path (``.pt2``).
        device: where the package runs (``cpu`` or ``cuda``).
        max_batch: the largest batch the package takes.
        classes: ``--classes`` (None: every class of the run).
    """
    keep = pick_classes(run, classes)
    names = [run["classes"][i] for i in keep]
    check_classes(names)
    texts = texts[keep].to(device)
    image_size = list(model.image_size)
    channels = model.image_tower.in_channels
    defaults = LabeledImages([], [])
    info = {
        "format": EXPORT_FORMAT,
        "classes": names,
        "prompts": [run["prompts"][i] for i in keep],
        "image_size": image_size, "channels": channels,
        "mean": list(defaults.mean), "std": list(defaults.std),
        "resize": "bilinear, antialiased, to image_size (torch.nn.functional.interpolate, align_corners=False)",
        "scale": "8-bit pixels / 255, 16-bit / 65535; grey repeated to 3 channels; alpha dropped",
        "batch": {"min": 1, "max": max_batch},
        "inputs": ["images (B, C, H, W) float32, normalised"],
        "outputs": ["logits (B, K) float32", "probabilities (B, K) float32"],
        "mode": model.config.mode,
        "kernels": "triton" if model.fused and device.type == "cuda" else "reference",
        "backbone": {"model": run["model"], "weights": run.get("weights", run.get("pretrained")),
                     "sha256": state_hash(model.clip)},
        "adapter": {"file": os.path.basename(adapter), "sha256": file_digest(adapter)},
        "torch": torch.__version__, "device": device.type,
    }
    classifier = Classifier(model, texts).eval()
    example = torch.zeros(2, channels, *image_size, device=device)
    t0 = time.time()
    print(f"exporting {len(names)} classes, {model.config.mode} mode, batch 1..{max_batch}, {device.type}", flush=True)
    program = export_program(classifier, example, max_batch)
    print(f"compiling with AOTInductor (a minute or more; torch.export took {time.time() - t0:.1f} s)", flush=True)
    with writing(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        compile_package(program, out, package_metadata(info))
    info["max_abs_logit_difference"] = check_package(out, classifier, example, max_batch)
    with writing(sidecar_path(out)):
        atomic_write_text(sidecar_path(out), json.dumps(info, indent=2) + "\n")
    return info


def check_package(out: str, classifier: Classifier, example: torch.Tensor, max_batch: int) -> float:
    """Load the package back and compare it with the model on a random batch; refuse a package that disagrees.

    The bound is relative to the logit scale: logits are ``scale * cos``, so a
    difference of 1e-4 of the scale is a cosine off by 1e-4, far above fp32
    reordering (about 1e-6 measured) and far below anything that moves a class.
    """
    package = torch._inductor.aoti_load_package(out)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(min(3, max_batch), *example.shape[1:], generator=g).to(example.device)
    with torch.no_grad():
        want, _ = classifier(images)
        got, _ = package(images)
    diff = (got - want).abs().max().item()
    scale = classifier.model.clip.logit_scale.exp().item()
    if not diff <= 1e-4 * scale:
        os.unlink(out)
        raise ExportError(f"the compiled package's logits differ from the model's by {diff:.3g} (allowed "
                          f"{1e-4 * scale:.3g}); the package was removed")
    return diff


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nearl_model.export", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a finished nearl_model.train output directory")
    src.add_argument("--adapter", help="adapter.safetensors written by nearl_model.train")
    p.add_argument("--out", required=True, help="the package to write (.pt2); its JSON goes beside it")
    add_backbone_args(p)
    p.add_argument("--classes", help="export only these of the run's classes (JSON list or comma-separated)")
    p.add_argument("--device", default="cpu", help="where the package runs: cpu, cuda, cuda:1 ...")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, put the fused Triton kernels in the package (CPU packages hold the reference maths)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="the largest batch the package takes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out package")
    args = p.parse_args(argv)
    try:
        return _export(args)
    except KeyboardInterrupt:
        return fail("interrupted; nothing was written")
    except (CLIError, ExportError, KernelBuildError) as err:
        return fail(err)


def check_out(args) -> None:
    """``--out`` is a new ``.pt2`` file (or ``--overwrite``) that writes over no input."""
    if not args.out.endswith(".pt2"):
        raise CLIError(f"--out {args.out!r} must end in .pt2 (the AOTInductor package format)")
    if os.path.isdir(args.out):
        raise CLIError(f"--out {args.out!r} is a directory; name the .pt2 file to write")
    written = [args.out, sidecar_path(args.out)]
    check_outputs("--out", args.out, written, {"--adapter": args.adapter, "--pretrained": args.pretrained,
                                               "--model": args.model}, out_is_dir=False)
    existing = [w for w in written if os.path.lexists(w)]
    if existing and not args.overwrite:
        raise CLIError(f"{existing[0]!r} already exists; pass --overwrite to replace it, or choose another --out")
    if args.max_batch < 1:
        raise CLIError(f"--max-batch must be at least 1; got {args.max_batch}")


def _export(args) -> int:
    from .loading import load_trained, run_adapter

    check_out(args)
    device = pick_device(args.device)
    try:
        adapter = run_adapter(args.run) if args.run else args.adapter
        # CPU packages carry the reference maths: AOTInductor runs user Triton kernels on GPUs only.
        model, run, texts = load_trained(adapter, args.pretrained, fused=args.fused and device.type == "cuda",
                                         model=args.model)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as err:
        raise CLIError(str(err)) from err
    model = model.to(device)
    info = export_run(model, run, texts, adapter, args.out, device, args.max_batch, args.classes)
    print(f"wrote {args.out} and {sidecar_path(args.out)} ({len(info['classes'])} classes, "
          f"{os.path.getsize(args.out) / 2**20:.1f} MiB; package vs model: max |logit difference| "
          f"{info['max_abs_logit_difference']:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
