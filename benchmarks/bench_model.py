"""The rows users compare, per interaction mode, as ratios from one run.

For each mode (paired, shared) one run times, interleaved round by round so
load from elsewhere falls on every row alike:

- ``nearl``: the NearlCLIP training step (fused, AdamW);
- ``floor``: its own frozen floor (same blocks, no adapters, gradients only
  as far as NEARL's reach; paired B*K text sequences, shared K);
- ``finetune``: a full fine-tune step of the same CLIP;
- ``lora``: the CLIP-LoRA step of ``nearl_model.methods.lora``;
- ``nearl_infer`` / ``clip_infer``: NearlCLIP's scores against plain CLIP
  zero-shot (image + K texts), as images per second;
- with ``--compile``, ``nearl_compiled``: the NEARL step with regional
  compilation (``NearlCLIP.compile_regions``), and its compile time.

Each row's time is its median over the rounds; the ratios divide medians of
the same run. Peak memory is CUDA's allocator peak for one call (n/a on CPU).
The steps themselves live in ``model_steps.py``.

    python benchmarks/bench_model.py --size smoke --json OUT.json --md OUT.md
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_steps  # noqa: E402

# Training batch B and inference batch B_infer, K classes: the H200 shapes on a GPU.
SIZES = {
    "gpu": dict(model="ViT-B-16", B=64, B_infer=256, K=10, rounds=5, dtype="bf16"),
    "cpu": dict(model="ViT-B-16", B=4, B_infer=8, K=4, rounds=3, dtype=None),
    "smoke": dict(model="nearl-tiny", B=2, B_infer=4, K=2, rounds=1, dtype=None),
}
TRAIN_ROWS = ("nearl", "floor", "finetune", "lora")
DTYPES = {"bf16": torch.bfloat16, None: None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable, device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak(fn: Callable, device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated() - base


def interleaved(fns: Dict[str, Callable], rounds: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call of each function, ``rounds`` times, the order rotating each round."""
    names = list(fns)
    times = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(_timed(fns[n], device))
    return times


def mode_rows(mode: str, size: dict, device: torch.device, compile_regions: bool = False) -> Dict:
    """Times, peak memory and ratios of every row for one mode (see the module docstring)."""
    dtype = DTYPES[size["dtype"]]
    model = model_steps.make_nearl(size["model"], mode, fused=True, device=device)
    batch = model_steps.make_batch(model, size["B"], size["K"], device)
    fns = model_steps.training_steps(model, batch, dtype)
    infer_batch = model_steps.make_batch(model, size["B_infer"], size["K"], device)
    infer = model_steps.inference_steps(model, infer_batch, dtype)
    fns.update({"nearl_infer": infer["nearl"], "clip_infer": infer["clip"]})
    rows: Dict[str, Dict] = {}
    if compile_regions:
        compiled = make_nearl_compiled(size, mode, device)
        cbatch = model_steps.make_batch(compiled, size["B"], size["K"], device)
        step = model_steps.training_steps(compiled, cbatch, dtype, baselines=False)["nearl"]
        first = _timed(step, device)
        fns["nearl_compiled"] = step
        rows["nearl_compiled"] = {"first_call_s": first}
    for fn in fns.values():  # warm-up: kernels built, caches filled, AdamW state made
        fn()
    times = interleaved(fns, size["rounds"], device)
    for name, ts in times.items():
        rows.setdefault(name, {}).update(median_s=statistics.median(ts), min_s=min(ts), rounds=len(ts),
                                         peak_bytes=_peak(fns[name], device))
    med = {n: r["median_s"] for n, r in rows.items()}
    ratios = {
        "nearl_over_floor": med["nearl"] / med["floor"],
        "nearl_over_finetune": med["nearl"] / med["finetune"],
        "lora_over_floor": med["lora"] / med["floor"],
        "nearl_infer_over_clip": med["nearl_infer"] / med["clip_infer"],
    }
    for name in ("nearl_infer", "clip_infer"):
        rows[name]["images_per_s"] = size["B_infer"] / med[name]
    for name in TRAIN_ROWS:
        rows[name]["images_per_s"] = size["B"] / med[name]
    if compile_regions:
        c = rows["nearl_compiled"]
        # The first call compiles and runs once: its time less a compiled step's is the compile time.
        c["compile_s"] = c.pop("first_call_s") - c["median_s"]
        c["images_per_s"] = size["B"] / c["median_s"]
        ratios["compiled_over_eager"] = c["median_s"] / med["nearl"]
    return {"rows": rows, "ratios": ratios}


