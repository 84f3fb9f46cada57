"""Pictures, drawn with PIL only: self-attention maps of a backbone and line charts of a run's metrics.

Attention maps follow DINO's `visualize_attention.py` (Caron et al. 2021, Sec. 4.2.2 and Fig. 3): the CLS
query's attention over the patches in each head of the last block, and per head the mask of the highest-
attention patches that together hold `threshold` (60 %) of that head's attention mass.
"""
import colorsys
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from fastdino.engine.backbone_io import atomic_write
from fastdino.pipelines.config import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

PLOTTED_METRICS = ("loss", "teacher_entropy", "knn_top1")
# Each picture of the attention grid is drawn at least this tall or wide (patches stay sharp blocks), so a map of
# a 32-px image is readable; larger images keep their size.
MIN_PANEL_PX = 224
_BAND_PX = 28  # the column titles above the grid and the caption below it
_REFERENCE_COLOR = (150, 150, 150)
# Anchors of matplotlib's viridis colormap at 0, 1/4, 1/2, 3/4, 1, linearly interpolated between.
_LINE_COLOR = (31, 119, 180)
_VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]) / 255.0


def load_image(image, shorter_side: int | None = None) -> torch.Tensor:
    """A path (any format PIL reads) or a (3, H, W) float tensor in [0, 1] -> (3, H, W) float32 in [0, 1],
    resized (bicubic, antialiased) so that its shorter side is `shorter_side` when given. A large file is
    reduced while it is decoded, never held at full resolution as floats."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be (3, H, W) RGB in [0, 1], got shape {tuple(image.shape)}")
        image = image.detach().float().cpu()
        size = _resized(image.shape[-2:], shorter_side)
        if size == tuple(image.shape[-2:]):
            return image
        return F.interpolate(image[None], size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            height, width = _resized((img.height, img.width), shorter_side)
            img.draft("RGB", (width, height))  # JPEG: decode at a reduced scale when that is enough
            img = img.convert("RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
            rgb = np.asarray(img)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)


def _resized(size, shorter_side: int | None) -> tuple[int, int]:
    """(height, width) scaled so that the shorter side is `shorter_side` (unchanged for None)."""
    height, width = int(size[0]), int(size[1])
    if not shorter_side:
        return height, width
    scale = shorter_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def crop_to_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Center crop of a (3, H, W) image to the largest multiples of `patch_size` (DINO crops the same way)."""
    height, width = image.shape[-2:]
    h, w = height // patch_size * patch_size, width // patch_size * patch_size
    top, left = (height - h) // 2, (width - w) // 2
    return image[:, top:top + h, left:left + w]


def normalize_image(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> the network's input normalisation (the pipelines' ImageNet statistics)."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None] / 255.0  # the pipelines keep them in 0..255 units
    std = torch.tensor(IMAGENET_STD)[:, None, None] / 255.0
    return (image - mean) / std


