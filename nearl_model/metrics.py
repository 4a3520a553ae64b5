"""Classification metrics (scikit-learn) and the run's plots (matplotlib)."""

from typing import Dict, List, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support,
    roc_auc_score,
)

from ._io import atomic_save_figure


def classification_metrics(labels: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> Dict:
    """Accuracy, balanced accuracy, macro F1, AUROC, per-class table and confusion matrix.

    AUROC is binary for two classes and macro one-vs-rest above; it is None
    when a class is missing from ``labels`` (it is undefined then).
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    preds = probs.argmax(axis=1)
    all_labels = list(range(k))
    present = set(labels.tolist())
    auroc = None
    if len(present) == k and k >= 2:
        if k == 2:
            auroc = float(roc_auc_score(labels, probs[:, 1]))
        else:
            auroc = float(roc_auc_score(labels, probs / probs.sum(1, keepdims=True), multi_class="ovr",
                                        average="macro", labels=all_labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=all_labels, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=all_labels, average="macro", zero_division=0)),
        "auroc": auroc,
        "per_class": [
            {"class": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support)
        ],
        "confusion_matrix": confusion_matrix(labels, preds, labels=all_labels).tolist(),
    }


def format_scores(metrics: Dict) -> str:
    """One line: accuracy, balanced accuracy, macro F1 and AUROC ("n/a" where undefined)."""
    auroc = "n/a" if metrics["auroc"] is None else f"{metrics['auroc']:.3f}"
    return (f"accuracy {metrics['accuracy']:.3f}  balanced accuracy {metrics['balanced_accuracy']:.3f}  "
            f"macro F1 {metrics['macro_f1']:.3f}  AUROC {auroc}")


def format_per_class(metrics: Dict) -> str:
    rows = [f"{'class':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for r in metrics["per_class"]:
        rows.append(f"{r['class'][:23]:<24}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>10.3f}{r['support']:>9d}")
    return "\n".join(rows)


def plot_curves(history: List[Dict], path: str) -> None:
    """Training loss and validation accuracy/AUROC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    for key in ("accuracy", "balanced_accuracy", "auroc"):
        values = [h["val"].get(key) for h in history]
        if all(v is not None for v in values):
            ax2.plot(epochs, values, marker="o", label=key.replace("_", " "))
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1.02)
    ax2.legend(loc="lower right")
    ax2.set_title("validation")
    fig.tight_layout()
    try:
        atomic_save_figure(path, fig, dpi=100)
    finally:
        plt.close(fig)


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: str, title: str = "test") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title(f"confusion matrix ({title})")
    fig.tight_layout()
    try:
        atomic_save_figure(path, fig, dpi=100)
    finally:
        plt.close(fig)
