"""Train and evaluate NEARL-CLIP adapters: ``python -m nearl_model.train [--fused]``.

With no ``--data`` it trains on the embedded synthetic demo (generated X-ray-like
images, a small random-init CLIP), which runs in about a minute on 2 CPU
cores and shows learning (the README quotes a measured run). With ``--data`` it takes an ImageFolder tree, a CSV,
a MedMNIST .npz or a DICOM folder. ``torchrun --nproc_per_node N -m
nearl_model.train ...`` trains with DistributedDataParallel.

Exit codes: 0 done, 2 bad input (data, model, paths, settings) or a diverged run,
with the reason on stderr in one line.
"""

if __name__ == "__main__":
    # torch, open_clip and triton take seconds to import; say something first.
    print("nearl: starting (importing torch, open_clip, triton)", flush=True)

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from nearl_kernels import KernelBuildError

from ._cli import AUTOCAST_DTYPES, CLIError, HelpFormatter, check_outputs, fail, one_line, pick_device
from ._io import atomic_write_bytes, atomic_write_text
from .adapter_io import file_identity as _file_identity
from .adapter_io import resolved
from ._progress import Progress
from .backbones import (activation_bytes, check_model_config, check_model_memory, create_clip, model_config,
                        physical_memory)
from .clip import NearlCLIP
from .config import NearlConfig
from .data import DataError, DataSplits, LabeledImages, few_shot, is_named_source, load_dataset
from .metrics import classification_metrics, format_per_class, format_scores, plot_confusion, plot_curves
from .prompts import check_template, class_prompts, default_template, tokenize_prompts
from .run_dir import RUN_FILES, RunDir, RunDirError

DEFAULT_EPOCHS = 20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_model.train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="ImageFolder dir, CSV (path,label[,split]), MedMNIST .npz, DICOM dir, "
                                  "sklearn-digits[:0-4] (bundled, no download) or medmnist:NAME (a downloaded "
                                  "MedMNIST set, e.g. medmnist:pneumoniamnist); omit for the synthetic demo")
    d.add_argument("--classes", help="class names: JSON list, JSON {label: name} or CSV label,name")
    d.add_argument("--prompt", default=None, help="prompt template with one {}; default 'a chest X-ray showing {}.' "
                                                  "for the demo, 'a medical image showing {}.' otherwise")
    d.add_argument("--descriptions", help="JSON {class: description} used in the prompt instead of the name")
    d.add_argument("--shots", type=int, default=None, help="few-shot: K training images per class (default: all)")
    d.add_argument("--seed", type=int, default=0, help="seed for splits, shuffling, few-shot sampling and init")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="nearl-tiny", help="open_clip name (ViT-B-16, ViT-B-16-SigLIP...), "
                   "biomedclip, hf-hub:org/repo, JSON config, or nearl-tiny")
    m.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file (default: random init)")
    m.add_argument("--mode", choices=("paired", "shared"), default=None,
                   help="adapter mode; default: --config's mode, else paired")
    m.add_argument("--config", help="JSON NearlConfig (adapter width, heads, queries, mode...)")
    m.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="route the adapters through the nearl_kernels ops (Triton on CUDA)")
    m.add_argument("--compile", action="store_true",
                   help="torch.compile the repeated regions (each tower's block, the interaction layer) once each")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=None,
                   help="passes over the training set (default: 20, or more to reach --min-steps)")
    t.add_argument("--min-steps", type=int, default=200,
                   help="without --epochs, train at least this many optimiser steps: a few-shot set is one or "
                        "two batches an epoch, and 20 steps leave the adapters at chance")
    t.add_argument("--batch-size", type=int, default=32, help="global batch (split across processes)")
    t.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay on matrices")
    t.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of all steps")
    t.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    t.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many batches (smoke runs)")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output directory (default: a new runs/<date-time>)")
    o.add_argument("--resume", action="store_true", help="continue the run in OUT from its checkpoint")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the run in OUT once the new one has its first checkpoint (until then the new run "
                        "writes into OUT/.nearl-new, and a failure leaves the old run as it was)")
    return p