def threshold_masks(attn: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """(H, n) attention rows -> (H, n) bool: per row, the largest entries holding `threshold` of the row's mass."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    vals, order = attn.sort(dim=1)  # ascending
    cum = (vals / vals.sum(dim=1, keepdim=True)).cumsum(dim=1)
    # Drop the smallest entries while what they hold stays within 1 - threshold (DINO's `cumval > 1 - threshold`).
    return torch.zeros_like(cum, dtype=torch.bool).scatter(1, order, cum > 1 - threshold)


@torch.no_grad()
def cls_attention(backbone, image: torch.Tensor, threshold: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS-to-patch attention of the last block for a (3, H, W) image in [0, 1].

    Returns (attn (heads, H/p, W/p) fp32, masks (heads, H/p, W/p) bool). H and W must be multiples of the
    patch size p.
    """
    p = backbone.patch_size
    height, width = image.shape[-2:]
    if height < p or width < p:
        raise ValueError(f"image {width}x{height} is smaller than one {p}x{p} patch")
    if height % p or width % p:
        raise ValueError(f"image size {width}x{height} is not a multiple of the patch size {p}: crop or resize it, "
                         f"e.g. to {width // p * p}x{height // p * p}")
    device = next(backbone.parameters()).device
    x = normalize_image(image)[None].to(device)  # (1, 3, H, W)
    backbone.eval()
    attn = backbone.get_last_self_attention(x)[0, :, 0, 1:].float().cpu()  # (heads, n): CLS row, patch columns
    masks = threshold_masks(attn, threshold)
    grid = (height // p, width // p)
    return attn.reshape(-1, *grid), masks.reshape(-1, *grid)  # (heads, H/p, W/p)


def attention_grid(image: torch.Tensor, attn: torch.Tensor, masks: torch.Tensor, threshold: float = 0.6) -> Image.Image:
    """PNG-ready grid: row 1 = image, then each head's attention (viridis, scaled to the head's max);
    row 2 = image, then each head's mask over the image. Every panel is enlarged by a whole factor to at least
    MIN_PANEL_PX on its shorter side; columns are titled above, the rows explained below.
    Size ((heads + 1) * W * f, 2 * H * f + 2 * _BAND_PX) for an H x W image and factor f."""
    heads, (height, width) = attn.shape[0], image.shape[-2:]
    scale = height // attn.shape[1]
    heat = attn / attn.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    heat_rgb = _colormap(_upsample(heat, scale))  # (heads, 3, H, W)
    colors = torch.tensor([colorsys.hsv_to_rgb(h / heads, 0.9, 1.0) for h in range(heads)])[:, :, None, None]
    mask = _upsample(masks, scale)[:, None]  # (heads, 1, H, W)
    overlay = torch.where(mask, 0.5 * image + 0.5 * colors, 0.35 * image)  # (heads, 3, H, W)
    rows = [torch.cat([image, *heat_rgb], dim=-1), torch.cat([image, *overlay], dim=-1)]  # (3, H, (heads+1)*W)
    factor = max(1, math.ceil(MIN_PANEL_PX / min(height, width)))
    grid = _upsample(torch.cat(rows, dim=-2).clamp(0, 1), factor)  # (3, 2H*f, (heads+1)*W*f)
    pixels = Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy())
    canvas = Image.new("RGB", (pixels.width, pixels.height + 2 * _BAND_PX), "white")
    canvas.paste(pixels, (0, _BAND_PX))
    draw, font = ImageDraw.Draw(canvas), _font(14)
    panel = width * factor
    titles = [f"image {width}x{height}", *(f"head {h + 1}" for h in range(heads))]
    for column, title in enumerate(titles):
        _text(draw, (column * panel + panel / 2, _BAND_PX / 2), title, font, anchor="mm")
    _text(draw, (canvas.width / 2, canvas.height - _BAND_PX / 2),
          f"top: last block's CLS attention per head (brighter = more); bottom: the patches holding "
          f"{threshold:.0%} of it", font, anchor="mm")
    return canvas


def save_attention_png(backbone, image, output_png, *, threshold: float = 0.6, image_size: int | None = None) -> Path:
    """Write `attention_grid` of `image` (path or (3, H, W) tensor in [0, 1]) to `output_png`.

    As DINO's visualize_attention does, the image is first resized, here so that its shorter side is
    `image_size` (default: the size the backbone was trained at), and center-cropped to multiples of the patch
    size: a huge photo does not run the ViT at full resolution. `image_size=0` keeps the image as it is (its
    sides must then be multiples of the patch size)."""
    side = backbone.patch_embed.img_size[0] if image_size is None else image_size
    if side < 0:
        raise ValueError(f"image_size must be >= 0, got {side}")
    image = load_image(image, shorter_side=side or None)
    if side:
        image = crop_to_patches(image, backbone.patch_size)
    attn, masks = cls_attention(backbone, image, threshold)
    grid = attention_grid(image, attn, masks, threshold)
    path = atomic_write(output_png, lambda tmp: grid.save(tmp, format="PNG"))
    logger.info("wrote %d-head attention maps of a %dx%d input to %s", attn.shape[0], image.shape[-1],
                image.shape[-2], path)
    return path


def _upsample(t: torch.Tensor, scale: int) -> torch.Tensor:
    """(heads, h, w) -> (heads, h * scale, w * scale): each patch becomes a scale x scale block."""
    return t.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _colormap(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) values in [0, 1] -> (..., 3, H, W) viridis RGB."""
    pos = values.clamp(0, 1) * (len(_VIRIDIS) - 1)
    lo = pos.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def read_metrics(path) -> list[dict]:
    """Records of a metrics.jsonl; a truncated last line (a run killed mid-write) is skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not JSON ({err})") from err
            logger.warning("%s:%d: skipping a truncated last line", path, number)
    return records


def plot_run(run_dir) -> list[Path]:
    """PNG line charts of loss, teacher_entropy and knn_top1 vs step from RUN_DIR/metrics.jsonl, written to
    RUN_DIR/plots/<metric>.png (metrics the run never logged are skipped); the k-NN chart has the untrained
    network's accuracy as a grey reference line when the run measured it. Returns the paths written."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written = []
    for key in PLOTTED_METRICS:
        points = [(r["step"], float(r[key])) for r in records
                  if r.get(key) is not None and math.isfinite(float(r[key]))]
        untrained = [r["knn_top1_untrained"] for r in records if key == "knn_top1" and "knn_top1_untrained" in r]
        reference = ("untrained network", float(untrained[-1])) if untrained else None
        if points:
            chart = line_chart(points, title=f"{key} vs step ({run_dir.name})", xlabel="step", reference=reference)
            written.append(atomic_write(run_dir / "plots" / f"{key}.png", lambda tmp: chart.save(tmp, format="PNG")))
    if not written:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no finite {', '.join(PLOTTED_METRICS)} values to plot")
    return written


def line_chart(points, *, title: str, xlabel: str, size=(640, 400),
               reference: tuple[str, float] | None = None) -> Image.Image:
    """A PIL line chart of (x, y) points, with 5 labelled ticks per axis; `reference` = (label, y) adds a
    labelled grey horizontal line."""
    width, height = size
    left, right, top, bottom = 72, 20, 32, 48
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = _font(13)
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    (x0, x1), (y0, y1) = _span(xs), _span(ys + ([reference[1]] if reference else []))

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        tx, ty = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        px, _ = to_px(tx, y0)
        _, py = to_px(x0, ty)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px, height - bottom + 6), f"{tx:.4g}", fill="black", font=font, anchor="ma")
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((left - 6, py), f"{ty:.4g}", fill="black", font=font, anchor="rm")
    _text(draw, (width / 2, 8), title, font, anchor="ma")
    _text(draw, (width / 2, height - 16), xlabel, font, anchor="ma")
    if reference:
        label, value = reference
        _, py = to_px(x0, value)
        draw.line([left + 1, py, width - right - 1, py], fill=_REFERENCE_COLOR, width=2)
        _text(draw, (left + 6, py - 3), f"{label}: {value:.4g}", font, anchor="ld", fill=_REFERENCE_COLOR)
    pixels = [to_px(x, y) for x, y in zip(xs, ys)]
    if len(pixels) > 1:
        draw.line(pixels, fill=_LINE_COLOR, width=2)
    else:  # one point has no line: mark it
        (px, py), = pixels
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=_LINE_COLOR)
    return img


def _font(size: int):
    """PIL's built-in font at `size` px (a fixed-size bitmap font where PIL has no FreeType)."""
    return ImageFont.load_default(size=size)


def _text(draw, xy, text: str, font, *, anchor: str, fill="black") -> None:
    """draw.text with word gaps of at least a third of the font size: the built-in font's space is ~2 px wide,
    which runs words together ("lossvsstep")."""
    space = font.getlength(" ")
    size = getattr(font, "size", 10)
    text = text.replace(" ", " " * max(1, math.ceil(size / 3 / max(space, 1))))
    draw.text(xy, text, fill=fill, font=font, anchor=anchor)


def _span(values) -> tuple[float, float]:
    """(min, max) of values, widened when they are all equal so the axis has a length."""
    lo, hi = min(values), max(values)
    pad = 0.5 * abs(lo) + 0.5 if lo == hi else 0.0
    return lo - pad, hi + pad
