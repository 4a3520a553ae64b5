"""Turn a pytest-benchmark JSON into a Markdown table and a PNG chart of speed-ups.

    python benchmarks/report.py benchmarks/results/cpu-2core.json [--md OUT.md] [--png OUT.png]

Speed-ups are recomputed from the file (each row's median over the reference
row of the same op, shape and mode), so the table does not depend on the
order the benchmarks ran in.
"""

import argparse
import json
import sys
from collections import defaultdict
from typing import Dict, List, Optional


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def load_rows(path: str) -> (List[Dict], Dict):
    with open(path) as f:
        data = json.load(f)
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info", {}))
        info["mean_seconds"] = b["stats"]["mean"]
        info["median_seconds"] = b["stats"]["median"]
        info["min_seconds"] = b["stats"]["min"]
        info["stddev_seconds"] = b["stats"]["stddev"]
        rows.append(info)
    # Medians, not means: on a shared machine a few preempted rounds move the
    # mean of a sub-millisecond op by tens of percent.
    reference = {(r["op"], r["shape"], r["mode"]): r["median_seconds"] for r in rows if r.get("provider") == "reference"}
    for r in rows:
        key = (r["op"], r["shape"], r["mode"])
        r["speedup"] = reference[key] / r["median_seconds"] if key in reference else None
        if r.get("bytes_moved"):
            r["gb_per_s"] = r["bytes_moved"] / r["median_seconds"] / 1e9
        if r.get("flops"):
            r["tflops"] = r["flops"] / r["median_seconds"] / 1e12
    return rows, data.get("machine_info", {})


def markdown(rows: List[Dict], machine: Dict, env: Dict) -> str:
    lines = []
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor") or "?"
    lines.append(f"Machine: {env.get('gpu', cpu)}; {env.get('cores', machine.get('cpu', {}).get('count', '?'))} cores; "
                 f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, python {machine.get('python_version', '?')}.")
    lines.append("")
    lines.append("| op | shape | mode | provider | median | min | speed-up vs reference | bytes moved | GB/s | TFLOP/s | launches | peak memory | adapter overhead |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"reference": 0, "compiled": 1, "fused": 2, "xformers": 3, "frozen_clip": 4}
    rows = sorted(rows, key=lambda r: (r["op"], r["shape"], r["mode"], order.get(r["provider"], 9)))
    for r in rows:
        overhead = r.get("adapter_overhead")
        spread = r.get("adapter_overhead_range")
        overhead_text = "-" if overhead is None else f"{overhead * 100:+.1f}%"
        if overhead is not None and spread:
            overhead_text += f" ({spread[0] * 100:+.1f}..{spread[1] * 100:+.1f})"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['mode']} | {r['provider']} | {r['median_seconds'] * 1e3:.2f} ms | "
            f"{r['min_seconds'] * 1e3:.2f} ms | "
            f"{_fmt(r.get('speedup'), '.2f')}x | {_fmt_bytes(r.get('bytes_moved'))} | {_fmt(r.get('gb_per_s'), '.1f')} | "
            f"{_fmt(r.get('tflops'), '.3f')} | {_fmt(r.get('launches'), 'd')} | {_fmt_bytes(r.get('peak_memory_bytes'))} | "
            f"{overhead_text} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: List[Dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(dict)
    for r in rows:
        if r.get("speedup") is not None and r["provider"] != "reference":
            groups[f"{r['op']}\n{r['shape']}\n{r['mode']}"][r["provider"]] = r["speedup"]
    labels = list(groups)
    providers = sorted({p for g in groups.values() for p in g})
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels)), 4))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [groups[label].get(p, 0) for label in labels], width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(labels))], labels, fontsize=6)
    ax.set_ylabel("speed-up over reference")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="pytest-benchmark --benchmark-json output")
    p.add_argument("--env", help="JSON with torch/triton/gpu versions (gpu_check.sh writes one)")
    p.add_argument("--md", help="write the Markdown table here (default: stdout)")
    p.add_argument("--png", help="write the speed-up bar chart here")
    args = p.parse_args(argv)
    try:
        rows, machine = load_rows(args.json)
        env = json.load(open(args.env)) if args.env else machine.get("nearl_env", {})
    except (OSError, ValueError, KeyError) as err:
        print(f"error: cannot read {args.json!r}: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.json!r} holds no benchmark rows", file=sys.stderr)
        return 2
    table = markdown(rows, machine, env)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)
    if args.png:
        chart(rows, args.png, env.get("gpu") or "CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
