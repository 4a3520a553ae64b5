"""Kernel launches of one training step: fused NearlCLIP against its frozen floor, per mode.

A launch is an aten op that runs a kernel or a Triton kernel launch
(:class:`nearl_kernels.audit.LaunchCounter`). The count follows the code path,
not the hardware: on CPU the Triton kernels run under the interpreter
(TRITON_INTERPRET=1, set here before triton is imported) and are counted as
they would launch on a GPU. The step is forward, backward and AdamW
(``foreach``, CUDA's default) under bf16 autocast, at the smoke shapes; the
count is of the second step, once AdamW's state exists.

    python benchmarks/launch_counts.py --out benchmarks/results/launch_counts.json
"""

import argparse
import contextlib
import json
import os
import sys
from typing import Dict, Optional

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from nearl_kernels._launch_hook import intercept_launches  # noqa: E402
from nearl_kernels.audit import LaunchCounter  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_steps  # noqa: E402

DTYPE = torch.bfloat16
MODES_ORDER = model_steps.MODES


def count(step) -> Dict:
    """Launches of ``step()``: ``{"total", "aten": {op: n}, "triton": {kernel: n}, "in_launchers": {op: n}}``."""
    with LaunchCounter() as counter:
        step()
    return {"total": counter.total, "aten": dict(sorted(counter.aten.items())),
            "triton": dict(sorted(counter.triton.items())), "in_launchers": dict(sorted(counter.in_launchers.items()))}


def step_counts(mode: str, model_name: str = model_steps.SMOKE["model"], B: int = model_steps.SMOKE["B"],
                K: int = model_steps.SMOKE["K"]) -> Dict[str, Dict]:
    """``{"nearl": ..., "floor": ...}`` launch counts of one fused training step in ``mode`` on CPU."""
    device = torch.device("cpu")
    model = model_steps.make_nearl(model_name, mode, fused=True, device=device)
    batch = model_steps.make_batch(model, B, K, device)
    steps = model_steps.training_steps(model, batch, DTYPE)
    out = {}
    for name in ("nearl", "floor"):
        steps[name]()  # AdamW's state, and any first-call caches
        out[name] = count(steps[name])
    return out


@contextlib.contextmanager
def kernels_on_meta():
    """Route the ops' meta tensors to their Triton launchers, as CUDA tensors are routed.

    With :class:`LaunchCounter` ``(run_kernels=False)`` this counts what a GPU
    step launches at GPU shapes without a GPU: the meta device carries shapes
    only, and the kernels are counted, not run.
    """
    import nearl_kernels._dispatch as dispatch

    original = dispatch.use_triton
    routed = lambda t: t.device.type == "meta" or original(t)  # noqa: E731
    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("nearl_kernels") and getattr(m, "use_triton", None) is original]
    for m in holders:
        m.use_triton = routed
    try:
        yield
    finally:
        for m in holders:
            m.use_triton = original


def meta_step_counts(mode: str, model_name: str, B: int, K: int) -> Dict[str, Dict]:
    """``{"nearl", "floor"}`` launches of a fused step at (model, B, K) on the meta device, the kernels
    counted, not run: forward and backward, without autocast (the meta device has none) and without
    the optimiser (fused AdamW refuses meta tensors; on CPU it counts 2 launches)."""
    cpu, meta = torch.device("cpu"), torch.device("meta")
    model = model_steps.make_nearl(model_name, mode, fused=True, device=cpu).to(meta)
    texts = model_steps.make_batch(model, 1, K, cpu).texts
    batch = model_steps.Batch(torch.empty(B, model.image_tower.in_channels, *model.image_size, device=meta),
                              texts.to(meta), torch.zeros(B, dtype=torch.long, device=meta))
    steps = model_steps.training_steps(model, batch, None, baselines=False)
    out = {}
    with kernels_on_meta():
        for name in ("nearl", "floor"):
            steps[name]()
            with LaunchCounter(run_kernels=False) as counter:
                steps[name]()
            # The torch ops' FLOPs; the Triton kernels' own (r-wide, well under 1% of a block's) are not counted.
            with intercept_launches(lambda launch: None), FlopCounterMode(display=False) as flops:
                steps[name]()
            out[name] = {"total": counter.total, "triton": sum(counter.triton.values()),
                         "torch_flops": flops.get_total_flops()}
    return out


