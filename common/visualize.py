"""Saving figures and images, and the plots of the DeeBERT early-exit script.

`save` writes a Matplotlib Figure or an image array to disk: raster formats (.png/.jpg/.jpeg) go
through OpenCV, everything else (.pdf, .svg, .eps, ...) through Matplotlib. Writes are atomic (a
temporary file in the same folder, then `os.replace`), so an interrupted run never leaves a
half-written image behind. Figures are built with `matplotlib.figure.Figure` and the Agg canvas,
never pyplot, so importing this module does not touch the user's global backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from common.io import atomic_path

__all__ = ["UnsupportedImageError", "figure_to_array", "plot_early_exit_sweep", "plot_metric_per_layer",
           "plot_remaining_weights", "plot_threshold_schedule", "plot_training_curves", "save"]

# Extensions written by cv2.imwrite; every other extension goes through Matplotlib's savefig.
_CV2_EXTENSIONS = {".png", ".jpg", ".jpeg"}
_JPEG_EXTENSIONS = {".jpg", ".jpeg"}
_SWEEP_KEYS = ("threshold", "metric", "avg_exit_layer", "speedup")
# Floats a hair outside [0, 1] (rounding in a normalisation) are clipped; anything further is an error.
_FLOAT_TOLERANCE = 1e-6


class UnsupportedImageError(ValueError, TypeError):
    """An object that is neither a Figure nor a numpy array; a ValueError (and TypeError) for callers."""


def _new_figure(figsize: tuple[float, float], dpi: float = 120) -> Figure:
    """A Figure with its own Agg canvas: renderable and savable without pyplot or a global backend."""
    fig = Figure(figsize=figsize, dpi=dpi, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _figure_to_rgba(fig: Figure) -> np.ndarray:
    """Render `fig` with Agg and return an (H, W, 4) uint8 RGBA copy of its pixels.

    A figure whose canvas cannot render to a buffer (a bare `Figure()` has a FigureCanvasBase) gets
    an Agg canvas for the duration of the call and its own canvas back afterwards.
    """
    canvas = fig.canvas
    if hasattr(canvas, "buffer_rgba"):
        canvas.draw()
        return np.array(canvas.buffer_rgba(), dtype=np.uint8, copy=True)
    agg = FigureCanvasAgg(fig)  # attaches itself to fig
    try:
        agg.draw()
        return np.array(agg.buffer_rgba(), dtype=np.uint8, copy=True)
    finally:
        fig.set_canvas(canvas)


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """Composite (H, W, 4) uint8 RGBA over a white background and return (H, W, 3) uint8 RGB."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a Matplotlib Figure to an (H, W, 3) RGB uint8 array (transparent areas shown on white).

    H and W are the figure's size in pixels (inches times dpi); used by `save` and by tests/scripts
    that want to inspect or combine rendered plots.
    """
    if not isinstance(fig, Figure):
        raise UnsupportedImageError(f"figure_to_array expects a matplotlib Figure, got {type(fig).__name__}")
    return _flatten_alpha(_figure_to_rgba(fig))


def _as_uint8_image(array: np.ndarray) -> np.ndarray:
    """Check an image array's shape and dtype and return it as uint8 (H, W), (H, W, 3) or (H, W, 4).

    Floats must lie in [0, 1] and are scaled to 0..255; (H, W, 1) is treated as grayscale.
    """
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"unsupported image shape {array.shape}: expected (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"cannot save an empty image of shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError("float image contains NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"float image values must lie in [0, 1], got [{low:g}, {high:g}] "
                "(divide by 255, or pass a uint8 array)"
            )
        return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {array.dtype}: expected uint8, or float in [0, 1]")


def _to_cv2_layout(image: np.ndarray, jpeg: bool) -> np.ndarray:
    """Reorder uint8 RGB/RGBA to OpenCV's BGR/BGRA; JPEG has no alpha, so RGBA is composited on white."""
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    if image.shape[2] == 4 and jpeg:
        image = _flatten_alpha(image)
    if image.shape[2] == 3:
        return np.ascontiguousarray(image[..., ::-1])
    return np.ascontiguousarray(image[..., [2, 1, 0, 3]])


def _array_figure(image: np.ndarray) -> Figure:
    """Put a uint8 image on a figure of the same pixel size, filling it with no axes, for savefig."""
    dpi = 100
    height, width = image.shape[:2]
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    if image.ndim == 3 and image.shape[2] == 4:
        fig.patch.set_alpha(0.0)  # keep the image's own transparency
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    if image.ndim == 2:
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect="auto")
    else:
        ax.imshow(image, interpolation="nearest", aspect="auto")
    return fig


