"""Few-shot comparison: ``python -m nearl_model.compare``.

Runs NEARL against zero-shot CLIP, a linear probe, CLIP-Adapter, Tip-Adapter,
CoOp and CLIP-LoRA on one frozen backbone, one data pipeline and one set of
metrics, over a grid of shot counts and seeds. Every cell (method, shots,
seed) fits on a K-shot sample of the train split, stops early on a K-shot
sample of the val split (the same rule for every method) and is scored on the
whole test split. The grid is resumable: a killed run continues with the
cells missing from ``OUT/results.csv``. Several runs may share one ``--out``
(other seeds, another machine on a shared disk): each merges its cells into
``results.csv`` under the lock ``nearl_model.train`` takes, so no cell is lost.

Writes ``OUT/results.csv`` (one row per cell), ``OUT/results.md`` (mean +- std
over seeds), ``OUT/accuracy_vs_shots.png``, ``OUT/run.json`` (the settings a
resumed run must share) and ``OUT/machine.json``.

Exit codes: 0 done, 2 bad input (flag values, data, model, paths), with the reason on stderr.
"""

import argparse
import contextlib
import csv
import fcntl
import io
import json
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nearl_kernels import KernelBuildError

from ._cli import CLIError, check_outputs, fail, pick_device, writing
from ._io import atomic_save_figure, atomic_write_text
from .backbones import create_clip
from .data import DataError, LabeledImages, few_shot, load_dataset
from .metrics import classification_metrics
from .methods import METHODS, Backbone, ClassSet, Task, View
from .prompts import class_prompts, default_template
from .run_dir import LOCK_NAME

COLUMNS = ["method", "shots", "seed", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "trainable_parameters",
           "train_seconds", "peak_memory_bytes"]
B2N_COLUMNS = ["base_accuracy", "novel_accuracy", "harmonic_mean"]
# The settings every cell of one results.csv shares; a resumed run must match them.
RUN_KEYS = ("data", "classes", "prompt", "model", "pretrained", "precision", "max_steps", "base_to_novel",
            "backbone_seed")
OUT_FILES = ("results.csv", "results.md", "accuracy_vs_shots.png", "run.json", "machine.json")
# How long a cell's write waits for the lock: other compare runs hold it for milliseconds, a training run for hours.
LOCK_WAIT_SECONDS = 60.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nearl_model.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="ImageFolder dir, CSV (path,label[,split]), MedMNIST .npz, DICOM dir, "
                                  "sklearn-digits[:0-4] or medmnist:NAME (as nearl_model.train); omit for the "
                                  "synthetic demo")
    p.add_argument("--classes", help="class names: JSON list, JSON {label: name} or CSV label,name")
    p.add_argument("--prompt", help="prompt template with one {} (default: the demo's chest X-ray template, "
                                    "or 'a medical image showing {}.' with --data)")
    p.add_argument("--model", default="nearl-tiny", help="open_clip name, hf-hub:org/repo, JSON config or nearl-tiny")
    p.add_argument("--pretrained", help="open_clip tag or local checkpoint file (default: random init)")
    p.add_argument("--backbone-seed", type=int, default=0, help="seed of a random-init backbone (the same for all cells)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--shots", default="1,2,4,8,16", help="comma list of shots per class")
    p.add_argument("--seeds", default="1,2,3", help="comma list of seeds (few-shot sample and method init)")
    p.add_argument("--base-to-novel", action="store_true",
                   help="train on the first half of the classes; score base, novel and their harmonic mean")
    p.add_argument("--max-steps", type=int, help="cap every trained method's optimiser steps (default: each "
                                                 "paper's schedule)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--out", default="runs/compare", help="output directory")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, argv)
    except KeyboardInterrupt:
        return fail(f"interrupted; the finished cells are in {os.path.join(args.out, 'results.csv')!r}, and the same "
                    "command continues with the rest")
    except (CLIError, DataError, KernelBuildError) as err:
        return fail(err)


def parse_ints(flag: str, value: str) -> List[int]:
    """``"1,2,4"`` -> [1, 2, 4]; anything else is a CLIError naming ``flag``."""
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        items = []
    if not items or any(v < (0 if flag == "--seeds" else 1) for v in items):
        kind = "non-negative" if flag == "--seeds" else "positive"
        raise CLIError(f"{flag} must be a comma list of {kind} integers, e.g. 1,2,4; got {value!r}")
    return list(dict.fromkeys(items))


