"""Tests for common.visualize: channel order, formats, atomic writes and the early-exit plot builders."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from common import visualize
from common.visualize import figure_to_array, plot_early_exit_sweep, plot_metric_per_layer, save


def _small_figure(width_in: float = 3.0, height_in: float = 2.0, dpi: int = 50) -> Figure:
    """A bare Figure (FigureCanvasBase, no pyplot) with one line on it."""
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    fig.add_subplot().plot([0, 1, 2], [1, 0, 1])
    return fig


def _leftovers(folder) -> list[str]:
    """Temporary files that save() may have left behind in `folder`."""
    return [name for name in os.listdir(folder) if ".tmp" in name]


def test_rgb_red_pixel_is_stored_in_bgr_order(tmp_path):
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[1, 2] = (255, 0, 0)  # pure red in RGB
    out = save(image, tmp_path / "red.png")
    assert out == str(tmp_path / "red.png")
    back = cv2.imread(out, cv2.IMREAD_UNCHANGED)
    assert back.shape == (4, 5, 3)
    assert back[1, 2].tolist() == [0, 0, 255]  # BGR: red lands in the last channel
    assert back[0, 0].tolist() == [0, 0, 0]
    assert np.array_equal(back[..., ::-1], image)


def test_rgba_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 7, 4), dtype=np.uint8)
    out = save(image, tmp_path / "rgba.png")
    back = cv2.imread(out, cv2.IMREAD_UNCHANGED)
    assert back.shape == (6, 7, 4)
    assert np.array_equal(back[..., [2, 1, 0, 3]], image)


def test_grayscale_round_trip(tmp_path):
    image = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    back = cv2.imread(save(image, tmp_path / "gray.png"), cv2.IMREAD_UNCHANGED)
    assert back.shape == (6, 10)
    assert np.array_equal(back, image)


def test_float_image_is_scaled_to_uint8(tmp_path):
    image = np.zeros((3, 3, 3), dtype=np.float32)
    image[0, 0] = (1.0, 0.0, 0.0)
    image[2, 2] = (0.5, 0.5, 0.5)
    back = cv2.imread(save(image, tmp_path / "float.png"), cv2.IMREAD_UNCHANGED)
    assert back[0, 0].tolist() == [0, 0, 255]
    assert back[2, 2].tolist() == [128, 128, 128]


def test_float_image_out_of_range_raises(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        save(np.full((2, 2), 255.0), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_jpeg_rgb_keeps_colour_order(tmp_path):
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[..., 0] = 255  # solid red
    back = cv2.imread(save(image, tmp_path / "red.jpg"))
    b, g, r = back[8, 8].tolist()
    assert r > 200 and g < 60 and b < 60


def test_figure_png_has_figure_pixel_size(tmp_path):
    fig = _small_figure(3.0, 2.0, dpi=50)
    back = cv2.imread(save(fig, tmp_path / "fig.png"), cv2.IMREAD_UNCHANGED)
    assert back.shape[:2] == (100, 150)
    # The bare figure keeps its own canvas after being rendered through Agg.
    assert type(fig.canvas).__name__ == "FigureCanvasBase"


def test_figure_to_array_is_rgb_uint8():
    array = figure_to_array(_small_figure(2.0, 1.0, dpi=40))
    assert array.shape == (40, 80, 3)
    assert array.dtype == np.uint8
    assert array[0, 0].tolist() == [255, 255, 255]  # white figure background


@pytest.mark.parametrize("obj", [_small_figure(), np.zeros((8, 8, 3), dtype=np.uint8)], ids=["figure", "array"])
def test_pdf_and_svg_go_through_matplotlib(tmp_path, monkeypatch, obj):
    def no_cv2(*args, **kwargs):
        raise AssertionError("cv2.imwrite must not be used for vector formats")

    monkeypatch.setattr(visualize.cv2, "imwrite", no_cv2)
    pdf = save(obj, tmp_path / "out.pdf")
    with open(pdf, "rb") as handle:
        assert handle.read(4) == b"%PDF"
    svg = save(obj, tmp_path / "out.svg")
    with open(svg, encoding="utf-8") as handle:
        assert "<svg" in handle.read()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "image",
    [np.zeros((4,), np.uint8), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)],
    ids=["1d", "two-channels", "4d"],
)
def test_unsupported_shape_raises(tmp_path, image):
    with pytest.raises(ValueError, match="shape"):
        save(image, tmp_path / "bad.png")
    assert os.listdir(tmp_path) == []


def test_unsupported_object_and_extension_raise(tmp_path):
    with pytest.raises(ValueError, match="Figure or a numpy"):
        save([[0, 1], [1, 0]], tmp_path / "list.png")
    with pytest.raises(ValueError, match="unsupported image format"):
        save(np.zeros((2, 2), np.uint8), tmp_path / "img.notaformat")
    with pytest.raises(ValueError, match="extension"):
        save(np.zeros((2, 2), np.uint8), tmp_path / "noext")


def test_parent_folder_is_created(tmp_path):
    target = tmp_path / "a" / "b" / "img.png"
    assert save(np.zeros((2, 2), np.uint8), target) == str(target)
    assert target.is_file()


def test_no_temp_file_left_and_existing_file_replaced(tmp_path):
    target = tmp_path / "img.png"
    save(np.zeros((2, 2), np.uint8), target)
    save(np.full((3, 3), 200, np.uint8), target)
    assert sorted(os.listdir(tmp_path)) == ["img.png"]
    assert cv2.imread(str(target), cv2.IMREAD_UNCHANGED).shape == (3, 3)


def test_failing_write_leaves_nothing(tmp_path, monkeypatch):
    def exploding_imwrite(filename, img, *args):
        with open(filename, "wb") as handle:  # a half-written file, then a crash
            handle.write(b"\x89PNG partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(visualize.cv2, "imwrite", exploding_imwrite)
    target = tmp_path / "out" / "img.png"
    with pytest.raises(RuntimeError, match="disk on fire"):
        save(np.zeros((2, 2, 3), np.uint8), target)
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_imwrite_false_raises_oserror_naming_path(tmp_path, monkeypatch):
    monkeypatch.setattr(visualize.cv2, "imwrite", lambda *args, **kwargs: False)
    target = tmp_path / "img.png"
    with pytest.raises(OSError, match="img.png"):
        save(np.zeros((2, 2), np.uint8), target)
    assert os.listdir(tmp_path) == []


def test_failing_savefig_leaves_nothing(tmp_path, monkeypatch):
    fig = _small_figure()

    def exploding_savefig(fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"%PDF partial")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(fig, "savefig", exploding_savefig)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        save(fig, tmp_path / "fig.pdf")
    assert os.listdir(tmp_path) == []


def test_plot_metric_per_layer():
    scores = [0.61, 0.7, 0.74, 0.8, 0.83, 0.85]
    fig = plot_metric_per_layer(scores, "accuracy", full_model_score=0.86)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    line = ax.lines[0]
    assert list(line.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert np.allclose(line.get_ydata(), scores)
    assert len(ax.lines) == 2 and ax.lines[1].get_linestyle() == "--"
    assert np.allclose(ax.lines[1].get_ydata(), 0.86)
    assert ax.get_xlabel() and ax.get_ylabel() == "accuracy"
    assert list(ax.get_xticks()) == [1, 2, 3, 4, 5, 6]
    assert tuple(fig.get_size_inches()) == (6, 4) and fig.dpi == 120
    assert figure_to_array(fig).shape == (480, 720, 3)  # renders without pyplot


def test_plot_metric_per_layer_without_full_model():
    fig = plot_metric_per_layer([0.5, 0.6], "f1", title="custom")
    ax = fig.axes[0]
    assert len(ax.lines) == 1
    assert ax.get_title() == "custom"


def test_plot_early_exit_sweep():
    points = [
        {"threshold": 0.0, "metric": 0.86, "avg_exit_layer": 12.0, "speedup": 1.0, "num_layers": 12},
        {"threshold": 0.2, "metric": 0.84, "avg_exit_layer": 8.5, "speedup": 1.3, "num_layers": 12},
        {"threshold": 0.5, "metric": 0.78, "avg_exit_layer": 4.2, "speedup": 2.4, "num_layers": 12},
    ]
    fig = plot_early_exit_sweep(points, "accuracy")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    ax_layer, ax_speed = fig.axes
    assert np.allclose(ax_layer.lines[0].get_xdata(), [12.0, 8.5, 4.2])
    assert np.allclose(ax_speed.lines[0].get_xdata(), [1.0, 1.3, 2.4])
    for ax in fig.axes:
        assert np.allclose(ax.lines[0].get_ydata(), [0.86, 0.84, 0.78])
        assert [t.get_text() for t in ax.texts] == ["0", "0.2", "0.5"]
        assert ax.get_xlabel() and ax.get_ylabel() == "accuracy"
    assert tuple(fig.get_size_inches()) == (11, 4)


def test_plot_early_exit_sweep_marks_no_speedup_and_keeps_close_labels_apart():
    # a real sweep's shape: small thresholds barely move, the first three land on one spot
    rows = [(0.0, 0.912, 12.0, 1.0), (0.01, 0.912, 12.0, 1.0), (0.02, 0.912, 12.0, 1.0), (0.05, 0.910, 11.9, 1.04),
            (0.1, 0.909, 11.8, 1.06), (0.15, 0.905, 11.6, 1.09), (0.2, 0.90, 9.1, 1.3), (0.3, 0.88, 7.5, 1.55),
            (0.4, 0.85, 6.0, 1.9), (0.5, 0.80, 4.5, 2.4), (0.6, 0.74, 3.0, 3.3), (0.7, 0.65, 1.8, 4.6)]
    points = [{"threshold": t, "metric": m, "avg_exit_layer": layer, "speedup": x, "num_layers": 12}
              for t, m, layer, x in rows]
    fig = plot_early_exit_sweep(points, "accuracy")
    figure_to_array(fig)  # the final draw
    renderer = fig.canvas.get_renderer()
    ax_layer, ax_speed = fig.axes
    no_speedup = ax_speed.lines[1]
    assert list(no_speedup.get_xdata()) == [1.0, 1.0] and no_speedup.get_linestyle() == "--"
    assert [t.get_text() for t in ax_speed.get_legend().get_texts()] == ["no speed-up (1.0×)"]
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.texts]
        assert labels[0] == "0, 0.01, 0.02"  # one label for the points on one spot
        assert sorted(t for label in labels for t in label.split(", ")) == sorted(f"{r[0]:g}" for r in rows)
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text alone, not a leader line
        for i, box in enumerate(boxes):
            assert ax.bbox.contains(box.x0, box.y0) and ax.bbox.contains(box.x1, box.y1), labels[i]
            for j in range(i):
                assert not box.overlaps(boxes[j]), (labels[i], labels[j])


def test_plot_early_exit_sweep_rejects_missing_keys():
    with pytest.raises(ValueError, match="speedup"):
        plot_early_exit_sweep([{"threshold": 0.1, "metric": 0.8, "avg_exit_layer": 6}], "accuracy")


def test_import_and_plotting_do_not_touch_pyplot():
    code = (
        "import sys; from common.visualize import plot_metric_per_layer, figure_to_array; "
        "figure_to_array(plot_metric_per_layer([0.1, 0.2], 'acc')); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
