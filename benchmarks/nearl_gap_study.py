"""Why NEARL trails a linear probe at 16 shots on digits: one training factor changed at a time.

Each setting is NEARL (``nearl_model.methods.nearl.Nearl``) with one keyword
changed from the harness's recipe, registered for the run as its own
``--methods`` name, so every cell goes through ``python -m nearl_model.compare``
itself: the same few-shot samples, early stopping, test split and metrics as
every other method. One results folder per data set under
``benchmarks/results/nearl_gap/`` (the harness's results.csv, results.md, run.json,
machine.json), and ``summary.csv`` over all of them, which
``docs/nearl_vs_baselines.md`` renders through docs/generate.py.

    python benchmarks/nearl_gap_study.py --datasets digits0-4 --shots 16 --seeds 1 --settings nearl,nearl@lr3e-3
    python benchmarks/nearl_gap_study.py --summarise     # only rewrite summary.csv from the results folders

The grid is resumable (the harness skips cells already in results.csv), so a
study can be run in slices, and a later slice adds seeds, settings or data sets.

Data sets: ``demo`` (the harness's 3-class synthetic X-rays), ``digits0-4``, ``digits5-9`` and
``digits0-9`` (all ten): scikit-learn's ``load_digits`` (no download), the first 100
images of each class, 8x8 upscaled (bilinear) to 32x32 RGB PNGs in an
ImageFolder under ``runs/nearl_gap_data/``, split by the harness (70/15/15).
"""

import argparse
import csv
import io
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join("benchmarks", "results", "nearl_gap")
DATA_DIR = os.path.join("runs", "nearl_gap_data")
DATASETS = {"demo": None, "digits0-4": (0, 4), "digits5-9": (5, 9), "digits0-9": (0, 9)}
IMAGES_PER_CLASS, IMAGE_SIZE = 100, 32
# name -> (what changed, Nearl keywords). "nearl" and "nearl-shared" are the harness's own methods.
SETTINGS = {
    "nearl": ("harness recipe: paired, lr 1e-3, 200 steps, wd 0.01, text lr x1, s_novel 1", None),
    "nearl@lr3e-3": ("lr 3e-3", {"lr": 3e-3}),
    "nearl@lr3e-4": ("lr 3e-4", {"lr": 3e-4}),
    "nearl@steps100": ("100 steps", {"steps": 100}),
    "nearl@steps400": ("400 steps", {"steps": 400}),
    "nearl@text-lr0.1": ("text-tower OCAs at 0.1 x lr", {"text_lr_scale": 0.1}),
    "nearl@s_novel0.1": ("s_novel starts at 0.1", {"s_novel_init": 0.1}),
    "nearl@wd0": ("no weight decay", {"weight_decay": 0.0}),
    "nearl@wd0.1": ("weight decay 0.1 on adapter matrices", {"weight_decay": 0.1}),
    "nearl@wd1": ("weight decay 1.0 on adapter matrices", {"weight_decay": 1.0}),
    "nearl@wd3": ("weight decay 3.0 on adapter matrices", {"weight_decay": 3.0}),
    "nearl-shared": ("--mode shared", None),
}
BASELINES = ("linear-probe", "tip-adapter")
SUMMARY_COLUMNS = ["dataset", "shots", "method", "change", "seeds", "mean", "std", "delta_mean", "delta_std", "wins"]


def write_digits(first: int, last: int) -> str:
    """The ImageFolder of digits ``first``..``last`` (built once); returns its path relative to the repo root."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = os.path.join(DATA_DIR, f"digits{first}-{last}")
    names = [str(c) for c in range(first, last + 1)]
    if os.path.isdir(folder) and sorted(os.listdir(folder)) == names and all(
            len(os.listdir(os.path.join(folder, c))) == IMAGES_PER_CLASS for c in names):
        return folder
    digits = load_digits()
    for c in range(first, last + 1):
        os.makedirs(os.path.join(folder, str(c)), exist_ok=True)
        for j, i in enumerate(np.flatnonzero(digits.target == c)[:IMAGES_PER_CLASS]):
            pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
            image = Image.fromarray(pixels).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).convert("RGB")
            image.save(os.path.join(folder, str(c), f"{j:03d}.png"))
    return folder


def run(datasets: List[str], methods: List[str], shots: str, seeds: str) -> None:
    """Run the harness on each data set with the study's settings registered as methods."""
    from functools import partial
    from unittest import mock

    import torch

    from nearl_model import compare
    from nearl_model.methods import METHODS
    from nearl_model.methods.nearl import Nearl

    # One thread: a CPU's reductions then run in the same order on any machine, and on a shared 2-core box
    # two threads per process oversubscribe it (a NEARL cell took ~10x longer at two threads under load).
    torch.set_num_threads(1)
    variants = {name: partial(Nearl, "paired", **kw) for name, (_, kw) in SETTINGS.items() if kw is not None}
    for name in datasets:
        spec = DATASETS[name]
        argv = ["--methods", ",".join(methods), "--shots", shots, "--seeds", seeds, "--out", os.path.join(OUT, name)]
        if spec is not None:
            argv = ["--data", write_digits(*spec)] + argv
        with mock.patch.dict(METHODS, variants):
            code = compare.main(argv)
        if code:
            raise SystemExit(f"nearl_gap_study: the harness failed on {name} (exit {code})")


