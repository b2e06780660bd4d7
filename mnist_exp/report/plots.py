"""Pictures of a run, drawn on matplotlib's Agg canvas (no pyplot state) from what is handed in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mnist_exp.names import TEST_ACCURACY, TEST_LOSS, TRAIN_LOSS, VAL_ACCURACY, VAL_LOSS

# The metrics the learning curves draw: losses in the left panel, accuracies in the right.
_LOSSES = (TRAIN_LOSS, VAL_LOSS, TEST_LOSS)
_ACCURACIES = (VAL_ACCURACY, TEST_ACCURACY)
CURVES = _LOSSES + _ACCURACIES


def confusion_matrix(targets: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    """Counts with true classes as rows and predicted classes as columns (int64)."""
    flat = targets.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: Tensor) -> dict[int, float]:
    """Accuracy on the images of each true class; classes with no images are left out."""
    totals = confusion.sum(1)
    return {
        k: float(confusion[k, k]) / float(totals[k]) for k in range(len(totals)) if totals[k] > 0
    }


def learning_curves(history: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> None:
    """Losses and accuracies by step: `train_loss` raw and as a moving average, the rest markers."""
    figure, canvas = _figure(10, 4)
    loss_ax, acc_ax = figure.subplots(1, 2)
    figure.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
    for key in CURVES:
        steps, values = _unzip(history.get(key, ()))
        if key == TRAIN_LOSS and len(values) > 1:
            loss_ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.6)
            window = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            loss_ax.plot(steps[window - 1 :], smooth, color="tab:blue", label=key)
        elif len(values):
            ax = loss_ax if key in _LOSSES else acc_ax
            ax.plot(steps, values, marker="o", label=key)
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    if loss_ax.has_data():
        loss_ax.set_yscale("log")
    canvas.print_png(path)


def confusion_plot(confusion: Tensor, path: Path, class_names: Sequence[str] = ()) -> None:
    """The confusion matrix as a heat map with the count in every non-empty cell."""
    n = len(confusion)
    names = list(class_names) or [str(k) for k in range(n)]
    counts = confusion.numpy()
    figure, canvas = _figure(5.4, 5.4)
    ax = figure.add_axes((0.12, 0.1, 0.84, 0.82))
    ax.imshow(counts, cmap="Blues")
    threshold = counts.max() / 2 if counts.size else 0
    for i, j in zip(*np.nonzero(counts), strict=True):
        color = "white" if counts[i, j] > threshold else "black"
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(n), names)
    ax.set_yticks(range(n), names)
    ax.set(xlabel="predicted", ylabel="true")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"test confusion matrix ({counts.sum()} images, accuracy {accuracy:.4f})")
    canvas.print_png(path)


def misclassified_grid(
    images: Tensor,
    targets: Tensor,
    predictions: Tensor,
    path: Path,
    class_names: Sequence[str] = (),
    limit: int = 36,
) -> int:
    """The first `limit` misclassified images (uint8 `N x C x H x W`, gray or RGB), titled
    `true -> predicted` by name or index, as one mosaic (one `imshow` is much faster than a
    subplot each); the count."""
    wrong = torch.nonzero(targets != predictions).flatten()[:limit]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    channels, height, width = images.shape[1:]
    band, gap = 9, 2  # pixels above each image for its title, between images
    cell_h, cell_w = height + band + gap, width + gap
    mosaic = np.full((rows * cell_h, cols * cell_w, channels), 255, dtype=np.uint8)
    figure, canvas = _figure(cols * 1.1, rows * 1.35 + 0.4)
    ax = figure.add_axes((0, 0, 1, 1 - 0.4 / (rows * 1.35 + 0.4)))
    for n, index in enumerate(wrong.tolist()):
        top, left = (n // cols) * cell_h + band, (n % cols) * cell_w
        pixels = images[index].permute(1, 2, 0).numpy()  # H x W x C
        mosaic[top : top + height, left : left + width] = 255 - pixels
        pair = (int(targets[index]), int(predictions[index]))
        title = " -> ".join(class_names[k] if class_names else str(k) for k in pair)
        ax.text(left + width / 2, top - 1, title, ha="center", va="bottom", fontsize=8)
    shown_mosaic = mosaic[..., 0] if channels == 1 else mosaic  # imshow: H x W or H x W x 3
    ax.imshow(shown_mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_axis_off()
    total = int((targets != predictions).sum())
    shown = f"first {len(wrong)} of {total}" if total > len(wrong) else f"all {total}"
    figure.suptitle(f"misclassified test images, true -> predicted ({shown})", fontsize=9)
    canvas.print_png(path)
    return total


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A Figure (inches) and its Agg canvas; axes go by hand (automatic layouts cost more)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    return figure, FigureCanvasAgg(figure)


def _unzip(pairs: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    steps_values = np.asarray(pairs, dtype=float).reshape(-1, 2)
    return steps_values[:, 0], steps_values[:, 1]
