"""What the train, evaluate and predict CLIs share: the user-facing error, the device, loading a trained run."""

import argparse
import contextlib
import os
import sys
from typing import Dict, Optional, Sequence

import torch

# --precision -> the autocast dtype (fp32: no autocast), for every CLI and the comparison methods.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, except where there is none to show (None)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class CLIError(Exception):
    """A user-facing failure: printed as ``error: ...`` with exit code 2."""


WORKER_TRACEBACK = "Traceback (most recent call last):"


def one_line(message: str) -> str:
    """``message`` as one line; an error re-raised from a DataLoader worker is reduced to its own message.

    torch re-raises a worker's exception with the worker's whole traceback in
    its text; the user needs the last exception's message, not the frames.
    """
    lines = message.splitlines()
    if len(lines) > 1 and "DataLoader worker" in lines[0] and any(WORKER_TRACEBACK in line for line in lines):
        start = max(i for i, line in enumerate(lines) if WORKER_TRACEBACK in line) + 1
        rest = [line for line in lines[start:] if line.strip()]
        # The frames are indented; the first line that is not is "module.Type: message".
        first = next((i for i, line in enumerate(rest) if not line.startswith(" ")), len(rest) - 1)
        head = rest[first].split(": ", 1)[-1] if rest else lines[0]
        lines = [head, *rest[first + 1:]]
    return "; ".join(line.strip() for line in lines if line.strip())


def fail(err) -> int:
    """Print ``err`` as the one line ``error: ...`` on stderr; return the exit code 2."""
    print(f"error: {one_line(str(err))}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def writing(where: str):
    """Turn a failed write (a full disk, permissions) under ``where`` into a CLIError; files are replaced
    atomically, so every file written before stays whole."""
    try:
        yield
    except OSError as err:
        raise CLIError(f"cannot write to {where!r}: {err}; files written before this point are kept intact "
                       "(each is replaced atomically)") from err


def check_outputs(out_flag: str, out: str, written: Sequence[str], inputs: Dict[str, Optional[str]],
                  out_is_dir: bool = True) -> None:
    """Refuse an output that would write over an input, or into a data folder the command reads.

    Args:
        out_flag: the flag that names the output (for the message).
        out: its value as typed.
        written: every path the command may write.
        inputs: flag -> path read (values that are not existing paths, such as model names, are skipped).
        out_is_dir: ``out`` is a directory the command writes files into.
    """
    targets = [os.path.realpath(p) for p in written]
    out_real = os.path.realpath(out)
    for flag, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        if any(t == real or (os.path.exists(t) and os.path.samefile(t, real)) for t in targets):
            raise CLIError(f"{out_flag} {out!r} would write over {flag} {path!r}, an input of this command; "
                           f"choose another {out_flag}")
        if out_is_dir and os.path.isdir(real) and (out_real == real or out_real.startswith(real + os.sep)):
            raise CLIError(f"{out_flag} {out!r} is inside {flag} {path!r}: the files written there would become "
                           f"part of the data; choose an {out_flag} outside it")


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else must name a device this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"bad --device {name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} asked for CUDA but none is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        # A device torch knows by name but this build or machine lacks (mps on Linux, xpu) fails here, not later.
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise CLIError(f"--device {name} is not usable here: {(str(err).splitlines() or [''])[0]}") from err
    return device


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    """Where a run's backbone is, when not where the training run found it (evaluate, predict, export)."""
    p.add_argument("--pretrained", help="backbone weights, if not where the training run found them")
    p.add_argument("--model", help="the backbone's model JSON, if not where the training run found it")


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """The flags evaluate and predict share; the rest of a run's settings come from its record."""
    p.add_argument("--adapter", required=True, help="adapter.safetensors written by nearl_model.train")
    add_backbone_args(p)
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="route the adapters through the nearl_kernels ops (Triton on CUDA)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="autocast precision (default: the training run's)")


def load_run(args):
    """(model on its device, run record, prompt tokens on the device, device, precision) for ``args``."""
    from .loading import load_trained

    device = pick_device(args.device)
    try:
        model, run, texts = load_trained(args.adapter, args.pretrained, fused=args.fused, model=args.model)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as err:
        raise CLIError(str(err)) from err
    precision = args.precision or run.get("precision", "fp32")
    model, texts = model.to(device), texts.to(device)
    # On CUDA: the kernels scoring launches are built now (one KernelBuildError line if they cannot be).
    model.build_kernels(texts, AUTOCAST_DTYPES.get(precision), backward=False)
    return model, run, texts, device, precision
