"""Train and evaluate NEARL-CLIP adapters: ``python -m nearl_model.train [--fused]``.

With no ``--data`` it trains on the embedded synthetic demo (generated X-ray-like
images, a small random-init CLIP), which runs in about two minutes on 2 CPU
cores and shows learning. With ``--data`` it takes an ImageFolder tree, a CSV,
a MedMNIST .npz or a DICOM folder. ``torchrun --nproc_per_node N -m
nearl_model.train ...`` trains with DistributedDataParallel.

Exit codes: 0 done, 2 bad input (data, model, paths), with the reason on stderr.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ._io import atomic_write, atomic_write_text
from .backbones import create_clip
from .clip import NearlCLIP
from .config import NearlConfig
from .data import DataError, LabeledImages, few_shot, load_dataset
from .metrics import classification_metrics, format_per_class, format_scores, plot_confusion, plot_curves
from .prompts import class_prompts, tokenize_prompts

DEMO_TEMPLATE = "a chest X-ray showing {}."


class CLIError(Exception):
    """A user-facing failure: printed as ``error: ...`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_model.train", description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--data", help="ImageFolder dir, CSV (path,label[,split]), MedMNIST .npz or DICOM dir; "
                                  "omit for the synthetic demo")
    d.add_argument("--classes", help="class names: JSON list, JSON {label: name} or CSV label,name")
    d.add_argument("--prompt", default=None, help="prompt template with one {}, e.g. 'a chest X-ray showing {}.'")
    d.add_argument("--descriptions", help="JSON {class: description} used in the prompt instead of the name")
    d.add_argument("--shots", type=int, default=None, help="few-shot: K training images per class")
    d.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="nearl-tiny", help="open_clip name, hf-hub:org/repo, JSON config or nearl-tiny")
    m.add_argument("--pretrained", default=None, help="open_clip tag or local checkpoint file")
    m.add_argument("--mode", choices=("paired", "shared"), default="paired")
    m.add_argument("--config", help="JSON NearlConfig (adapter width, heads, queries...); --mode overrides its mode")
    m.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="route the adapters through the nearl_kernels ops (Triton on CUDA)")
    m.add_argument("--compile", action="store_true", help="torch.compile the model")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=32, help="global batch (split across processes)")
    t.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of all steps")
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    t.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many batches (smoke runs)")
    t.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs/nearl", help="output directory")
    o.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (CLIError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"bad --device {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asked for CUDA but none is available")
    return device


def _distributed(device: torch.device):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


def _check_out_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CLIError(f"cannot write to output directory {out!r}: {err}") from err


def build_model(args) -> NearlCLIP:
    """The backbone and fresh adapters; seeded, so a random-init backbone is reproducible."""
    config = NearlConfig()
    if args.config:
        try:
            with open(args.config) as f:
                config = NearlConfig.from_json(f.read())
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot read --config {args.config!r}: {err}") from err
    config.mode = args.mode
    torch.manual_seed(args.seed)
    try:
        clip = create_clip(args.model, args.pretrained)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise CLIError(str(err)) from err
    try:
        return NearlCLIP(clip, config, fused=args.fused)
    except TypeError as err:
        raise CLIError(str(err)) from err


def make_prompts(args, classes: List[str]) -> List[str]:
    descriptions = None
    if args.descriptions:
        try:
            with open(args.descriptions) as f:
                descriptions = json.load(f)
        except (OSError, ValueError) as err:
            raise CLIError(f"cannot read --descriptions {args.descriptions!r}: {err}") from err
    template = args.prompt or (DEMO_TEMPLATE if args.data is None else "a medical image showing {}.")
    try:
        return class_prompts(classes, template, descriptions)
    except ValueError as err:
        raise CLIError(str(err)) from err


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
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def predict_probs(model: NearlCLIP, dataset: LabeledImages, texts: torch.Tensor, device, precision: str,
                  batch_size: int = 64) -> np.ndarray:
    model.eval()
    probs = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, _ in loader:
        with _autocast(device, precision):
            logits = model(images.to(device), texts)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(probs).numpy()


def evaluate(model, dataset, texts, classes, device, precision) -> Dict:
    probs = predict_probs(model, dataset, texts, device, precision)
    return classification_metrics(dataset.labels, probs, classes)


def _checkpoint_key(args) -> Dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    keys = ("data", "classes", "prompt", "shots", "seed", "model", "pretrained", "mode", "config",
            "epochs", "batch_size", "accum", "lr", "weight_decay", "warmup", "max_steps")
    return {k: getattr(args, k) for k in keys}


def run(args) -> int:
    start = time.time()
    if args.epochs < 1 or args.batch_size < 1 or args.accum < 1:
        raise CLIError("--epochs, --batch-size and --accum must be >= 1")
    device = _device(args.device)
    rank, world, device = _distributed(device)
    main_process = rank == 0
    if main_process:
        _check_out_dir(args.out)

    model = build_model(args)
    data = load_dataset(args.data, model.image_size[0], args.classes, seed=args.seed)
    train_set = data.splits["train"]
    if args.shots:
        train_set = few_shot(train_set, args.shots, args.seed)
    classes = data.classes
    prompts = make_prompts(args, classes)
    texts = tokenize_prompts(prompts, args.model, model.text_tower.context_length).to(device)
    model.to(device)

    n_train = len(train_set)
    batch = min(args.batch_size, n_train)
    if batch % world:
        raise CLIError(f"the global batch {batch} must divide evenly over {world} processes")
    batches_per_epoch = len(epoch_batches(n_train, batch, args.seed, 0))
    if args.max_steps:
        batches_per_epoch = min(batches_per_epoch, args.max_steps)
    steps_per_epoch = math.ceil(batches_per_epoch / args.accum)
    total_steps = steps_per_epoch * args.epochs

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

    history: List[Dict] = []
    first_epoch = 0
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise CLIError(f"--resume: no checkpoint at {ckpt_path!r}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state["key"] != _checkpoint_key(args):
            diff = {k: (state["key"].get(k), v) for k, v in _checkpoint_key(args).items() if state["key"].get(k) != v}
            raise CLIError(f"--resume: this run's settings differ from the checkpoint's: {diff}")
        model.adapters.load_state_dict(state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        history, first_epoch = state["history"], state["epoch"]

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)

    n_params = model.num_trainable_parameters()
    if main_process:
        where = "Triton kernels" if (args.fused and device.type == "cuda") else (
            "custom ops, reference maths on CPU" if args.fused else "reference maths")
        print(f"nearl: {data.description}")
        print(f"nearl: classes {classes}; {n_train} train / {len(data.splits['val'])} val / "
              f"{len(data.splits['test'])} test images")
        print(f"nearl: backbone {args.model} ({args.pretrained or 'random init'}), mode {model.config.mode}, "
              f"{n_params:,} trainable parameters, adapters via {where}, {device}, {args.precision}, "
              f"{world} process(es)")
        if first_epoch:
            print(f"nearl: resumed after epoch {first_epoch} from {ckpt_path}")

    for epoch in range(first_epoch, args.epochs):
        model.train()
        t0 = time.time()
        batches = epoch_batches(n_train, batch, args.seed, epoch)[:batches_per_epoch]
        local = [b[rank::world] for b in batches]
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=local, num_workers=args.workers)
        losses, seen = [], 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=None if main_process else True,
                   leave=False, dynamic_ncols=True)
        optimizer.zero_grad(set_to_none=True)
        for i, (images, labels) in enumerate(bar):
            images, labels = images.to(device), labels.to(device)
            with _autocast(device, args.precision):
                loss, _ = net(images, texts, labels)
            scaler.scale(loss / args.accum).backward()
            if (i + 1) % args.accum == 0 or i + 1 == len(local):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            seen += len(images) * world
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", img_s=f"{seen / (time.time() - t0):.1f}")
        train_loss = float(np.mean(losses))
        if world > 1:
            t = torch.tensor(train_loss, device=device)
            dist.all_reduce(t)
            train_loss = t.item() / world
        train_seconds = time.time() - t0

        if main_process:
            val = evaluate(model, data.splits["val"], texts, classes, device, args.precision)
            record = {
                "epoch": epoch + 1, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                "images_per_second": seen / train_seconds, "seconds": train_seconds,
                "val": {k: val[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")},
            }
            history.append(record)
            print(f"epoch {epoch + 1:>3}/{args.epochs}  loss {train_loss:.4f}  val {format_scores(val)}  "
                  f"{seen / train_seconds:.1f} img/s  {train_seconds:.1f}s", flush=True)
            save_checkpoint(args, model, optimizer, scheduler, scaler, history, epoch + 1, classes, prompts)
        if world > 1:
            dist.barrier()

    if main_process:
        finish(args, model, data, texts, classes, device, history, n_params, time.time() - start)
    return 0


def _run_metadata(args, classes, prompts) -> Dict:
    return {"model": args.model, "pretrained": args.pretrained, "seed": args.seed, "classes": classes,
            "prompts": prompts}


def save_checkpoint(args, model, optimizer, scheduler, scaler, history, epoch, classes, prompts) -> None:
    """checkpoint.pt (all a resume needs) and adapter.safetensors, each written atomically."""
    state = {
        "key": _checkpoint_key(args), "adapter": model.adapter_state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
        "history": history, "epoch": epoch,
    }
    atomic_write(os.path.join(args.out, "checkpoint.pt"), lambda tmp: torch.save(state, tmp))
    model.save_adapter(os.path.join(args.out, "adapter.safetensors"), run=_run_metadata(args, classes, prompts))
    atomic_write_text(os.path.join(args.out, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))


def finish(args, model, data, texts, classes, device, history, n_params, seconds) -> None:
    test = evaluate(model, data.splits["test"], texts, classes, device, args.precision)
    summary = {
        "accuracy": test["accuracy"], "balanced_accuracy": test["balanced_accuracy"], "macro_f1": test["macro_f1"],
        "auroc": test["auroc"], "num_trainable_parameters": n_params, "seconds": seconds,
        "per_class": test["per_class"], "confusion_matrix": test["confusion_matrix"], "classes": classes,
        "data": data.description, "model": args.model, "pretrained": args.pretrained, "mode": model.config.mode,
        "fused": args.fused, "device": str(device), "precision": args.precision, "epochs": args.epochs,
    }
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2) + "\n")
    if history:
        plot_curves(history, os.path.join(args.out, "curves.png"))
    plot_confusion(test["confusion_matrix"], classes, os.path.join(args.out, "confusion.png"))
    print(f"test: {format_scores(test)}")
    print(format_per_class(test))
    print(f"wrote {args.out}/: adapter.safetensors, checkpoint.pt, metrics.jsonl, summary.json, curves.png, "
          f"confusion.png ({seconds:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
