"""Every figure table in README.md and docs/*.md, rendered from the committed results that hold it.

    python docs/generate.py            # fail, naming the block, if any table differs from its source
    python docs/generate.py --write    # rewrite the tables from their sources

A generated table sits between ``<!-- generated: NAME -->`` and
``<!-- /generated: NAME -->``; NAME is a key of ``BLOCKS``, whose function
reads the committed files (benchmark JSON, compile-gate tables, comparison
CSV) and returns the Markdown. Nothing here reruns an experiment: the
command that produced each source is named beside its table.
``tests/test_docs.py`` runs the check, so a table typed by hand, or one left
behind when its source was regenerated, fails CI.
"""

import argparse
import glob
import json
import os
import re
import sys
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- /generated: (?P=name) -->)", re.S)


def _benchmarks_module(name: str):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _release_key(path: str) -> tuple:
    return tuple(int(p) for p in os.path.basename(path).split("-", 1)[1].split("."))


def compile_gate_matrix() -> str:
    """One row per Triton release: what the gate built for each target, and whether all of it passed."""
    lines = ["| Triton | torch it ran under | sm_90 (H100/H200) | sm_80 (A100) |", "|---|---|---|---|"]
    for folder in sorted(glob.glob(os.path.join(RESULTS, "compile_gate", "triton-*")), key=_release_key):
        cells, torch_version = [], "?"
        for arch in ("sm90", "sm80"):
            with open(os.path.join(folder, f"{arch}.json")) as f:
                table = json.load(f)
            torch_version = table["torch"]
            failed = sum(1 for row in table["rows"] if row["failures"])
            verdict = "PASS" if table["passed"] else f"FAIL ({failed} rows)"
            cells.append(f"{verdict}: {len(table['rows'])} kernel builds, {failed} flagged")
        lines.append(f"| {os.path.basename(folder).split('-', 1)[1]} | {torch_version} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def kernel_roofline() -> str:
    """Minimal bytes, FLOPs and programs per kernel at the benchmark shapes, from nearl_kernels.roofline
    (derived by code, not read from results: the same function writes the kernel files' headers)."""
    sys.path.insert(0, ROOT)
    try:
        from nearl_kernels import roofline
    finally:
        sys.path.pop(0)
    return roofline.table()


def _span(values, fmt: str = ".2f") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if lo == hi else f"{lo:{fmt}}-{hi:{fmt}}"


def compile_gate_waves() -> str:
    """Waves of every benchmark launch on sm_90 and sm_80, over the committed releases' gate tables."""
    folders = sorted(glob.glob(os.path.join(RESULTS, "compile_gate", "triton-*")), key=_release_key)
    per_launch: Dict[tuple, dict] = {}
    for folder in folders:
        for arch in ("sm90", "sm80"):
            with open(os.path.join(folder, f"{arch}.json")) as f:
                for w in json.load(f).get("waves", []):
                    entry = per_launch.setdefault((w["case"], w["kernel"]), dict(programs=w["programs"]))
                    entry.setdefault(arch, []).append(w)
    releases = ", ".join(os.path.basename(f).split("-", 1)[1] for f in folders)
    lines = [f"Over the committed gate tables (triton {releases}); waves and blocks per SM as min-max "
             "across releases.", "",
             "| launch (benchmark case) | kernel | programs | sm_90: blocks/SM | sm_90: waves | "
             "sm_80: blocks/SM | sm_80: waves | under one wave |", "|---|---|---|---|---|---|---|---|"]
    for (case, kernel), entry in per_launch.items():
        cells = [case, f"`{kernel}`", f"{entry['programs']:,}"]
        flagged = []
        for arch in ("sm90", "sm80"):
            ws = [w for w in entry.get(arch, []) if w["waves"] is not None]
            cells += [_span([w["blocks_per_sm"] for w in ws], "d"), _span([w["waves"] for w in ws])] if ws else ["-", "-"]
            if any(w["under_one_wave"] for w in entry.get(arch, [])):
                flagged.append(arch.replace("sm", "sm_"))
        cells.append(", ".join(flagged) or "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cpu_benchmark_rows():
    report = _benchmarks_module("report")
    return report, *report.load_rows(os.path.join(RESULTS, "cpu-2core.json"))


def benchmarks_cpu_table() -> str:
    """The whole committed CPU benchmark table, exactly as report.py renders it."""
    report, rows, machine = _cpu_benchmark_rows()
    return report.markdown(rows, machine, machine.get("nearl_env", {}))


def benchmarks_cpu_headline() -> str:
    """The README's cut of that table: every op's full step (forward + backward) and the model's training step."""
    report, rows, machine = _cpu_benchmark_rows()
    kept = [r for r in rows if r["mode"] in ("full", "train_step")]
    return report.markdown(kept, machine, machine.get("nearl_env", {}))


def export_cpu_table() -> str:
    """benchmarks/bench_export.py on CPU: images/s of the eager model and of its exported package, per batch."""
    report = _benchmarks_module("report")
    rows, machine = report.load_rows(os.path.join(RESULTS, "export-cpu-2core.json"))
    env = machine.get("nearl_env", {})
    by = {(r["shape"], r["provider"]): r for r in rows}
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: by[s, "package"]["images"])
    load = max(r["load_average"] for r in rows)
    lines = [f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}; {env.get('cores', '?')} cores, shared (load "
             f"average up to {load:.1f}); torch {env.get('torch', '?')}. Images per second from the median round; "
             "the last column times the package and the eager fused model back to back in each round "
             "(median, range):", "",
             "| model, batch, classes | reference (eager) | fused (eager) | package | package time / fused time |",
             "|---|---|---|---|---|"]
    for shape in shapes:
        speed = [by[shape, p]["images"] / by[shape, p]["median_seconds"] for p in ("reference", "fused", "package")]
        ratio, (low, high) = by[shape, "package"]["time_vs_fused"], by[shape, "package"]["time_vs_fused_range"]
        lines.append(f"| {shape} | {speed[0]:.1f} | {speed[1]:.1f} | {speed[2]:.1f} | "
                     f"{ratio:.2f} ({low:.2f}..{high:.2f}) |")
    return "\n".join(lines) + "\n"


def _json(*parts):
    with open(os.path.join(RESULTS, *parts)) as f:
        return json.load(f)


def launch_counts_table() -> str:
    """Kernel launches of one training step before and after issue 17's glue work (launch_counts.py)."""
    return _benchmarks_module("launch_counts").markdown(_json("launch_counts", "before.json"),
                                                        _json("launch_counts", "after.json"))


def model_rows_cpu() -> str:
    """The rows users compare, measured on this project's 2-core CPU (bench_model.py --size cpu)."""
    return _benchmarks_module("bench_model").markdown(_json("model_rows", "cpu.json"))
def nearl_gap_table() -> str:
    """NEARL with one training factor changed at a time, against the harness's baselines (the study's summary.csv)."""
    return _benchmarks_module("nearl_gap_study").markdown(os.path.join(RESULTS, "nearl_gap", "summary.csv"))


def nearl_gap_ten_classes() -> str:
    """The same study's ten-digit follow-up (the text-rate question of docs/learning-speed.md)."""
    return _benchmarks_module("nearl_gap_study").markdown(os.path.join(RESULTS, "nearl_gap", "summary.csv"),
                                                          ("digits0-9",), rule=False)
# The committed comparison grids (python -m nearl_model.compare --out benchmarks/results/compare/NAME ...).
COMPARE = os.path.join(RESULTS, "compare")
COMPARE_GRIDS = {"demo": "synthetic demo (3 classes)", "digits": "scikit-learn digits 0-4 (5 classes)"}
HEADLINE_SHOTS = (1, 4, 16)


def _compare():
    sys.path.insert(0, ROOT)
    try:
        from nearl_model import compare
    finally:
        sys.path.pop(0)
    return compare


def _compare_grid(name: str):
    """A committed grid's rows, and its class and test-image counts (from its data, loaded as the run did)."""
    compare = _compare()
    from nearl_model.data import load_dataset

    folder = os.path.join(COMPARE, name)
    with open(os.path.join(folder, "run.json")) as f:
        settings = json.load(f)
    data = load_dataset(settings["data"], 32, settings["classes"], seed=0)
    return compare.read_results(os.path.join(folder, "results.csv")), len(data.classes), len(data.splits["test"])


def compare_tables(name: str) -> str:
    """A whole committed grid as results.md renders it: every metric, the sanity flags and the cost."""
    rows, n_classes, n_test = _compare_grid(name)
    lines, _ = _compare().report_sections(rows, n_classes, n_test, level="####")
    return "\n".join(lines).rstrip("\n") + "\n"


def compare_headline() -> str:
    """Mean test accuracy at 1, 4 and 16 shots on each committed grid; the best of each column in bold."""
    compare = _compare()
    grids = {name: _compare_grid(name) for name in COMPARE_GRIDS}
    methods = compare._order([r for rows, _, _ in grids.values() for r in rows])[0]
    columns = [(name, k) for name in COMPARE_GRIDS for k in HEADLINE_SHOTS]
    means, flags = {}, set()
    for name, (rows, n_classes, n_test) in grids.items():
        flags |= {(name, f["method"], f["shots"]) for f in compare.collapsed_cells(rows, n_classes, n_test)}
        for m in methods:
            for k in HEADLINE_SHOTS:
                vals = [r["accuracy"] for r in rows if r["method"] == m and r["shots"] == k]
                if vals:
                    means[(name, m, k)] = sum(vals) / len(vals)
    best = {c: max(v for (n, m, k), v in means.items() if (n, k) == c) for c in columns}
    lines = ["| method | " + " | ".join(f"{name} {k}-shot" for name, k in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for m in methods:
        cells = []
        for name, k in columns:
            v = means.get((name, m, k))
            text = "n/a" if v is None else f"**{v:.3f}**" if v == best[(name, k)] else f"{v:.3f}"
            cells.append(text + (" ⚠" if (name, m, k) in flags else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"{name}: {COMPARE_GRIDS[name]}, {n_test} test images" for name, (_, _, n_test) in grids.items())
    return "\n".join(lines) + f"\n\nMean test accuracy over seeds 1-3 ({counts}); ⚠: a collapsed method.\n"


BLOCKS: Dict[str, Callable[[], str]] = {
    "launch-counts": launch_counts_table,
    "model-rows-cpu": model_rows_cpu,
    "compile-gate-matrix": compile_gate_matrix,
    "compile-gate-waves": compile_gate_waves,
    "kernel-roofline": kernel_roofline,
    "benchmarks-cpu": benchmarks_cpu_table,
    "benchmarks-cpu-headline": benchmarks_cpu_headline,
    "export-cpu": export_cpu_table,
    "nearl-gap": nearl_gap_table,
    "nearl-gap-ten-classes": nearl_gap_ten_classes,
    "compare-demo": lambda: compare_tables("demo"),
    "compare-digits": lambda: compare_tables("digits"),
    "compare-headline": compare_headline,
}


def render(text: str, page: str) -> (str, List[str]):
    """``text`` with every generated block re-rendered, and the names of the blocks that changed."""
    changed = []

    def replace(match):
        name = match.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"error: {page}: generated block {name!r} has no renderer in docs/generate.py BLOCKS")
        body = BLOCKS[name]()
        if body != match.group("body"):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    return BLOCK.sub(replace, text), changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite the blocks instead of checking them")
    args = p.parse_args(argv)
    stale = []
    for page in PAGES:
        path = os.path.join(ROOT, page)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        new, changed = render(text, page)
        stale += [f"{page}: {name}" for name in changed]
        if args.write and changed:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
    if stale and not args.write:
        print("stale generated tables (run python docs/generate.py --write):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    print(("rewrote " if args.write else "up to date: ") + (", ".join(stale) if args.write else f"{len(PAGES)} pages"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