def make_nearl_compiled(size: dict, mode: str, device: torch.device):
    import torch._inductor.config

    # A cold compile, as a user's first run pays it: no kernels from an earlier run's cache.
    torch._inductor.config.force_disable_caches = True
    model = model_steps.make_nearl(size["model"], mode, fused=True, device=device)
    model.compile_regions()
    return model


def env_description(device: torch.device) -> Dict:
    import platform

    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu"),
           "cores": os.cpu_count()}
    return env


def run(size_name: str, modes=model_steps.MODES, compile_modes=(), device: Optional[torch.device] = None) -> Dict:
    """Every row of each mode at a size of ``SIZES``; the compiled row for the modes in ``compile_modes``."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = SIZES[size_name]
    result = {"size": size_name, "shape": size, "env": env_description(device), "modes": {}}
    for mode in modes:
        result["modes"][mode] = mode_rows(mode, size, device, mode in compile_modes)
    return result


def _ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def _gib(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


LABELS = {
    "nearl": "NEARL training step (fused)",
    "floor": "its frozen floor",
    "finetune": "full fine-tune step",
    "lora": "CLIP-LoRA step",
    "nearl_compiled": "NEARL step, regional --compile",
    "nearl_infer": "NEARL inference",
    "clip_infer": "plain CLIP zero-shot",
}


def markdown(result: Dict) -> str:
    """The rows and ratios of :func:`run` as one Markdown table per mode."""
    s, env = result["shape"], result["env"]
    out = [f"{env['device']}; torch {env['torch']}, triton {env['triton']}; {s['model']}, training B={s['B']}, "
           f"inference B={s['B_infer']}, K={s['K']}, {s['dtype'] or 'fp32'}, medians of {s['rounds']} "
           f"interleaved round(s).", ""]
    for mode, m in result["modes"].items():
        out += [f"**{mode}**", "", "| row | time | images/s | vs frozen floor | peak memory |", "|---|---|---|---|---|"]
        floor = m["rows"]["floor"]["median_s"]
        for name in ("nearl", "floor", "finetune", "lora", "nearl_compiled", "nearl_infer", "clip_infer"):
            r = m["rows"].get(name)
            if r is None:
                continue
            vs = f"{r['median_s'] / floor:.2f}x" if name in (*TRAIN_ROWS, "nearl_compiled") else "-"
            label = LABELS[name] + (f" (compile {r['compile_s']:.1f} s)" if "compile_s" in r else "")
            out.append(f"| {label} | {_ms(r['median_s'])} | {r['images_per_s']:.1f} | {vs} | {_gib(r['peak_bytes'])} |")
        ratio = m["ratios"]
        out += ["", f"NEARL / floor {ratio['nearl_over_floor']:.2f}x, NEARL / fine-tune "
                    f"{ratio['nearl_over_finetune']:.2f}x, inference NEARL / CLIP {ratio['nearl_infer_over_clip']:.2f}x"
                + (f", compiled / eager step {ratio['compiled_over_eager']:.2f}x" if "compiled_over_eager" in ratio
                   else "") + ".", ""]
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), help="default: gpu on CUDA, else cpu")
    p.add_argument("--modes", default=",".join(model_steps.MODES), help="comma-separated: paired,shared")
    p.add_argument("--compile", nargs="?", const=",".join(model_steps.MODES), default="", metavar="MODES",
                   help="add the regional --compile row and its compile time, for these modes (default: all)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--md", help="write the Markdown tables here (default: stdout)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    compiled = [m for m in args.compile.split(",") if m]
    for flag, value, chosen in (("--modes", args.modes, modes), ("--compile", args.compile, compiled)):
        if any(m not in model_steps.MODES for m in chosen) or (flag == "--modes" and not chosen):
            print(f"error: {flag} takes paired and/or shared, comma-separated; got {value!r}", file=sys.stderr)
            return 2
    size = args.size or ("gpu" if torch.cuda.is_available() else "cpu")
    result = run(size, modes, compiled)
    from nearl_model._io import atomic_write_text

    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    if args.md:
        atomic_write_text(args.md, table)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