def _rows(dataset: str) -> List[Dict]:
    path = os.path.join(OUT, dataset, "results.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def summarise() -> List[Dict]:
    """Mean and sample std of accuracy per (data set, shots, method), and the paired gain over default NEARL.

    ``delta`` is the method's accuracy minus default NEARL's on the same seed
    (mean and std over the seeds both have); ``wins`` counts seeds where it is higher.
    """
    order = list(SETTINGS) + list(BASELINES)
    out = []
    for dataset in DATASETS:
        acc = {}
        for r in _rows(dataset):
            acc[(r["method"], int(r["shots"]), int(r["seed"]))] = float(r["accuracy"])
        for shots in sorted({k for _, k, _ in acc}):
            for method in sorted({m for m, k, _ in acc if k == shots}, key=lambda m: (m not in order, order.index(m)
                                                                                       if m in order else m)):
                seeds = sorted(s for m, k, s in acc if m == method and k == shots)
                vals = [acc[(method, shots, s)] for s in seeds]
                paired = [acc[(method, shots, s)] - acc[("nearl", shots, s)] for s in seeds
                          if ("nearl", shots, s) in acc]
                change = SETTINGS[method][0] if method in SETTINGS else "baseline (harness)"
                out.append({"dataset": dataset, "shots": shots, "method": method, "change": change,
                            "seeds": " ".join(map(str, seeds)), "mean": round(float(np.mean(vals)), 4),
                            "std": round(float(np.std(vals, ddof=1)), 4) if len(vals) > 1 else "",
                            "delta_mean": round(float(np.mean(paired)), 4) if paired and method != "nearl" else "",
                            "delta_std": round(float(np.std(paired, ddof=1)), 4)
                            if len(paired) > 1 and method != "nearl" else "",
                            "wins": f"{sum(d > 0 for d in paired)}/{len(paired)}" if paired and method != "nearl"
                            else ""})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(out)
    sys.path.insert(0, ROOT)
    from nearl_model._io import atomic_write_text

    atomic_write_text(os.path.join(OUT, "summary.csv"), buf.getvalue())
    return out


def markdown(path: Optional[str] = None, datasets: Sequence[str] = ("demo", "digits0-4", "digits5-9"),
             rule: bool = True) -> str:
    """The summary as one Markdown table, a row per method and a column per (data set, shots).

    Each cell: accuracy mean ± sample std over seeds; below it, for NEARL's
    variants and the baselines, the gain over default NEARL on the same seeds
    and on how many seeds it was ahead. The last two columns average and take
    the worst of those per-column gains; "default rule" says whether a NEARL
    variant is ahead on average and behind in no column, the bar for making it
    the default (``rule=False`` leaves it out, for a follow-up that covers
    only some columns). docs/generate.py's ``nearl-gap`` blocks.
    """
    with open(path or os.path.join(ROOT, OUT, "summary.csv"), newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["dataset"] in datasets]
    columns = sorted({(r["dataset"], int(r["shots"])) for r in rows},
                     key=lambda c: (list(DATASETS).index(c[0]) if c[0] in DATASETS else len(DATASETS), c))
    methods = list(dict.fromkeys(r["method"] for r in sorted(
        rows, key=lambda r: list(SETTINGS).index(r["method"]) if r["method"] in SETTINGS else len(SETTINGS))))
    cell = {(r["method"], r["dataset"], int(r["shots"])): r for r in rows}
    lines = ["| method | what changed | " + " | ".join(f"{d}, {k}-shot" for d, k in columns)
             + " | mean gain | worst gain |" + (" default rule |" if rule else ""),
             "|---|---|" + "---|" * (len(columns) + 2 + rule)]
    for m in methods:
        texts, gains = [], []
        for d, k in columns:
            r = cell.get((m, d, k))
            if r is None:
                texts.append("–")
                continue
            text = f"{float(r['mean']):.3f}" + (f" ± {float(r['std']):.3f}" if r["std"] else "")
            if r["delta_mean"]:
                gains.append(float(r["delta_mean"]))
                text += f"<br>{float(r['delta_mean']):+.3f} ({r['wins']})"
            texts.append(text)
        cell_change = next(r["change"] for r in rows if r["method"] == m)
        # The rule a default change must meet: ahead on average, behind in no column (every column measured).
        meets = "yes" if len(gains) == len(columns) and np.mean(gains) > 0 and min(gains) >= 0 else "no"
        summary = ([f"{np.mean(gains):+.3f}", f"{min(gains):+.3f}", meets if m in SETTINGS else "–"] if gains
                   else ["–", "–", "–"])[:2 + rule]
        lines.append(f"| {m} | {cell_change} | " + " | ".join(texts) + " | " + " | ".join(summary) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list of {', '.join(DATASETS)}")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--baselines", default=",".join(BASELINES), help="harness methods run beside (may be empty)")
    p.add_argument("--shots", default="4,16")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--summarise", action="store_true", help="only rewrite summary.csv from the results folders")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    if not args.summarise:
        datasets = [d for d in args.datasets.split(",") if d]
        settings = [s for s in args.settings.split(",") if s]
        unknown = [d for d in datasets if d not in DATASETS] + [s for s in settings if s not in SETTINGS]
        if unknown:
            print(f"nearl_gap_study: unknown data set or setting {unknown}; choose from {list(DATASETS)} and "
                  f"{list(SETTINGS)}", file=sys.stderr)
            return 2
        run(datasets, settings + [b for b in args.baselines.split(",") if b], args.shots, args.seeds)
    rows = summarise()
    print(f"wrote {os.path.join(OUT, 'summary.csv')} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