def glue(counts: Dict[str, Dict]) -> Dict[str, int]:
    """Per aten op, what the NEARL step launches beyond its floor (ops it launches fewer of are left out)."""
    nearl, floor = counts["nearl"]["aten"], counts["floor"]["aten"]
    extra = {op: n - floor.get(op, 0) for op, n in nearl.items() if n > floor.get(op, 0)}
    return dict(sorted(extra.items(), key=lambda kv: -kv[1]))


def model_glue(counts: Dict[str, Dict]) -> int:
    """Launches the NEARL step adds to its floor outside the kernels and their launchers: the model's own glue."""
    nearl = counts["nearl"]
    return (nearl["total"] - sum(nearl["triton"].values()) - sum(nearl["in_launchers"].values())
            - counts["floor"]["total"])


def markdown(before: Dict, after: Dict) -> str:
    """Before/after launch counts per mode, and the GPU-shape counts of ``after``."""
    lines = ["| mode | | NEARL step | Triton kernels | torch ops in the kernels' launchers | model glue | "
             "frozen floor | NEARL / floor |", "|---|---|---|---|---|---|---|---|"]
    for mode in MODES_ORDER:
        for label, result in (("before", before), ("after", after)):
            c = result["modes"][mode]
            n, f = c["nearl"]["total"], c["floor"]["total"]
            lines.append(f"| {mode} | {label} | {n} | {sum(c['nearl']['triton'].values())} | "
                         f"{sum(c['nearl']['in_launchers'].values())} | {model_glue(c)} | {f} | {n / f:.2f}x |")
    g = after["gpu_shape"]
    lines += ["", f"At the issue's GPU shape ({g['model']}, B={g['B']}, K={g['K']}; meta device, forward and "
              "backward, no autocast, no optimiser; FLOPs of the torch ops, the kernels' own left out):", "",
              "| mode | | NEARL step | Triton kernels | frozen floor | NEARL / floor | NEARL TFLOP | floor TFLOP |",
              "|---|---|---|---|---|---|---|---|"]
    for mode in MODES_ORDER:
        for label, result in (("before", before), ("after", after)):
            c = result["gpu_shape"]["modes"][mode]
            flops = [f"{c[k]['torch_flops'] / 1e12:.2f}" if "torch_flops" in c[k] else "-" for k in ("nearl", "floor")]
            lines.append(f"| {mode} | {label} | {c['nearl']['total']} | {c['nearl']['triton']} | "
                         f"{c['floor']['total']} | {c['nearl']['total'] / c['floor']['total']:.2f}x | "
                         f"{flops[0]} | {flops[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write the counts to this JSON file")
    p.add_argument("--label", default="", help="a note stored with the counts (e.g. the commit)")
    p.add_argument("--gpu-shape", action="store_true",
                   help="also count a fused step at the issue's GPU shape (ViT-B/16, B64, K10) on the meta device")
    args = p.parse_args(argv)
    result = {"label": args.label, "shape": dict(model_steps.SMOKE), "autocast": str(DTYPE).split(".")[-1],
              "modes": {}}
    for mode in model_steps.MODES:
        counts = step_counts(mode)
        counts["glue"] = glue(counts)
        result["modes"][mode] = counts
        n, f = counts["nearl"]["total"], counts["floor"]["total"]
        print(f"{mode}: NEARL step {n} launches ({sum(counts['nearl']['triton'].values())} Triton, "
              f"{sum(counts['nearl']['in_launchers'].values())} torch ops in the kernels' launchers), "
              f"frozen floor {f}, NEARL adds {n - f}")
        print("   beyond the floor: " + ", ".join(f"{op} {k}" for op, k in list(counts["glue"].items())[:12]))
    result["gpu_shape"] = {"model": "ViT-B-16", "B": 64, "K": 10, "autocast": None, "modes": {}}
    if args.gpu_shape:
        g = result["gpu_shape"]
        for mode in model_steps.MODES:
            g["modes"][mode] = meta_step_counts(mode, g["model"], g["B"], g["K"])
            c = g["modes"][mode]
            print(f"{mode} at ViT-B-16 B64 K10 (meta device, fp32): NEARL {c['nearl']['total']} "
                  f"({c['nearl']['triton']} Triton), floor {c['floor']['total']}")
    if args.out:
        from nearl_model._io import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
