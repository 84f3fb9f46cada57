"""Attention maps (threshold masks, the PIL grid) and the matplotlib figure of runs' metrics."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.engine.visualize import (cls_attention, normalize_image, plot_runs, save_attention_png,
                                       threshold_masks)
from fastdino.engine.vit import build_backbone


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16, img_size=32).eval()
    # At init (std 0.02) q.k is ~0 and every head attends uniformly; sharpen the last block so heads differ.
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight.mul_(3)
    return model


def test_threshold_masks_keep_the_top_60_percent_of_the_mass():
    attn = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.7, 0.05, 0.15], [0.25, 0.25, 0.25, 0.25]])
    expected = torch.tensor([
        [True, True, False, False],   # 0.5 alone < 0.6; 0.5 + 0.3 holds it
        [False, True, False, False],  # 0.7 alone holds it
        [True, True, True, False],    # ties: 3 of 4 quarters
    ])
    masks = threshold_masks(attn, 0.6)
    assert masks.sum(1).tolist() == expected.sum(1).tolist()
    assert torch.equal(masks[:2], expected[:2])


def test_attention_png_is_enlarged_titled_and_heads_differ(backbone, tmp_path):
    image = torch.rand(3, 32, 48)  # 2 x 3 patches, not square
    path = save_attention_png(backbone, image, tmp_path / "attn.png")
    png = np.asarray(Image.open(path))
    heads, f, band = backbone.num_heads, 7, 28  # 32 px enlarged 7 x to reach 224 px; title and caption bands
    assert png.shape == (2 * 32 * f + 2 * band, (heads + 1) * 48 * f, 3)
    grid = png[band:-band]
    # First column of both rows is the image itself, each pixel a f x f block.
    expected = (image * 255).round().byte().permute(1, 2, 0).numpy().repeat(f, 0).repeat(f, 1)
    assert np.array_equal(grid[:32 * f, :48 * f], expected) and np.array_equal(grid[32 * f:, :48 * f], expected)
    for strip in (png[:band], png[-band:]):  # the titles and the caption are drawn
        assert (strip < 128).all(axis=2).sum() > 50
    tiles = [grid[:32 * f, 48 * f * (h + 1): 48 * f * (h + 2)] for h in range(heads)]
    for a in range(heads):
        for b in range(a + 1, heads):
            assert not np.array_equal(tiles[a], tiles[b]), f"heads {a} and {b} drew the same map"
    attn, masks = cls_attention(backbone, image)
    assert attn.shape == masks.shape == (heads, 2, 3)
    torch.testing.assert_close(attn.sum(dim=(1, 2)), torch.ones(heads) - _cls_self_attention(backbone, image))


def test_large_input_runs_at_the_model_size_unless_asked(backbone, tmp_path, monkeypatch):
    from fastdino.engine import visualize

    seen = []
    real = visualize.cls_attention
    monkeypatch.setattr(visualize, "cls_attention", lambda b, image, t: seen.append(image.shape) or real(b, image, t))
    Image.fromarray(np.random.randint(0, 255, (1500, 2400, 3), dtype=np.uint8)).save(tmp_path / "big.jpg")
    save_attention_png(backbone, tmp_path / "big.jpg", tmp_path / "a.png")
    save_attention_png(backbone, torch.rand(3, 1000, 700), tmp_path / "b.png")
    save_attention_png(backbone, torch.rand(3, 64, 80), tmp_path / "c.png", image_size=48)
    save_attention_png(backbone, torch.rand(3, 64, 80), tmp_path / "d.png", image_size=0)  # as it is
    # shorter side -> 32 (the backbone's size), then center-cropped to multiples of the 16-px patch
    assert seen == [(3, 32, 48), (3, 32, 32), (3, 48, 48), (3, 64, 80)]
def _cls_self_attention(backbone, image):
    """What the CLS query gives to itself: the rest of its row is the patch attention."""
    with torch.no_grad():
        return backbone.get_last_self_attention(normalize_image(image)[None])[0, :, 0, 0]


def test_attention_from_an_image_file_and_bad_sizes(backbone, tmp_path):
    Image.fromarray(np.random.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img.jpg")
    path = save_attention_png(backbone, tmp_path / "img.jpg", tmp_path / "out" / "attn.png")
    assert Image.open(path).size == ((backbone.num_heads + 1) * 32 * 7, 64 * 7 + 2 * 28)
    with pytest.raises(ValueError, match=r"image size 40x32 is not a multiple of the patch size 16"):
        save_attention_png(backbone, torch.rand(3, 32, 40), tmp_path / "x.png", image_size=0)
    with pytest.raises(ValueError, match=r"image 8x8 is smaller than one 16x16 patch"):
        save_attention_png(backbone, torch.rand(3, 8, 8), tmp_path / "x.png", image_size=0)
    assert not (tmp_path / "x.png").exists()


def _write_metrics(run_dir, lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))


def _rows(steps, **columns):
    """Metrics rows at `steps` (8 steps per epoch), each column a function of the step."""
    return [json.dumps({"step": s, "epoch": s / 8, **{k: f(s) for k, f in columns.items()}}) for s in steps]


def test_plot_runs_overlays_runs_with_a_panel_per_metric_present(tmp_path):
    """Two runs with partly different columns (b logs a loss term a does not, a logs k-NN b does not): one panel per
    metric in order of appearance, each run drawn only where it has the metric; PNG and SVG written."""
    a = _rows(range(0, 200, 10), loss=lambda s: 9 - s / 50, teacher_entropy=lambda s: 5 - s / 100,
              lr=lambda s: 1e-4 * s)
    a[5] = json.dumps({**json.loads(a[5]), "knn_top1": 20.0, "knn_top1_untrained": 12.0})
    a[19] = json.dumps({**json.loads(a[19]), "knn_top1": 31.0, "loss": float("nan")})
    _write_metrics(tmp_path / "a", a + ['{"step": 200, "lo'])  # killed mid-write
    _write_metrics(tmp_path / "b", _rows(range(0, 120, 10), loss=lambda s: 8 - s / 40, lr=lambda s: 2e-4,
                                         **{"loss/dino": lambda s: 7 - s / 40}))
    plot = plot_runs([tmp_path / "a", tmp_path / "b"])
    assert plot.panels == {"loss": ["a", "b"], "teacher_entropy": ["a"], "lr": ["a", "b"], "knn_top1": ["a"],
                           "loss/dino": ["b"]}
    assert [p.name for p in plot.paths] == ["compared.png", "compared.svg"]
    assert all(p.parent == tmp_path / "a" / "plots" for p in plot.paths)
    width, height = Image.open(plot.paths[0]).size
    assert width > height > 400  # 3 x 2 panels at 150 dpi
    assert "<svg" in plot.paths[1].read_text()[:500]


def test_a_run_with_one_logged_step_plots(tmp_path):
    _write_metrics(tmp_path / "run", _rows([2], loss=lambda s: 6.2, knn_top1=lambda s: 10.0))
    plot = plot_runs([tmp_path / "run"], output=tmp_path / "out" / "fig.png")
    assert plot.panels == {"loss": ["run"], "knn_top1": ["run"]}
    assert [p.name for p in plot.paths] == ["fig.png", "fig.svg"] and all(p.is_file() for p in plot.paths)


def test_plot_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_runs([tmp_path])
    _write_metrics(tmp_path / "a", ['{"step": 1, "epoch": 0.1, "partial": true}'])
    with pytest.raises(ValueError, match="no numeric metrics to plot"):
        plot_runs([tmp_path / "a"])
    _write_metrics(tmp_path / "b", ['{"step": 1, "lo', '{"step": 2, "loss": 1.0}'])
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not JSON"):
        plot_runs([tmp_path / "b"])