def parse_methods(value: str) -> List[str]:
    """``"zeroshot,nearl"`` -> the method names, each checked against ``METHODS``."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown:
        raise CLIError(f"--methods: unknown method(s) {unknown or [value]}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def split_classes(n: int, base_to_novel: bool):
    """Class ids trained on, and the novel ids (empty without --base-to-novel)."""
    if not base_to_novel:
        return list(range(n)), []
    if n < 4:
        raise CLIError(f"--base-to-novel needs at least 4 classes (2 base, 2 novel); the data has {n}")
    half = math.ceil(n / 2)
    return list(range(half)), list(range(half, n))


def class_view(split: str, dataset: LabeledImages, class_ids: Sequence[int],
               shots: Optional[int] = None, seed: int = 0) -> View:
    """The images of ``class_ids`` in a split (all, or ``shots`` per class), labels renumbered 0..len-1.

    The few-shot sample is ``nearl_model.data.few_shot``'s, drawn over image
    indices so the view keeps pointing into the split (and its feature cache).
    """
    remap = {c: j for j, c in enumerate(class_ids)}
    idx = [i for i, label in enumerate(dataset.labels) if label in remap]
    if shots is not None:
        idx = list(few_shot(LabeledImages(idx, [dataset.labels[i] for i in idx]), shots, seed).items)
    return View(split, dataset, idx, [remap[dataset.labels[i]] for i in idx])


def harmonic_mean(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def run_cell(backbone: Backbone, name: str, splits: Dict[str, LabeledImages], classes: ClassSet,
             novel: Optional[ClassSet], base_ids: List[int], novel_ids: List[int], shots: int, seed: int) -> Dict:
    """Fit one method on one few-shot sample and score it on the test split: one results.csv row."""
    task = Task(classes, class_view("train", splits["train"], base_ids, shots, seed),
                class_view("val", splits["val"], base_ids, shots, seed), seed)
    method = METHODS[name]()
    cuda = backbone.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(backbone.device)
        torch.cuda.reset_peak_memory_stats(backbone.device)
        base_bytes = torch.cuda.memory_allocated(backbone.device)
    start = time.perf_counter()
    method.fit(backbone, task)
    if cuda:
        torch.cuda.synchronize(backbone.device)
    seconds = time.perf_counter() - start
    # CPU has no allocator statistics; the benchmark (benchmarks/bench_methods.py) measures it there.
    peak = torch.cuda.max_memory_allocated(backbone.device) - base_bytes if cuda else None

    test = class_view("test", splits["test"], base_ids)
    scores = classification_metrics(test.labels, method.predict_proba(backbone, test, classes), classes.names)
    row = {"method": name, "shots": shots, "seed": seed,
           **{k: scores[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "auroc")},
           "trainable_parameters": method.trainable_parameters(), "train_seconds": round(seconds, 3),
           "peak_memory_bytes": peak}
    if novel is not None:
        novel_acc = None
        if method.scores_unseen_classes:
            nv = class_view("test", splits["test"], novel_ids)
            novel_acc = classification_metrics(nv.labels, method.predict_proba(backbone, nv, novel),
                                               novel.names)["accuracy"]
        row.update(base_accuracy=scores["accuracy"], novel_accuracy=novel_acc,
                   harmonic_mean=harmonic_mean(scores["accuracy"], novel_acc))
    return row


def _corrupt(path: str, reason: str) -> CLIError:
    return CLIError(f"{path!r} is corrupt ({reason}); move it away to run the grid again, or choose another --out")


def read_results(path: str) -> List[Dict]:
    """Rows of a results.csv, numbers parsed, empty cells as None; a damaged file is a CLIError naming it."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise _corrupt(path, str(err)) from err
    missing = [c for c in ("method", "shots", "seed", "accuracy") if c not in header]
    if missing:
        raise _corrupt(path, f"no {', '.join(missing)} column")
    out = []
    for line, r in enumerate(rows, start=2):
        if None in r or None in r.values():
            raise _corrupt(path, f"line {line} has {'more' if None in r else 'fewer'} fields than the header")
        row = {}
        for k, v in r.items():
            try:
                if k == "method":
                    row[k] = v
                elif v == "":
                    row[k] = None
                elif k in ("shots", "seed", "trainable_parameters", "peak_memory_bytes"):
                    row[k] = int(float(v))
                else:
                    row[k] = float(v)
            except (ValueError, OverflowError):
                raise _corrupt(path, f"line {line}: {k} {v!r} is not a number") from None
        if not row["method"] or row["shots"] is None or row["seed"] is None:
            raise _corrupt(path, f"line {line} names no method, shots or seed")
        out.append(row)
    return out