def save(obj: Figure | np.ndarray, path: str | os.PathLike[str]) -> str:
    """Save a Figure or an image array to `path` atomically and return the path as a string.

    Arrays: (H, W) grayscale, (H, W, 3) RGB or (H, W, 4) RGBA, uint8 or float in [0, 1].
    .png/.jpg/.jpeg are written with cv2.imwrite (channels reordered to BGR/BGRA; a Figure is
    rendered with Agg first); other extensions with Matplotlib's savefig. The parent folder is
    created. Raises ValueError for an unsupported object, shape, dtype or extension, and OSError
    naming the path if the image cannot be written.
    """
    path = os.fspath(path)
    if not isinstance(obj, (Figure, np.ndarray)):
        raise UnsupportedImageError(
            f"cannot save {type(obj).__module__}.{type(obj).__name__} to {path}: "
            "expected a matplotlib Figure or a numpy image array"
        )
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        raise ValueError(f"{path}: no file extension; add one such as .png, .jpg, .pdf or .svg")
    if ext not in _CV2_EXTENSIONS:
        supported = FigureCanvasBase.get_supported_filetypes()
        if ext[1:] not in supported:
            names = ", ".join(sorted({".jpeg", ".jpg", ".png"} | {f".{k}" for k in supported}))
            raise ValueError(f"{path}: unsupported image format {ext!r} (supported: {names})")

    # Validate and convert before anything touches the disk.
    if ext in _CV2_EXTENSIONS:
        image = _figure_to_rgba(obj) if isinstance(obj, Figure) else _as_uint8_image(obj)
        payload: Any = _to_cv2_layout(image, jpeg=ext in _JPEG_EXTENSIONS)
    else:
        payload = obj if isinstance(obj, Figure) else _array_figure(_as_uint8_image(obj))

    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with atomic_path(path, suffix=ext) as tmp:
        if ext in _CV2_EXTENSIONS:
            try:
                ok = cv2.imwrite(tmp, payload)
            except cv2.error as err:
                raise OSError(f"could not write image {path}: {err}") from err
            if not ok:
                raise OSError(f"could not write image {path} (cv2.imwrite returned False)")
        else:
            payload.savefig(tmp, format=ext[1:])
    return path


def plot_metric_per_layer(
    layer_scores: Sequence[float],
    metric_name: str,
    title: str | None = None,
    full_model_score: float | None = None,
) -> Figure:
    """Line plot of the metric reached by each exit layer (x = 1..L), with the full model as a dashed line.

    Shows how good each DeeBERT off-ramp is on its own; returns the Figure (the first line holds the scores).
    """
    scores = [float(s) for s in layer_scores]
    if not scores:
        raise ValueError("plot_metric_per_layer needs at least one layer score")
    layers = list(range(1, len(scores) + 1))
    fig = _new_figure((6, 4))
    ax = fig.add_subplot()
    ax.plot(layers, scores, marker="o", label="exit at layer")
    if full_model_score is not None:
        ax.axhline(float(full_model_score), linestyle="--", color="gray",
                   label=f"full model ({float(full_model_score):.4g})")
        ax.legend(loc="best")
    ax.set_xlabel("Exit layer")
    ax.set_ylabel(metric_name)
    ax.set_title(title if title is not None else f"{metric_name} per exit layer")
    if len(layers) <= 24:
        ax.set_xticks(layers)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return fig


def plot_early_exit_sweep(
    points: Sequence[Mapping[str, float]],
    metric_name: str,
    title: str | None = None,
) -> Figure:
    """Two panels of an entropy-threshold sweep: metric vs average exit layer, and metric vs measured speed-up
    (with a dashed line at 1.0x, no speed-up).

    Each point needs `threshold`, `metric`, `avg_exit_layer` and `speedup` (optional `num_layers` sets the
    exit-layer axis range). Points are drawn in threshold order and labelled with their threshold, placed so
    that labels do not overlap (see `_label_points`).
    """
    if not points:
        raise ValueError("plot_early_exit_sweep needs at least one point")
    for i, point in enumerate(points):
        missing = [key for key in _SWEEP_KEYS if key not in point]
        if missing:
            raise ValueError(f"sweep point {i} is missing key(s) {', '.join(missing)}: {dict(point)}")
    ordered = sorted(points, key=lambda p: float(p["threshold"]))
    thresholds = [float(p["threshold"]) for p in ordered]
    metrics = [float(p["metric"]) for p in ordered]
    exit_layers = [float(p["avg_exit_layer"]) for p in ordered]
    speedups = [float(p["speedup"]) for p in ordered]

    fig = _new_figure((11, 4))
    ax_layer, ax_speed = fig.subplots(1, 2)
    panels = (
        (ax_layer, exit_layers, "Average exit layer"),
        (ax_speed, speedups, "Measured speed-up (×)"),
    )
    for ax, xs, xlabel in panels:
        ax.plot(xs, metrics, marker="o")
        ax.margins(x=0.08, y=0.15)  # room for the threshold labels at the edges
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_name)
        ax.grid(True, alpha=0.3)
    ax_speed.axvline(1.0, color="0.35", linestyle="--", linewidth=1.2, label="no speed-up (1.0×)")
    ax_speed.legend(loc="best", fontsize=8)
    num_layers = [int(p["num_layers"]) for p in ordered if p.get("num_layers")]
    if num_layers:
        ax_layer.set_xlim(0.5, max(num_layers) + 0.5)
        ax_layer.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_layer.set_title("Metric vs average exit layer (labels: threshold)")
    ax_speed.set_title("Metric vs speed-up (labels: threshold)")
    fig.suptitle(title if title is not None else f"Early-exit sweep: {metric_name}")
    fig.draw_without_rendering()  # the layout, the axis limits and the legend's place are final from here on
    for ax, xs, _ in panels:
        _label_points(ax, xs, metrics, [f"{t:g}" for t in thresholds])
    return fig


