"""What the train, evaluate and predict CLIs share: the user-facing error, the device, loading a trained run."""

import argparse

import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, except where there is none to show (None)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class CLIError(Exception):
    """A user-facing failure: printed as ``error: ...`` with exit code 2."""


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


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """The flags evaluate and predict share; the rest of a run's settings come from its record."""
    p.add_argument("--adapter", required=True, help="adapter.safetensors written by nearl_model.train")
    p.add_argument("--pretrained", help="backbone weights, if not where the training run found them")
    p.add_argument("--model", help="the backbone's model JSON, if not where the training run found it")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="route the adapters through the nearl_kernels ops (Triton on CUDA)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="autocast precision (default: the training run's)")


def load_run(args):
    """(model on its device, run record, prompt tokens on the device, device, precision) for ``args``."""
    from .adapter_io import load_trained

    device = pick_device(args.device)
    try:
        model, run, texts = load_trained(args.adapter, args.pretrained, fused=args.fused, model=args.model)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as err:
        raise CLIError(str(err)) from err
    precision = args.precision or run.get("precision", "fp32")
    return model.to(device), run, texts.to(device), device, precision
