"""Drawing the analyses and the demo's outputs with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402


def save_figure(fig: "plt.Figure", path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_similarity(result: Mapping[str, Any], path: str) -> None:
    """Fig. 2: (a) intra/inter-class mean cosine per window size, (b) per layer."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, xlabel, title in ((axes[0], "windows", "window size k (k×k)", "(a) local, after layer "
                                    f"{result['window_layer']}"), (axes[1], "layers", "layer", "(b) global")):
        entries = result[key]
        xs = [int(k) for k in entries]
        for name, marker in (("intra_class", "o"), ("inter_class", "s")):
            ys = [entries[k][name] if entries[k][name] is not None else np.nan for k in entries]
            ax.plot(xs, ys, marker=marker, label=name.replace("_", "-"))
        if key == "windows":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean cosine similarity")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_sweep(result: Mapping[str, Any], path: str) -> None:
    """Fig. 4: mIoU, images/s and GFLOPs over τ; the baseline as a dashed line, ALGM* marked."""
    rows = result["sweep"]
    taus = [row["tau"] for row in rows]
    metrics = [("mIoU", "mIoU (%)"), ("images_per_second", "images/s")]
    if any(row.get("gflops") is not None for row in rows):
        metrics.append(("gflops", "GFLOPs"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4))
    star = result.get("algm_star")
    for ax, (key, label) in zip(np.atleast_1d(axes), metrics):
        ax.plot(taus, [row.get(key) if row.get(key) is not None else np.nan for row in rows], marker="o",
                label="ALGM, τ at inference")
        if result["baseline"].get(key) is not None:
            ax.axhline(result["baseline"][key], linestyle="--", color="gray", label="no merging")
        if star is not None and star.get(key) is not None:
            ax.plot([star["tau"]], [star[key]], marker="*", markersize=14, color="crimson", linestyle="none",
                    label=f"ALGM* (τ={star['tau']:g})")
        ax.set_xlabel("τ")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    save_figure(fig, path)


def group_colors(count: int, seed: int = 0) -> np.ndarray:
    """``count`` distinct-ish RGB colors in [0, 1] (shuffled HSV hues, fixed seed)."""
    hues = np.random.default_rng(seed).permutation(count) / max(count, 1)
    return matplotlib.colors.hsv_to_rgb(np.stack([hues, np.full(count, 0.85), np.full(count, 0.95)], axis=1))


def merge_overlay(image: np.ndarray, grid: Tuple[int, int], groups: Sequence[Sequence[int]],
                  alpha: float = 0.55) -> np.ndarray:
    """``image`` ``[H, W, 3]`` uint8 (H, W = grid × patch) with each merged group's cells tinted in its own color
    and unmerged cells dimmed; returns uint8."""
    h, w = grid
    patch_h, patch_w = image.shape[0] // h, image.shape[1] // w
    tint = np.zeros((h * w, 3))
    mask = np.zeros(h * w, dtype=bool)
    for color, cells in zip(group_colors(len(groups)), groups):
        tint[list(cells)] = color
        mask[list(cells)] = True
    tint = np.repeat(np.repeat(tint.reshape(h, w, 3), patch_h, 0), patch_w, 1)
    mask = np.repeat(np.repeat(mask.reshape(h, w), patch_h, 0), patch_w, 1)[..., None]
    base = image[: h * patch_h, : w * patch_w].astype(np.float64) / 255.0
    out = np.where(mask, (1 - alpha) * base + alpha * tint, 0.6 * base)
    return (out * 255).round().astype(np.uint8)


def plot_merging(image: np.ndarray, grid: Tuple[int, int], panels: Mapping[str, Sequence[Sequence[int]]],
                 path: str) -> None:
    """Fig. 5: the input and, per merging layer, its groups drawn over it."""
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3.4 * (1 + len(panels)), 3.6))
    axes = np.atleast_1d(axes)
    axes[0].imshow(image)
    axes[0].set_title("input")
    for ax, (title, groups) in zip(axes[1:], panels.items()):
        ax.imshow(merge_overlay(image, grid, groups))
        ax.set_title(title, fontsize=9)
    for ax in axes:
        ax.axis("off")
    save_figure(fig, path)


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]], ignore_color: Tuple[int, int, int] = (0, 0, 0)
             ) -> np.ndarray:
    """``[H, W]`` class ids → ``[H, W, 3]`` uint8 in the dataset's palette (ids outside it get ``ignore_color``)."""
    table = np.array(list(palette) + [ignore_color], dtype=np.uint8)
    index = np.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return table[index]


def plot_segmentation(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                      palette: Sequence[Sequence[int]], path: str, alpha: float = 0.6) -> List[int]:
    """The image with its predicted classes blended in the palette's colors and a legend of the classes present;
    returns those classes (by pixel count, most first)."""
    colored = colorize(labels, palette)
    blend = ((1 - alpha) * image.astype(np.float64) + alpha * colored).round().astype(np.uint8)
    ids, counts = np.unique(labels, return_counts=True)
    present = [int(i) for i in ids[np.argsort(-counts, kind="stable")] if 0 <= i < len(class_names)]
    fig, ax = plt.subplots(figsize=(6, 6 * image.shape[0] / max(image.shape[1], 1)))
    ax.imshow(blend)
    ax.axis("off")
    handles = [Patch(color=np.array(palette[i]) / 255.0, label=class_names[i]) for i in present]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    save_figure(fig, path)
    return present