def check_args(args) -> None:
    """Range-check every number before anything is built: one line naming the flag and the value."""
    for flag, minimum in (("batch_size", 1), ("accum", 1), ("min_steps", 1), ("workers", 0)):
        if getattr(args, flag) < minimum:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= {minimum}; got {getattr(args, flag)}")
    for flag in ("epochs", "shots", "max_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1; got {getattr(args, flag)}")
    checks = (("lr", lambda v: v > 0, "> 0"), ("grad_clip", lambda v: v > 0, "> 0"),
              ("weight_decay", lambda v: v >= 0, ">= 0"), ("warmup", lambda v: 0 <= v < 1, "in [0, 1)"))
    for flag, ok, rule in checks:
        value = getattr(args, flag)
        if not (math.isfinite(value) and ok(value)):
            raise CLIError(f"--{flag.replace('_', '-')} must be a finite number {rule}; got {value}")
    if args.prompt is not None:
        try:
            check_template(args.prompt)
        except ValueError as err:
            raise CLIError(f"--prompt: {err}") from err


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        return fail("interrupted before training started; nothing was written")
    except (CLIError, DataError, RunDirError, KernelBuildError) as err:
        return fail(err)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


LAUNCH_VARIABLES = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, low: int, high: Optional[int] = None) -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise CLIError(f"environment variable {name}={value!r} must be {bound}; torchrun sets it, so launch with "
                       f"torchrun, or unset it for one process")
    return number


def check_launch_environment(cuda_devices: int = 0) -> int:
    """The world size a torchrun-style environment asks for, once every variable it needs is there and sane.

    A WORLD_SIZE left over in a shell, without the RANK and MASTER_ADDR/PORT a
    launcher sets beside it, would otherwise end in a rendezvous traceback or a
    wait for processes that never come.
    """
    if "WORLD_SIZE" not in os.environ:
        return 1
    world = _env_int("WORLD_SIZE", 1)
    if world == 1:
        return 1
    missing = [name for name in LAUNCH_VARIABLES if not os.environ.get(name)]
    if missing:
        raise CLIError(f"WORLD_SIZE={world} looks like a distributed launch, but {', '.join(missing)} "
                       f"{'is' if len(missing) == 1 else 'are'} not set; start it with torchrun --nproc_per_node "
                       f"{world} -m nearl_model.train ..., or unset WORLD_SIZE to train in one process")
    _env_int("RANK", 0, world - 1)
    _env_int("MASTER_PORT", 1, 65535)
    if "LOCAL_RANK" in os.environ:
        # One process per GPU on a node; without GPUs, at most one per process of the run.
        _env_int("LOCAL_RANK", 0, (cuda_devices or world) - 1)
    return world


def _distributed(device: torch.device):
    world = check_launch_environment(torch.cuda.device_count() if device.type == "cuda" else 0)
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"cannot join the distributed run at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                       f"(WORLD_SIZE={world}, RANK={os.environ['RANK']}): {one_line(str(err))}") from err
    return dist.get_rank(), world, device


def resolve_config(args) -> NearlConfig:
    """--config's NearlConfig (defaults without one), with --mode overriding its mode only when given."""
    config = NearlConfig()
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                config = NearlConfig.from_json(f.read())
        except (OSError, ValueError, TypeError) as err:
            raise CLIError(f"cannot read --config {args.config!r}: {err}") from err
    if args.mode is not None:
        config = NearlConfig.from_dict({**config.to_dict(), "mode": args.mode})
    if args.fused:
        try:
            config.check_fused()
        except ValueError as err:
            raise CLIError(f"--config {args.config!r}: {err}" if args.config else str(err)) from err
    return config


