"""Issue 17's goals, one row each, from one GPU check's op benchmarks and model rows.

    python benchmarks/goals.py OUT/benchmarks.json OUT/model_rows.json [--md OUT/goals.md]

Every figure is a ratio of medians measured in the same run (op rows: one
pytest-benchmark session; model rows: one bench_model.py run). The bandwidth
goal divides each fused row's bytes (the kernels' footprint, see
``common.traffic``) by its median time and by the copy bandwidth the issue
measured on the H200 (4.3 TB/s).
"""

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import load_rows  # noqa: E402

COPY_BANDWIDTH = 4.3e12  # bytes/s, the measured device-to-device copy on the H200


def _median(rows: List[Dict], op: str, shape_prefix: str, mode: str, provider: str) -> Optional[float]:
    for r in rows:
        if r["op"] == op and r["shape"].startswith(shape_prefix) and r["mode"] == mode and r["provider"] == provider:
            return r["median_seconds"]
    return None


def _row(goal: str, target: str, value: Optional[float], met) -> str:
    shown = "not measured" if value is None else f"{value:.2f}x" if not goal.endswith("bandwidth") else f"{value:.0%}"
    verdict = "-" if value is None else ("yes" if met(value) else "no")
    return f"| {goal} | {target} | {shown} | {verdict} |"


def goals(op_rows: List[Dict], model: Dict) -> List[str]:
    lines = ["| goal | target | measured | met |", "|---|---|---|---|"]
    for op, prefix, eager_x, compile_x in (("oca", "image", 3, 1.5), ("oca", "text", 3, 1.5),
                                           ("synergy", "", 2, 1.5)):
        name = f"{'USEformer' if op == 'synergy' else 'OCA ' + prefix}, full"
        fused = _median(op_rows, op, prefix, "full", "fused")
        ref, comp = _median(op_rows, op, prefix, "full", "reference"), _median(op_rows, op, prefix, "full", "compiled")
        lines.append(_row(f"{name}: eager / fused", f">= {eager_x}x", ref / fused if ref and fused else None,
                          lambda v, x=eager_x: v >= x))
        lines.append(_row(f"{name}: torch.compile / fused", f">= {compile_x}x",
                          comp / fused if comp and fused else None, lambda v, x=compile_x: v >= x))
    for r in op_rows:
        if r["op"] == "oca" and r["provider"] == "fused" and r["mode"] in ("forward", "backward") and r.get("bytes_moved"):
            share = r["bytes_moved"] / r["median_seconds"] / COPY_BANDWIDTH
            lines.append(_row(f"OCA {r['shape']} {r['mode']}: share of copy bandwidth", ">= 30%", share,
                              lambda v: v >= 0.30))
    modes = model.get("modes", {})
    for mode in ("shared", "paired"):
        ratios = modes.get(mode, {}).get("ratios", {})
        lines.append(_row(f"NEARL {mode} step / its frozen floor", "<= 1.3x", ratios.get("nearl_over_floor"),
                          lambda v: v <= 1.3))
        lines.append(_row(f"NEARL {mode} step / full fine-tune", "< 0.7x", ratios.get("nearl_over_finetune"),
                          lambda v: v < 0.7))
    lines.append(_row("NEARL shared inference / plain CLIP", "<= 1.1x",
                      modes.get("shared", {}).get("ratios", {}).get("nearl_infer_over_clip"), lambda v: v <= 1.1))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("benchmarks", help="pytest-benchmark JSON of bench_oca.py and bench_synergy.py")
    p.add_argument("model_rows", help="bench_model.py --json output")
    p.add_argument("--md", help="write the table here (default: stdout)")
    args = p.parse_args(argv)
    try:
        op_rows, _ = load_rows(args.benchmarks)
        with open(args.model_rows) as f:
            model = json.load(f)
    except (OSError, ValueError, KeyError) as err:
        print(f"error: cannot read the results: {err}", file=sys.stderr)
        return 2
    table = "\n".join(goals(op_rows, model)) + "\n"
    if args.md:
        from nearl_model._io import atomic_write_text

        atomic_write_text(args.md, table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