def _cells(rows: List[Dict]) -> set:
    return {(r["method"], r["shots"], r["seed"]) for r in rows}


def write_results(path: str, rows: List[Dict], columns: List[str]) -> None:
    """results.csv, written atomically so a kill never leaves half a file."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
    atomic_write_text(path, buf.getvalue())


def _mean_std(values: List[Optional[float]]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _order(rows: List[Dict]) -> tuple:
    known = list(METHODS)
    methods = sorted({r["method"] for r in rows}, key=lambda m: (known.index(m) if m in known else len(known), m))
    shots = sorted({r["shots"] for r in rows})
    return methods, shots


def _table(rows: List[Dict], metric: str, methods, shots, marks: set = frozenset()) -> List[str]:
    lines = ["| method | " + " | ".join(f"{s}-shot" for s in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for m in methods:
        cells = [_mean_std([r.get(metric) for r in rows if r["method"] == m and r["shots"] == s])
                 + (" ⚠" if (m, s) in marks else "") for s in shots]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def collapsed_cells(rows: List[Dict], n_classes: int, n_test: int) -> List[Dict]:
    """Cells where a fitted method stays at chance while another method on the same shot count is well above it.

    Chance is ``1 / n_classes``; its noise on ``n_test`` test images is the
    binomial ``sigma = sqrt(c (1 - c) / n_test)``. A method whose mean accuracy
    over seeds is within 2 sigma of chance is flagged when the best method on
    the cell is more than 4 sigma above chance: a collapsed baseline, not a
    hard task. Zero-shot is never flagged (it fits nothing).

    Returns:
        ``{"method", "shots", "accuracy", "best", "best_accuracy"}`` per flagged cell.
    """
    chance = 1 / n_classes
    sigma = math.sqrt(chance * (1 - chance) / max(1, n_test))
    methods, shots = _order(rows)
    flagged = []
    for k in shots:
        means = {}
        for m in methods:
            vals = [r["accuracy"] for r in rows if r["method"] == m and r["shots"] == k and r["accuracy"] is not None]
            if vals:
                means[m] = float(np.mean(vals))
        if not means:
            continue
        best = max(means, key=means.get)
        if means[best] <= chance + 4 * sigma:
            continue
        for m, acc in means.items():
            if m != "zeroshot" and m != best and acc <= chance + 2 * sigma:
                flagged.append({"method": m, "shots": k, "accuracy": acc, "best": best, "best_accuracy": means[best]})
    return flagged


def render_report(rows: List[Dict], out_dir: str, header: Sequence[str] = (), n_classes: Optional[int] = None,
                  n_test: Optional[int] = None) -> List[Dict]:
    """``results.md`` (mean ± std over seeds per method and shot count) and ``accuracy_vs_shots.png``.

    Args:
        rows: results.csv rows (``read_results``).
        out_dir: where both files go.
        header: lines put under the title (the run's data, backbone, machine).
        n_classes, n_test: the classes scored and the test images; with both, accuracy cells of a method
            stuck at chance (``collapsed_cells``) are flagged with ⚠ and listed under "Sanity".

    Returns:
        the flagged cells.
    """
    if not rows:
        raise CLIError(f"no results to report in {out_dir!r}")
    methods, shots = _order(rows)
    body, flagged = report_sections(rows, n_classes, n_test)
    seeds = sorted({r["seed"] for r in rows})
    md = ["# Few-shot comparison", "", *header, "",
          f"Mean ± sample standard deviation over seeds {', '.join(map(str, seeds))}; test split; "
          "n/a where a metric is undefined or the method cannot score the classes.", "", *body]
    atomic_write_text(os.path.join(out_dir, "results.md"), "\n".join(md) + "\n")
    _plot(rows, methods, shots, os.path.join(out_dir, "accuracy_vs_shots.png"))
    return flagged


def report_sections(rows: List[Dict], n_classes: Optional[int] = None, n_test: Optional[int] = None,
                    level: str = "##") -> tuple:
    """The tables of ``results.md`` (metrics, sanity, cost) as Markdown lines, and the flagged cells.

    ``docs/generate.py`` renders the committed grids into docs/compare.md with it.
    """
    methods, shots = _order(rows)
    flagged = collapsed_cells(rows, n_classes, n_test) if n_classes and n_test else []
    md = []
    sections = [("Accuracy", "accuracy"), ("Balanced accuracy", "balanced_accuracy"), ("Macro F1", "macro_f1"),
                ("AUROC", "auroc")]
    if any(r.get("harmonic_mean") is not None or "novel_accuracy" in r for r in rows):
        sections = [("Base accuracy", "base_accuracy"), ("Novel accuracy", "novel_accuracy"),
                    ("Harmonic mean", "harmonic_mean")] + sections[1:]
    marks = {(f["method"], f["shots"]) for f in flagged}
    for title, key in sections:
        md += [f"{level} {title}", "", *_table(rows, key, methods, shots, marks if key == "accuracy" else set()), ""]
    if n_classes and n_test:
        md += [f"{level} Sanity", "", f"Chance is 1/{n_classes} = {1 / n_classes:.3f} on {n_test} test images. ⚠ marks a "
               "fitted method whose mean accuracy stays within 2 binomial standard deviations of chance while the "
               "best method on the same shot count is more than 4 above it: a collapsed baseline, not a hard task.",
               ""]
        md += [f"- ⚠ {f['method']} at {f['shots']}-shot: {f['accuracy']:.3f}, while {f['best']} reaches "
               f"{f['best_accuracy']:.3f}" for f in flagged] or ["No method is flagged."]
        md.append("")
    md += [f"{level} Cost", "", "| method | trainable parameters | train seconds (mean per cell) | "
           "peak memory (MiB, max) |", "|---|---|---|---|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        params = sorted({r["trainable_parameters"] for r in mine if r["trainable_parameters"] is not None})
        p = f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}–{params[-1]:,}" if params else "n/a"
        secs = np.mean([r["train_seconds"] for r in mine if r["train_seconds"] is not None])
        mem = [r["peak_memory_bytes"] for r in mine if r.get("peak_memory_bytes") is not None]
        md.append(f"| {m} | {p} | {secs:.2f} | {max(mem) / 2**20:.1f} |" if mem else f"| {m} | {p} | {secs:.2f} | n/a |")
    return md, flagged


def _plot(rows, methods, shots, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "harmonic_mean" if any(r.get("harmonic_mean") is not None for r in rows) else "accuracy"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        xs, ys, es = [], [], []
        for s in shots:
            vals = [r[key] for r in rows if r["method"] == m and r["shots"] == s and r.get(key) is not None]
            if vals:
                xs.append(s)
                ys.append(np.mean(vals))
                es.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
        if xs:
            style = "-" if m.startswith("nearl") else "--"
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, linestyle=style, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel(key.replace("_", " ") + " (test)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_save_figure(path, fig, dpi=110)
    finally:
        plt.close(fig)


def earlier_runs(path: str) -> List[Dict]:
    """The runs recorded in an existing ``machine.json``, oldest first: a run that adds cells to a grid
    (a resumed run, another method or seed) must not erase what made the cells already there."""
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict):
        return []
    runs = previous.pop("earlier_runs", [])
    return (runs if isinstance(runs, list) else []) + [previous]


def machine_info(args, device: torch.device, seconds: float, argv: Optional[List[str]]) -> Dict:
    """What ran the grid: CPU/GPU, versions, date, the command line."""
    import open_clip

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m nearl_model.compare " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
        "device": str(device), "seconds_this_run": round(seconds, 1),
    }


@contextlib.contextmanager
def locked(out: str, wait: Optional[float] = None):
    """Hold ``OUT/.nearl.lock`` (the lock ``nearl_model.train`` holds for a whole run) while the block runs.

    compare holds it only to read and rewrite its files, so runs sharing an
    ``--out`` take turns and each sees the cells the others wrote.
    """
    try:
        lock = open(os.path.join(out, LOCK_NAME), "a+")
    except OSError as err:
        raise CLIError(f"--out {out!r}: cannot open its lock file: {err}") from err
    wait = LOCK_WAIT_SECONDS if wait is None else wait
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CLIError(f"--out {out!r} has been locked by another nearl process for {wait:.0f}s "
                                   "(a training run?); wait for it or choose another --out") from None
                time.sleep(0.05)
        yield
    finally:
        lock.close()


def _read_settings(out: str) -> Optional[Dict]:
    """run.json's settings; None when absent, or damaged with no results beside it to vouch for."""
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
        if not isinstance(settings, dict):
            raise ValueError(f"a JSON {type(settings).__name__}, not an object")
    except ValueError as err:
        if not os.path.exists(os.path.join(out, "results.csv")):
            return None
        raise _corrupt(path, f"{err}; it records the settings of the results.csv beside it") from err
    return settings


def _settings_diff(previous: Optional[Dict], settings: Dict) -> Dict:
    return {} if previous is None else {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}


def _check_out(out: str, settings: Dict) -> None:
    """The output directory is writable and, if it holds results, they come from the same settings."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--out {out!r}: cannot create the directory: {err}") from err
    if not os.access(out, os.W_OK):
        raise CLIError(f"--out {out!r} is not writable")
    with locked(out):
        previous = _read_settings(out)
        diff = _settings_diff(previous, settings)
        if diff and os.path.exists(os.path.join(out, "results.csv")):
            raise CLIError(f"--out {out!r} holds results of different settings {diff} (old, new); "
                           "use another --out or remove its results.csv")
        read_results(os.path.join(out, "results.csv"))
        if previous != settings:
            with writing(out):
                atomic_write_text(os.path.join(out, "run.json"), json.dumps(settings, indent=2) + "\n")


def merge_cell(out: str, settings: Dict, row: Dict, columns: List[str]) -> List[Dict]:
    """Add ``row`` to ``OUT/results.csv`` as it is now on disk, under the lock; returns every row there.

    A cell another run wrote meanwhile is kept as that run wrote it.
    """
    csv_path = os.path.join(out, "results.csv")
    with locked(out):
        diff = _settings_diff(_read_settings(out), settings)
        if diff:
            raise CLIError(f"another compare run took --out {out!r} with different settings {diff} (theirs, ours) "
                           f"while this one ran; its cells stay as they are, and this run stops")
        rows = read_results(csv_path)
        if (row["method"], row["shots"], row["seed"]) not in _cells(rows):
            rows.append(row)
        with writing(out):
            write_results(csv_path, rows, columns)
    return rows


class Progress:
    """tqdm over the grid on a terminal; plain lines, at most every few seconds, otherwise."""

    def __init__(self, total: int, done: int, interval: float = 5.0):
        self.tty = sys.stdout.isatty()
        self.bar = tqdm(total=total, initial=done, desc="compare", disable=not self.tty, dynamic_ncols=True)
        self.total, self.done, self.interval = total, done, interval
        self.start, self.last = time.time(), 0.0
        self.new = 0

    def beat(self, text: str) -> None:
        if self.tty:
            self.bar.set_postfix_str(text[:60])
        elif time.time() - self.last >= self.interval:
            print(f"compare [{self.done}/{self.total}] {text}", flush=True)
            self.last = time.time()

    def cell(self, row: Dict) -> None:
        self.done += 1
        self.new += 1
        self.bar.update(1)
        elapsed = time.time() - self.start
        eta = elapsed / self.new * (self.total - self.done)
        text = (f"{row['method']} {row['shots']}-shot seed {row['seed']}: accuracy {row['accuracy']:.3f} "
                f"({row['train_seconds']:.1f}s); elapsed {elapsed:.0f}s, eta {eta:.0f}s")
        if self.tty:
            self.bar.set_postfix_str(text[:60])
        else:
            print(f"compare [{self.done}/{self.total}] {text}", flush=True)
            self.last = time.time()

    def skip(self) -> None:
        """A cell another run sharing --out finished first."""
        self.done += 1
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run(args, argv: Optional[List[str]] = None) -> int:
    """Run the missing cells of the grid ``args`` describes, then write the report; returns 0.

    Raises CLIError / DataError on bad input (``main`` turns them into exit code 2).
    """
    start = time.time()
    methods = parse_methods(args.methods)
    shots_list = parse_ints("--shots", args.shots)
    seeds = parse_ints("--seeds", args.seeds)
    if args.max_steps is not None and args.max_steps < 1:
        raise CLIError(f"--max-steps must be >= 1; got {args.max_steps}")
    device = pick_device(args.device)
    settings = {k: getattr(args, k) for k in RUN_KEYS}
    check_outputs("--out", args.out, [os.path.join(args.out, f) for f in OUT_FILES],
                  {"--data": args.data, "--classes": args.classes, "--model": args.model,
                   "--pretrained": args.pretrained})
    _check_out(args.out, settings)

    torch.manual_seed(args.backbone_seed)
    try:
        clip = create_clip(args.model, args.pretrained)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise CLIError(f"--model {args.model!r} / --pretrained {args.pretrained!r}: {err}") from err
    progress = None
    backbone = Backbone(clip, args.model, device, args.precision, args.max_steps,
                        heartbeat=lambda text: progress and progress.beat(text))
    data = load_dataset(args.data, backbone.image_size, args.classes, seed=0)
    template = args.prompt or default_template(args.data)
    try:
        class_prompts(data.classes, template)
    except ValueError as err:
        raise CLIError(f"--prompt: {err}") from err
    base_ids, novel_ids = split_classes(len(data.classes), args.base_to_novel)
    classes = ClassSet([data.classes[i] for i in base_ids], template)
    novel = ClassSet([data.classes[i] for i in novel_ids], template) if novel_ids else None

    columns = COLUMNS + (B2N_COLUMNS if args.base_to_novel else [])
    csv_path = os.path.join(args.out, "results.csv")
    with locked(args.out):
        done = _cells(read_results(csv_path))
    # Seed-major: a run cut short still has whole accuracy-vs-shots curves for the seeds it finished.
    grid = [(m, k, s) for s in seeds for k in shots_list for m in methods]
    todo = [cell for cell in grid if cell not in done]
    print(f"compare: {data.description}; classes {data.classes}"
          + (f" (base {classes.names}, novel {novel.names})" if novel else ""))
    print(f"compare: backbone {args.model} ({args.pretrained or f'random init, seed {args.backbone_seed}'}), "
          f"{device}, {args.precision}; {len(grid)} cells, {len(grid) - len(todo)} already in {csv_path}", flush=True)
    progress = Progress(len(grid), len(grid) - len(todo))
    try:
        for name, shots, seed in todo:
            with locked(args.out):
                # Another run sharing --out may have finished this cell since the grid was read.
                taken = (name, shots, seed) in _cells(read_results(csv_path))
            if taken:
                progress.skip()
                continue
            row = run_cell(backbone, name, data.splits, classes, novel, base_ids, novel_ids, shots, seed)
            merge_cell(args.out, settings, row, columns)
            progress.cell(row)
    finally:
        progress.close()
    seconds = time.time() - start
    info = machine_info(args, device, seconds, argv)
    header = [f"- data: {data.description}",
              f"- backbone: {args.model} ({args.pretrained or f'random init, seed {args.backbone_seed}'}), "
              f"{args.precision}, {info['device']}",
              f"- step cap: {args.max_steps or 'none (each paper schedule)'}",
              f"- machine: {info['cpu']} ({info['cpu_count']} cores), torch {info['torch']}, "
              f"open_clip {info['open_clip']}, {info['date']}",
              f"- command: `{info['command']}`"]
    with locked(args.out), writing(args.out):
        info["earlier_runs"] = earlier_runs(os.path.join(args.out, "machine.json"))
        if info["earlier_runs"]:
            header.append(f"- earlier runs into this folder: {len(info['earlier_runs'])} (commands in machine.json)")
        atomic_write_text(os.path.join(args.out, "machine.json"), json.dumps(info, indent=2) + "\n")
        flagged = render_report(read_results(csv_path), args.out, header, len(base_ids),
                                sum(1 for y in data.splits["test"].labels if y in base_ids))
    for f in flagged:
        print(f"compare: warning: {f['method']} stays at chance at {f['shots']}-shot ({f['accuracy']:.3f}, chance "
              f"{1 / len(base_ids):.3f}) while {f['best']} reaches {f['best_accuracy']:.3f}: a collapsed baseline; "
              "see the Sanity section of results.md", file=sys.stderr)
    print(f"wrote {args.out}/: results.csv, results.md, accuracy_vs_shots.png, machine.json ({seconds:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