def build_model(args, config: NearlConfig) -> NearlCLIP:
    """The backbone and fresh adapters; seeded, so a random-init backbone is reproducible."""
    torch.manual_seed(args.seed)
    try:
        # The config's fields and the memory it needs are checked before anything is allocated.
        cfg, _ = model_config(args.model)
        world = max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
        per_process = max(1, args.batch_size // world)
        activations = activation_bytes(cfg, per_process, per_process * 2 if config.mode == "paired" else 2)
        if args.precision != "fp32":
            activations //= 2
        check_model_memory(check_model_config(cfg, args.model), args.model, activations,
                           f"at --batch-size {args.batch_size}", _device_memory(args.device))
        clip = create_clip(args.model, args.pretrained)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise CLIError(str(err)) from err
    try:
        return NearlCLIP(clip, config, fused=args.fused)
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from err


def _device_memory(device: str) -> int:
    """Bytes of memory on the device a run will use (this machine's memory for the CPU; 0 if unknown)."""
    try:
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            index = torch.device(device).index if device.startswith("cuda") else None
            return torch.cuda.get_device_properties(index or 0).total_memory
    except (RuntimeError, AssertionError, ValueError):
        return 0
    return physical_memory()


def make_prompts(args, classes: List[str]) -> List[str]:
    """One prompt per class; folder-style names read as words ("normal_lungs" -> "normal lungs")."""
    descriptions = {}
    if args.descriptions:
        try:
            with open(args.descriptions, encoding="utf-8-sig") as f:
                descriptions = json.load(f)
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot read --descriptions {args.descriptions!r}: {err}") from err
        if not isinstance(descriptions, dict) or not all(isinstance(v, str) for v in descriptions.values()):
            raise CLIError(f"--descriptions {args.descriptions!r} must be a JSON object {{class: description}}")
    template = args.prompt or default_template(args.data)
    unknown = sorted(set(descriptions) - set(classes))
    if unknown:
        raise CLIError(f"--descriptions names classes that do not exist: {unknown}; classes are {classes}")
    words = {c: descriptions.get(c, c.replace("_", " ")) for c in classes}
    try:
        return class_prompts(classes, template, words)
    except ValueError as err:
        flag = "--prompt: " if args.prompt and "template" in str(err) else ""
        raise CLIError(f"{flag}{err}") from err


def lr_lambda(total: int, warmup: int):
    """Linear warm-up to 1, then cosine to 0."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> List[List[int]]:
    """The epoch's global batches: a permutation seeded by (seed, epoch), last partial batch dropped.

    It depends on nothing else, so a resumed run and every process of a
    distributed run see the same order.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]


def _autocast(device: torch.device, precision: str):
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def predict_probs(model: NearlCLIP, dataset: LabeledImages, texts: torch.Tensor, device, precision: str,
                  batch_size: int = 64, desc: str = "predicting") -> np.ndarray:
    """Class probabilities (N, K) for ``dataset``; a non-finite one is a CLIError, never a silent label."""
    model.eval()
    probs = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    progress = Progress(len(dataset), desc)
    for images, _ in loader:
        with _autocast(device, precision):
            logits = model(images.to(device), texts)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        progress.update(len(images))
    progress.close()
    probs = torch.cat(probs).numpy()
    if not np.isfinite(probs).all():
        rows = np.flatnonzero(~np.isfinite(probs).all(axis=1))
        raise CLIError(f"the model gave non-finite probabilities for {len(rows)} of {len(probs)} images "
                       f"(first: item {rows[0]}); the adapter or the images hold NaN/inf values")
    return probs


def evaluate(model, dataset, texts, classes, device, precision, desc: str = "evaluating") -> Dict:
    probs = predict_probs(model, dataset, texts, device, precision, desc=desc)
    return classification_metrics(dataset.labels, probs, classes)