_LABEL_FONTSIZE = 8
# Where a label may go, tried in order: (dx, dy) offsets in points from its point, the text on that side of it.
# The first ones touch the point; the others are further out and get a thin leader line.
_LABEL_NEAR = ((4, 4), (4, -4), (-4, 4), (-4, -4), (0, 8), (0, -8))
_LABEL_FAR = tuple((dx, dy) for dy in (16, -16, 28, -28, 40, -40) for dx in (10, -10, 0))


def _label_points(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> None:
    """Annotate points with labels that overlap neither each other, nor any marker, nor the legend, and stay
    inside the axes. Points whose markers mostly overlap share one label ("0, 0.05, 0.1"; "0–0.3" for more than three);
    each label takes the first free spot near its point, else one further out with a leader line; a label with
    no free spot anywhere is left out. Needs the final layout (draw the figure first)."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    px_per_pt = fig.dpi / 72.0
    pixels = ax.transData.transform(np.column_stack([xs, ys]))
    radius = ax.lines[0].get_markersize() / 2 * px_per_pt
    marker = radius + px_per_pt
    taken = [Bbox.from_extents(x - marker, y - marker, x + marker, y + marker) for x, y in pixels]
    legend = ax.get_legend()
    if legend is not None:
        taken.append(legend.get_window_extent(renderer))
    inside = ax.get_window_extent(renderer)
    groups: list[list[int]] = []
    for i, (x, y) in enumerate(pixels):
        near = next((g for g in groups if np.hypot(*(pixels[g[0]] - (x, y))) <= radius), None)
        near.append(i) if near is not None else groups.append([i])
    for group in groups:
        names = [labels[i] for i in group]
        text = ", ".join(names) if len(names) <= 3 else f"{names[0]}–{names[-1]}"
        probe = Text(0, 0, text, fontsize=_LABEL_FONTSIZE)
        probe.set_figure(fig)
        size = probe.get_window_extent(renderer)
        width, height = size.width, size.height
        x, y = pixels[group[0]]
        for far, (dx, dy) in [(False, o) for o in _LABEL_NEAR] + [(True, o) for o in _LABEL_FAR]:
            left = x + dx * px_per_pt - (0 if dx > 0 else width if dx < 0 else width / 2)
            bottom = y + dy * px_per_pt - (0 if dy > 0 else height)
            box = Bbox.from_bounds(left - 1, bottom - 1, width + 2, height + 2)
            if not (inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)) or \
                    any(box.overlaps(other) for other in taken):
                continue
            taken.append(box)
            ax.annotate(text, (xs[group[0]], ys[group[0]]), textcoords="offset points", xytext=(dx, dy),
                        fontsize=_LABEL_FONTSIZE, ha="left" if dx > 0 else "right" if dx < 0 else "center",
                        va="bottom" if dy > 0 else "top",
                        arrowprops=dict(arrowstyle="-", color="0.4", linewidth=0.7, shrinkA=0, shrinkB=4)
                        if far else None)
            break


def plot_training_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str | None = None,
    xlabel: str = "Optimization step",
) -> Figure:
    """One small panel per curve (name -> (steps, values)): loss terms of different scales each keep a readable
    y range. Panels follow the mapping's order, three per row."""
    named = [(name, [float(x) for x in xs], [float(y) for y in ys]) for name, (xs, ys) in curves.items()]
    named = [(name, xs, ys) for name, xs, ys in named if xs]
    if not named:
        raise ValueError("plot_training_curves needs at least one non-empty curve")
    for name, xs, ys in named:
        if len(xs) != len(ys):
            raise ValueError(f"curve {name!r} has {len(xs)} steps but {len(ys)} values")
    cols = min(3, len(named))
    rows = -(-len(named) // cols)
    fig = _new_figure((4.2 * cols, 3.0 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, xs, ys) in zip(axes, named):
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None)
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel(xlabel)
    for ax in axes[len(named):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def plot_remaining_weights(
    fractions: Mapping[int, Mapping[str, float]],
    title: str | None = None,
    units: Mapping[int, str] | None = None,
) -> Figure:
    """Movement pruning: the fraction of weights kept in each encoder layer (rows) and matrix (columns), as
    an annotated heat map, and each layer's overall fraction as bars.

    `fractions[layer][matrix]` is in [0, 1]; the bars weigh every matrix equally unless `fractions[layer]`
    has an `"_layer"` entry, which is used instead (the exact fraction of the layer's weights). `units[layer]`
    (structured pruning: e.g. "5/12 heads, 800/1536 neurons") is written on that layer's bar."""
    if not fractions:
        raise ValueError("plot_remaining_weights needs at least one layer")
    layers = sorted(fractions)
    matrices = list(dict.fromkeys(m for layer in layers for m in fractions[layer] if m != "_layer"))
    grid = np.array([[float(fractions[layer].get(m, np.nan)) for m in matrices] for layer in layers])
    per_layer = [float(fractions[layer].get("_layer", np.nanmean(grid[i]))) for i, layer in enumerate(layers)]
    fig = _new_figure((4 + 1.3 * len(matrices), 1.5 + 0.45 * len(layers)))
    ax_map, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(matrices), 1), 2]})
    image = ax_map.imshow(100 * grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(layers)):
        for j in range(len(matrices)):
            if np.isfinite(grid[i, j]):
                ax_map.text(j, i, f"{100 * grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if grid[i, j] < 0.6 else "black")
    ax_map.set_xticks(range(len(matrices)))
    ax_map.set_xticklabels(matrices, rotation=30, ha="right", fontsize=8)
    ax_map.set_yticks(range(len(layers)))
    ax_map.set_yticklabels([str(layer) for layer in layers])
    ax_map.set_ylabel("Encoder layer")
    ax_map.set_title("Remaining weights per matrix (%)")
    fig.colorbar(image, ax=ax_map, fraction=0.04)
    ax_bar.barh(range(len(layers)), [100 * v for v in per_layer], color="tab:blue")
    for i, layer in enumerate(layers):
        if units and layer in units:
            ax_bar.text(2, i, units[layer], va="center", fontsize=7, color="black")
    ax_bar.set_yticks(range(len(layers)))
    ax_bar.set_yticklabels([str(layer) for layer in layers])
    ax_bar.invert_yaxis()  # same order as the heat map (layer 0 on top)
    ax_bar.set_xlim(0, 100)
    ax_bar.set_xlabel("Remaining weights (%)")
    ax_bar.set_title("Per layer")
    ax_bar.grid(True, axis="x", alpha=0.3)
    fig.suptitle(title if title is not None else "Remaining weights after pruning")
    return fig


def plot_threshold_schedule(
    steps: Sequence[int],
    thresholds: Sequence[float],
    threshold_label: str = "threshold",
    lambdas: Sequence[float] | None = None,
    measured: Mapping[int, float] | None = None,
    title: str | None = None,
) -> Figure:
    """The pruning schedule over training: the threshold at each step (left axis), the regularization
    lambda if given (right axis, dashed), and measured remaining-weight fractions as points."""
    if len(steps) == 0 or len(steps) != len(thresholds):
        raise ValueError("plot_threshold_schedule needs one threshold per step (and at least one step)")
    fig = _new_figure((7, 4))
    ax = fig.add_subplot()
    ax.plot(list(steps), [float(t) for t in thresholds], color="tab:blue", label=threshold_label)
    if measured:
        xs = sorted(measured)
        ax.plot(xs, [float(measured[x]) for x in xs], "o", color="tab:green", markersize=4,
                label="remaining weights (measured)")
    ax.set_xlabel("Optimization step")
    ax.set_ylabel(threshold_label)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if lambdas is not None and any(float(v) != 0 for v in lambdas):
        ax_lambda = ax.twinx()
        ax_lambda.plot(list(steps), [float(v) for v in lambdas], "--", color="tab:red", label="regularization lambda")
        ax_lambda.set_ylabel("lambda")
        more_handles, more_labels = ax_lambda.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="best")
    ax.set_title(title if title is not None else "Pruning schedule")
    return fig
