"""Attention maps (threshold masks, PNG grid) and run plots, all drawn with PIL."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.engine.visualize import (cls_attention, normalize_image, plot_run, save_attention_png,
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


def test_plot_run_draws_the_logged_curves(tmp_path):
    lines = [json.dumps({"step": s, "epoch": 0, "loss": 10 - s / 10, "teacher_entropy": math.log(16) - s / 100,
                         "lr": 1e-4}) for s in range(0, 100, 10)]
    lines[4] = json.dumps({**json.loads(lines[4]), "knn_top1": 12.5})
    lines[9] = json.dumps({**json.loads(lines[9]), "knn_top1": 31.0, "loss": float("nan")})
    _write_metrics(tmp_path / "run", lines + ['{"step": 100, "lo'])  # killed mid-write
    paths = plot_run(tmp_path / "run")
    assert [p.name for p in paths] == ["loss.png", "teacher_entropy.png", "knn_top1.png"]
    for p in paths:
        png = np.asarray(Image.open(p))
        assert png.shape == (400, 640, 3)
        assert (png == (31, 119, 180)).all(axis=2).any(), f"{p.name}: no curve drawn"


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_run(tmp_path)
    _write_metrics(tmp_path / "a", ['{"step": 1, "lr": 0.1}'])
    with pytest.raises(ValueError, match="no finite loss, teacher_entropy, knn_top1 values"):
        plot_run(tmp_path / "a")
    _write_metrics(tmp_path / "b", ['{"step": 1, "lo', '{"step": 2, "loss": 1.0}'])
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not JSON"):
        plot_run(tmp_path / "b")


def test_knn_chart_has_the_untrained_reference_and_titles_keep_their_spaces(tmp_path):
    from fastdino.engine.visualize import line_chart

    _write_metrics(tmp_path / "run", [json.dumps({"step": 10, "knn_top1": 40.0, "knn_top1_untrained": 25.0})])
    (path,) = plot_run(tmp_path / "run")
    png = np.asarray(Image.open(path))
    grey_rows = (png == (150, 150, 150)).all(axis=2).sum(axis=1)
    assert grey_rows.max() > 400  # a grey line across the plot
    title = np.asarray(line_chart([(0, 1.0)], title="a b c", xlabel="x"))[4:28]  # the title band
    ink_columns = np.flatnonzero((title < 128).all(axis=2).any(axis=0))
    gaps = np.diff(ink_columns) - 1
    assert (gaps >= 7).sum() == 2  # two word gaps over half the 13-px font (PIL's own space leaves 5 px)