def run_key(args, config: NearlConfig, data: DataSplits, fingerprint: str, prompts: List[str],
            weights: str) -> Dict:
    """What a resumed run must share with the run that wrote the checkpoint: contents, not paths.

    Files (a model JSON, a weights file, the data) enter by their contents, so
    ``./d`` for ``d``, another working directory or a moved file resume the
    same run.
    """
    settings = ("shots", "seed", "epochs", "min_steps", "batch_size", "accum", "lr", "weight_decay", "warmup",
                "grad_clip", "precision", "max_steps")
    weights_file = bool(args.pretrained) and os.path.isfile(args.pretrained)
    return {
        "config": config.to_dict(), "classes": data.classes, "prompts": prompts, "data": fingerprint,
        "model": _file_identity(args.model), "pretrained": _file_identity(args.pretrained),
        # For a weights file, "weights" would only repeat its path; its contents are "pretrained".
        "weights": "a weights file" if weights_file else weights, **{k: getattr(args, k) for k in settings},
    }


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_checkpoint(path: str, key: Dict) -> Dict:
    """The checkpoint a ``--resume`` continues from, refused unless its run key equals ``key``."""
    if not os.path.isfile(path):
        raise CLIError(f"--resume: no checkpoint at {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["key"]
        for name in ("adapter", "optimizer", "scheduler", "scaler", "rng", "history", "epoch"):
            state[name]
    except Exception as err:  # torch.load raises many types for a damaged file
        # torch's text for a pickled object suggests weights_only=False, which would run code from the file.
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        if "weights_only" in str(err) or "weights only" in str(err).lower() or "pickle" in str(err).lower():
            reason = "it holds pickled Python objects other than tensors, which are never loaded"
        raise CLIError(f"--resume: checkpoint {path!r} is unreadable ({type(err).__name__}: {reason}); "
                       "start the run again with --overwrite") from err
    if saved != key:
        diff = "; ".join(f"{k}: checkpoint {_short(saved.get(k))} vs now {_short(v)}"
                         for k, v in key.items() if saved.get(k) != v)
        raise CLIError(f"--resume: this run differs from the checkpoint's in {diff}; resume with the same "
                       "settings and data, or start again with --overwrite")
    return state


def _check_finite(what: str, value: float, world: int, device, epoch: int, batch: int, args,
                  out: Optional[RunDir]) -> None:
    """Stop the run (every process of it) when ``value`` is NaN or inf; the last good checkpoint stays."""
    bad = not math.isfinite(value)
    if world > 1:
        flag = torch.tensor(float(bad), device=device)
        dist.all_reduce(flag)
        bad = flag.item() > 0
    if bad:
        raise CLIError(f"training diverged: the {what} is {value} at epoch {epoch}, batch {batch}; nothing since the "
                       f"last checkpoint was saved, and {_kept(args, out)}. Try a lower --lr, --precision fp32, or "
                       "check the data")


def default_out() -> str:
    """A new directory per run, so runs never share the default and none is refused for it."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    out, n = base, 1
    while os.path.exists(out):
        out, n = f"{base}-{n}", n + 1
    return out


def run(args, argv: Optional[List[str]] = None) -> int:
    """Train as ``args`` say; ``argv`` (the command line) goes into the "resume with" line after a Ctrl-C."""
    check_args(args)
    out_given = args.out is not None
    if not out_given:
        if args.resume:
            raise CLIError("--resume needs --out: the directory of the run to continue")
        args.out = default_out()
    inputs = {"--data": args.data, "--config": args.config, "--descriptions": args.descriptions,
              "--classes": args.classes, "--pretrained": args.pretrained, "--model": args.model}
    check_outputs("--out", args.out, [os.path.join(args.out, f) for f in RUN_FILES], inputs)
    device = pick_device(args.device)
    rank, world, device = _distributed(device)
    main_process = rank == 0
    out = RunDir(args.out, args.resume, args.overwrite) if main_process else None
    try:
        return _train(args, device, rank, world, out)
    except KeyboardInterrupt:
        raise CLIError(_interrupted(args, argv or [], out, out_given)) from None
    except torch.OutOfMemoryError as err:
        raise CLIError(f"out of memory on {device}: {one_line(str(err))[:200]}; lower --batch-size (--accum keeps "
                       f"the global batch), or try --precision bf16; {_kept(args, out)}") from None
    except (RuntimeError, OSError) as err:
        # A worker that died (killed for memory, no shared memory) or hit a file that vanished since the check.
        if "DataLoader worker" not in str(err).split("\n", 1)[0]:
            raise
        raise CLIError(f"a DataLoader worker failed: {one_line(str(err))}; lower --workers (0 reads the images in "
                       f"this process); {_kept(args, out)}") from None
    finally:
        if out is not None:
            out.close()


def _kept(args, out: Optional[RunDir]) -> str:
    """What a failed run leaves in --out, for the end of its error line."""
    if out is not None and out.replacing:
        return f"the run already in {args.out!r} is kept as it was"
    if os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
        return f"the last checkpoint in {args.out!r} is kept"
    return "no checkpoint was written yet"


def _interrupted(args, argv: List[str], out: Optional[RunDir], out_given: bool) -> str:
    """The Ctrl-C line: what is kept, and the command that continues the run when there is one to continue."""
    resumable = out is not None and not out.replacing and os.path.isfile(os.path.join(args.out, "checkpoint.pt"))
    if not resumable:
        return f"interrupted; {_kept(args, out)}"
    again = [a for a in argv if not (len(a) >= 4 and "--overwrite".startswith(a))]
    again += [] if args.resume else ["--resume"]
    again += [] if out_given else ["--out", args.out]
    return (f"interrupted; the last checkpoint in {args.out!r} is kept, resume with: "
            f"{shlex.join(['python', '-m', 'nearl_model.train', *again])}")


def _train(args, device, rank: int, world: int, out: Optional[RunDir]) -> int:
    start = time.time()
    main_process = out is not None
    config = resolve_config(args)
    model = build_model(args, config)
    data = load_dataset(args.data, model.image_size[0], args.classes, seed=args.seed)
    train_set = data.splits["train"]
    if args.shots:
        train_set = few_shot(train_set, args.shots, args.seed)
    classes = data.classes
    prompts = make_prompts(args, classes)
    try:
        texts = tokenize_prompts(prompts, args.model, model.text_tower.context_length, args.pretrained).to(device)
    except (ValueError, RuntimeError) as err:
        raise CLIError(f"cannot tokenize the prompts for {args.model}: {err}") from err
    model.to(device)
    # On CUDA: every kernel a step launches is built now, so a stack it does not build on
    # costs one line before the first step, not a traceback after it.
    model.build_kernels(texts, AUTOCAST_DTYPES.get(args.precision))

    n_train = len(train_set)
    batch = min(args.batch_size, n_train)
    if batch % world:
        raise CLIError(f"the global batch {batch} must divide evenly over {world} processes")
    batches_per_epoch = len(epoch_batches(n_train, batch, args.seed, 0))
    if args.max_steps:
        batches_per_epoch = min(batches_per_epoch, args.max_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / args.accum)
    epochs = args.epochs or max(DEFAULT_EPOCHS, math.ceil(args.min_steps / steps_per_epoch))
    total_steps = steps_per_epoch * epochs
    # Validate and checkpoint about 20 times a run, not after each of hundreds of one-step epochs.
    save_every = max(1, epochs // DEFAULT_EPOCHS)

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, max(1, round(args.warmup * total_steps)))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    fingerprint = data.fingerprint()
    weights = getattr(model.clip, "nearl_weights", args.pretrained or "random init")
    key = run_key(args, model.config, data, fingerprint, prompts, weights)
    run_info = {**run_record(args, data, fingerprint, prompts), "weights": weights}
    history: List[Dict] = []
    first_epoch = 0
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        state = load_checkpoint(ckpt_path, key)
        model.adapters.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        history, first_epoch = state["history"], state["epoch"]

    if args.compile:
        # Regional: each tower's block and the interaction layer compile once for all layers.
        model.compile_regions()
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = model.num_trainable_parameters()
    if main_process:
        where = "Triton kernels" if (args.fused and device.type == "cuda") else (
            "custom ops, reference maths on CPU" if args.fused else "reference maths")
        print(f"nearl: {data.description}")
        print(f"nearl: classes {classes}; {n_train} train / {len(data.splits['val'])} val / "
              f"{len(data.splits['test'])} test images")
        print(f"nearl: backbone {args.model} ({getattr(model.clip, 'nearl_weights', args.pretrained or 'random init')}), mode {model.config.mode}, "
              f"{n_params:,} trainable parameters, adapters via {where}, {device}, {args.precision}, "
              f"{world} process(es)")
        if args.batch_size > n_train:
            print(f"nearl: note: --batch-size {args.batch_size} is more than the {n_train} training images; "
                  f"batches hold {batch}")
        if n_train % batch:
            print(f"nearl: note: each epoch leaves out {n_train % batch} image(s) (batches are whole; the shuffled "
                  "order changes every epoch, so every image is used)")
        if args.compile:
            print("nearl: torch.compile: the first batch compiles the model's repeated regions (tens of seconds "
                  "on a CPU)", flush=True)
        if not args.epochs and epochs > DEFAULT_EPOCHS:
            print(f"nearl: note: {steps_per_epoch} optimiser step(s) an epoch, so {epochs} epochs to reach "
                  f"--min-steps {args.min_steps} (validation and checkpoint every {save_every})")
        if first_epoch:
            print(f"nearl: resumed after epoch {first_epoch} from {ckpt_path}")

    losses, seen, t0 = [], 0, time.time()
    for epoch in range(first_epoch, epochs):
        model.train()
        batches = epoch_batches(n_train, batch, args.seed, epoch)[:batches_per_epoch]
        local = [b[rank::world] for b in batches]
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=local, num_workers=args.workers)
        progress = Progress(len(local), f"epoch {epoch + 1}/{epochs}", enabled=main_process)
        optimizer.zero_grad(set_to_none=True)
        for i, (images, labels) in enumerate(loader):
            images, labels = images.to(device), labels.to(device)
            with _autocast(device, args.precision):
                loss, _ = net(images, texts, labels)
            value = loss.item()
            _check_finite("training loss", value, world, device, epoch + 1, i + 1, args, out)
            scaler.scale(loss / args.accum).backward()
            if (i + 1) % args.accum == 0 or i + 1 == len(local):
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
                if not scaler.is_enabled():
                    # fp16's scaler skips steps with inf gradients by design; elsewhere one is divergence.
                    _check_finite("gradient norm", float(norm), world, device, epoch + 1, i + 1, args, out)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            seen += len(images) * world
            progress.update(loss=f"{np.mean(losses[-10:]):.3f}", img_s=f"{seen / (time.time() - t0):.1f}")
        progress.close()
        if (epoch + 1) % save_every and epoch + 1 != epochs:
            continue
        train_loss = float(np.mean(losses))
        if world > 1:
            t = torch.tensor(train_loss, device=device)
            dist.all_reduce(t)
            train_loss = t.item() / world
        train_seconds = time.time() - t0

        if main_process:
            bad = [k for k, v in model.adapter_state_dict().items() if not torch.isfinite(v).all()]
            if bad:
                raise CLIError(f"training diverged: adapter tensors {bad[:3]} hold NaN/inf after epoch {epoch + 1}; "
                               f"nothing since the last checkpoint was saved, and {_kept(args, out)}. Try a lower "
                               "--lr or --precision fp32")
            val = evaluate(model, data.splits["val"], texts, classes, device, args.precision, "validating")
            record = {
                "epoch": epoch + 1, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                "images_per_second": seen / train_seconds, "seconds": train_seconds,
                "val": {k: val[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")},
            }
            history.append(record)
            print(f"epoch {epoch + 1:>3}/{epochs}  loss {train_loss:.4f}  val {format_scores(val)}  "
                  f"{seen / train_seconds:.1f} img/s  {train_seconds:.1f}s", flush=True)
            state = {"key": key, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "history": history,
                     "epoch": epoch + 1}
            save_checkpoint(out.write_dir, model, state, run_info)
            # With --overwrite, the new run has something of its own to keep only now: it replaces the old one.
            out.commit()
        if world > 1:
            dist.barrier()
        losses, seen, t0 = [], 0, time.time()

    if main_process:
        finish(args, model, data, texts, classes, device, history, n_params, epochs, time.time() - start)
    return 0


def run_record(args, data: DataSplits, fingerprint: str, prompts: List[str]) -> Dict:
    """What evaluate and predict need to rebuild this run: backbone, data and its split, classes, prompts."""
    return {"model": resolved(args.model), "model_file": _file_identity(args.model),
            "pretrained": resolved(args.pretrained), "pretrained_file": _file_identity(args.pretrained),
            "seed": args.seed, "classes": data.classes, "prompts": prompts,
            "data": args.data if is_named_source(args.data) or not args.data else os.path.realpath(args.data),
            "data_fingerprint": fingerprint, "shots": args.shots, "precision": args.precision}


@contextlib.contextmanager
def _writing(out: str):
    """Turn a failed write (disk full, permissions) into a CLIError that says what was kept."""
    try:
        yield
    except OSError as err:
        raise CLIError(f"cannot write to {out!r}: {err}; files written before this point are kept intact "
                       "(each is replaced atomically)") from err


def save_checkpoint(out: str, model: NearlCLIP, state: Dict, run: Dict) -> None:
    """checkpoint.pt (all a resume needs) and adapter.safetensors, each written atomically."""
    state = {**state, "adapter": model.adapter_state_dict()}
    # Serialised in memory first: torch.save straight to a file reports a full disk as a RuntimeError.
    buf = io.BytesIO()
    torch.save(state, buf)
    with _writing(out):
        atomic_write_bytes(os.path.join(out, "checkpoint.pt"), buf.getvalue())
        model.save_adapter(os.path.join(out, "adapter.safetensors"), run=run)
        atomic_write_text(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in state["history"]))


def finish(args, model, data, texts, classes, device, history, n_params, epochs, seconds) -> None:
    test = evaluate(model, data.splits["test"], texts, classes, device, args.precision, "testing")
    summary = {
        "accuracy": test["accuracy"], "balanced_accuracy": test["balanced_accuracy"], "macro_f1": test["macro_f1"],
        "auroc": test["auroc"], "num_trainable_parameters": n_params, "seconds": seconds,
        "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"], "classes": classes,
        "data": data.description, "model": args.model, "pretrained": args.pretrained, "mode": model.config.mode,
        "fused": args.fused, "device": str(device), "precision": args.precision, "epochs": epochs,
    }
    with _writing(args.out):
        if history:
            plot_curves(history, os.path.join(args.out, "curves.png"))
        plot_confusion(test["confusion_matrix"], classes, os.path.join(args.out, "confusion.png"))
        # The summary last: its presence marks a finished run.
        atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    print(f"test: {format_scores(test)}")
    print(format_per_class(test))
    print(f"wrote {args.out}/: adapter.safetensors, checkpoint.pt, metrics.jsonl, summary.json, curves.png, "
          f"confusion.png ({seconds:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
