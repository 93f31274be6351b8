"""What a run leaves behind besides the checkpoint: history.csv, PNG plots, report.json + report.md."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display, safe on servers and in CI
import matplotlib.pyplot as plt
import numpy as np

from training.engine import EvalResult

HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "seconds")


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def plot_curves(out: Path, history: list[dict[str, float]]) -> list[Path]:
    """loss.png and accuracy.png: train vs validation per epoch."""
    epochs = [r["epoch"] for r in history]
    written = []
    for name, keys, ylabel in (
        ("loss.png", ("train_loss", "val_loss"), "cross-entropy loss"),
        ("accuracy.png", ("train_acc", "val_acc", "val_top5"), "accuracy"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key in keys:
            ax.plot(epochs, [r[key] for r in history], marker="o", label=key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        written.append(out / name)
    return written


def plot_confusion(path: Path, result: EvalResult, labels: list[str]) -> None:
    cm = result.confusion.numpy()
    k = len(labels)
    side = min(16, 2.5 + 0.5 * k)
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=100)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if k <= 40:  # beyond that, tick labels are unreadable anyway
        ax.set_xticks(range(k), labels, rotation=45, ha="right")
        ax.set_yticks(range(k), labels)
    if k <= 20:
        top = cm.max() or 1
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    color="white" if cm[i, j] > top / 2 else "black",
                    fontsize=8,
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (accuracy {result.accuracy:.2%})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_report(result: EvalResult, labels: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    per_class = {label: row for label, row in zip(labels, result.per_class(), strict=True)}
    macro = {
        m: sum(float(r[m]) for r in per_class.values()) / len(labels) for m in ("precision", "recall", "f1")
    }
    return {
        **extra,
        "samples": result.count,
        "top1": result.accuracy,
        "top5": result.top5,
        "loss": result.loss,
        "macro": macro,
        "per_class": per_class,
        "confusion_matrix": result.confusion.tolist(),
        "labels": labels,
    }


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json (everything) and report.md (the same, for people)."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    k = min(5, len(report["labels"]))
    lines = [
        f"# Evaluation report: {report.get('checkpoint', report.get('arch', 'model'))}",
        "",
        f"- data: `{report.get('data', '?')}` ({report['samples']} images)",
        f"- top-1 accuracy: **{report['top1']:.2%}**",
        f"- top-{k} accuracy: {report['top5']:.2%}",
        f"- loss: {report['loss']:.4f}",
        f"- macro precision / recall / F1: {report['macro']['precision']:.3f} / "
        f"{report['macro']['recall']:.3f} / {report['macro']['f1']:.3f}",
    ]
    if report.get("skipped_files"):
        lines.append(f"- unreadable files skipped: {report['skipped_files']}")
    if report.get("warning"):
        lines.append(f"- **warning**: {report['warning']}")
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label, r in report["per_class"].items():
        lines.append(
            f"| {label} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} | {r['support']} |"
        )
    if len(report["labels"]) <= 20:
        lines += ["", "Confusion matrix (rows: true, columns: predicted):", ""]
        lines.append("| | " + " | ".join(report["labels"]) + " |")
        lines.append("|---" * (len(report["labels"]) + 1) + "|")
        for label, row in zip(report["labels"], report["confusion_matrix"], strict=True):
            lines.append(f"| **{label}** | " + " | ".join(str(v) for v in row) + " |")
    lines += _calibration_lines(report.get("calibration"))
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _calibration_lines(cal: dict[str, Any] | None) -> list[str]:
    if not cal:
        return []
    lines = [
        "",
        "## Calibration (temperature scaling, fitted on the validation split)",
        "",
        f"- temperature T = {cal['temperature']:.4g} (the service serves softmax(logits / T))"
        + (f" ({cal['note']})" if cal.get("note") else ""),
        f"- expected calibration error ({cal['bins']} bins): {cal['ece_before']:.4f} before, "
        f"**{cal['ece_after']:.4f}** after",
        f"- negative log-likelihood: {cal['nll_before']:.4f} before, {cal['nll_after']:.4f} after",
        "",
        "![reliability diagram](reliability.png)",
        "",
        "Sample predictions, mistakes first:",
        "",
        "![sample predictions](samples.png)",
    ]
    return lines


def plot_reliability(path: Path, cal: dict[str, Any]) -> None:
    """Accuracy against confidence per bin, before and after scaling; a calibrated model's bars
    reach the diagonal."""
    bins = int(cal["bins"])
    edges = np.linspace(0, 1, bins + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), dpi=100, sharey=True)
    for ax, key, title in (
        (axes[0], "before", f"before (T = 1): ECE {cal['ece_before']:.4f}"),
        (axes[1], "after", f"after (T = {cal['temperature']:.3g}): ECE {cal['ece_after']:.4f}"),
    ):
        rel = cal["reliability"][key]
        acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
        ax.bar(edges[:-1], acc, width=1 / bins, align="edge", edgecolor="black", alpha=0.75, label="accuracy")
        shown = [i for i, k in enumerate(rel["count"]) if k]  # empty bins have no point
        ax.scatter([rel["confidence"][i] for i in shown], [acc[i] for i in shown], s=12, color="black",
                   zorder=3, label="(mean confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"reliability on {cal['images']} validation images")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_order(predicted: Sequence[int], targets: Sequence[int], confidence: Sequence[float]) -> list[int]:
    """Indices in the order samples.png shows them: mistakes first, the most confident first (a confident
    mistake is a label bug or a real confusion), then correct ones, the least confident first (the
    borderline cases). Ties keep the data set's order."""
    idx = range(len(targets))
    wrong = sorted((i for i in idx if predicted[i] != targets[i]), key=lambda i: (-confidence[i], i))
    right = sorted((i for i in idx if predicted[i] == targets[i]), key=lambda i: (confidence[i], i))
    return wrong + right


def plot_samples(
    path: Path, images: Sequence[np.ndarray], truths: Sequence[str], preds: Sequence[str],
    probs: Sequence[float], cols: int = 8,
) -> None:
    """A grid of (H, W, C) images in [0, 1] titled true / predicted + probability; mistakes in red."""
    n = len(images)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), dpi=100, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        image = images[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        wrong = truths[i] != preds[i]
        ax.set_title(f"true {truths[i]}\npred {preds[i]} {probs[i]:.0%}", fontsize=7,
                     color="#c00000" if wrong else "#006000")
    fig.suptitle("validation samples: mistakes first (red), then the least confident correct ones",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_all(
    out: Path,
    result: EvalResult,
    labels: list[str],
    extra: dict[str, Any],
    history: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    if history:
        write_history(out / "history.csv", history)
        plot_curves(out, history)
    plot_confusion(out / "confusion_matrix.png", result, labels)
    report = build_report(result, labels, extra)
    write_report(out, report)
    return report
