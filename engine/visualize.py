"""Pictures: self-attention maps of a backbone (pixel grids, drawn with PIL) and figures of runs' metrics
(matplotlib).

Attention maps follow DINO's `visualize_attention.py` (Caron et al. 2021, Sec. 4.2.2 and Fig. 3): the CLS
query's attention over the patches in each head of the last block, and per head the mask of the highest-
attention patches that together hold `threshold` (60 %) of that head's attention mass.
"""
import colorsys
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from fastdino.files import atomic_write
from fastdino.pipelines.config import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

# Each picture of the attention grid is drawn at least this tall or wide (patches stay sharp blocks), so a map of
# a 32-px image is readable; larger images keep their size.
MIN_PANEL_PX = 224
_BAND_PX = 28  # the column titles above the grid and the caption below it
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def attention_image(backbone, image, *, threshold: float = 0.6, image_size: int | None = None):
    """(`attention_grid` of `image` (path or (3, H, W) tensor in [0, 1]), its (heads, h, w) attention, the size fed).

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
    return attention_grid(image, attn, masks, threshold), attn, tuple(image.shape[-2:])


def save_attention_png(backbone, image, output_png, *, threshold: float = 0.6, image_size: int | None = None) -> Path:
    """Write `attention_image` of `image` to `output_png`; returns the path."""
    grid, attn, (height, width) = attention_image(backbone, image, threshold=threshold, image_size=image_size)
    path = atomic_write(output_png, lambda tmp: grid.save(tmp, format="PNG"))
    logger.info("wrote %d-head attention maps of a %dx%d input to %s", attn.shape[0], width, height, path)
    return path


def first_val_image(data_path) -> Path | None:
    """The image the runs draw attention maps of: the first image file of the dataset's val split, when that split
    is a folder (None otherwise)."""
    from fastdino.pipelines import resolve_split

    val = Path(resolve_split(data_path, "val"))
    if not val.is_dir():
        return None
    return next(iter(sorted(p for p in val.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)), None)


def _upsample(t: torch.Tensor, scale: int) -> torch.Tensor:
    """(heads, h, w) -> (heads, h * scale, w * scale): each patch becomes a scale x scale block."""
    return t.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _colormap(values: torch.Tensor) -> torch.Tensor:
    """(..., H, W) values in [0, 1] -> (..., 3, H, W) viridis RGB."""
    from matplotlib import colormaps

    rgb = colormaps["viridis"](values.clamp(0, 1).numpy())[..., :3]  # (..., H, W, 3)
    return torch.from_numpy(rgb).float().movedim(-1, -3)


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


# Columns of metrics rows that are axes or bookkeeping, not curves; every other numeric column is a panel.
NOT_METRICS = {"step", "epoch", "images_seen", "minutes", "eta_s", "partial"}
REFERENCE_SUFFIX = "_untrained"  # knn_top1_untrained: a dashed reference line in the knn_top1 panel
SMOOTHING = 0.6  # TensorBoard's default: debiased exponential moving average with this weight
MIN_POINTS_TO_SMOOTH = 10  # fewer points are drawn as they are, with markers
PANEL_COLUMNS = 3


@dataclass
class RunPlot:
    paths: list[Path]
    """The PNG and the SVG written."""
    panels: dict[str, list[str]]
    """Metric of each panel, in figure order -> the runs drawn in it."""


def plot_runs(run_dirs, output=None) -> RunPlot:
    """One figure of the metrics.jsonl of each run in `run_dirs`, written as OUTPUT.png and OUTPUT.svg (default
    DIR/plots/metrics for one run, FIRST_DIR/plots/compared for several): a panel per numeric column any run logged
    (a run without it is left out of that panel), the runs overlaid in one colour each with a legend, a shared step
    axis with the epochs above it (when the runs agree on the steps per epoch), the raw curve faint behind a light
    smoothing, and a grid."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("plot needs at least one run folder")
    rows = {name: read_metrics(d / "metrics.jsonl") for name, d in zip(_run_names(run_dirs), run_dirs)}
    runs = {name: _series(run_rows) for name, run_rows in rows.items()}
    metrics = list(dict.fromkeys(m for series in runs.values() for m in series
                                 if not (m.endswith(REFERENCE_SUFFIX) and m.removesuffix(REFERENCE_SUFFIX) in series)))
    if not metrics:
        raise ValueError(f"no numeric metrics to plot in {', '.join(str(d / 'metrics.jsonl') for d in run_dirs)}")
    columns = min(PANEL_COLUMNS, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(4.4 * columns, 2.9 * lines + 0.5), layout="constrained")
    axes = fig.subplots(lines, columns, sharex=True, squeeze=False).ravel()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    panels = {}
    for ax, metric in zip(axes, metrics):
        panels[metric] = []
        for (name, series), color in zip(runs.items(), colors):
            if metric in series:
                _draw(ax, series[metric], color)
                panels[metric].append(name)
            if metric + REFERENCE_SUFFIX in series:
                ax.axhline(series[metric + REFERENCE_SUFFIX][-1][1], color=color, linestyle="--", linewidth=1)
        ax.set_title(metric + (f" (dashed: {REFERENCE_SUFFIX[1:]})" if any(
            metric + REFERENCE_SUFFIX in series for series in runs.values()) else ""), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))  # no offset text over the epochs
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    for ax in axes[len(metrics) - columns:len(metrics)]:  # the lowest panel of each column
        ax.set_xlabel("step")
        ax.tick_params(labelbottom=True)
    steps_per_epoch = _steps_per_epoch(list(rows.values()))
    if steps_per_epoch:
        for ax in axes[:columns]:
            epochs = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch,
                                                           lambda e: e * steps_per_epoch))
            epochs.set_xlabel("epoch", fontsize=9)
    handles = [Line2D([], [], color=c, linewidth=2) for c in colors]
    fig.legend(handles, list(runs), loc="outside upper center", ncols=min(len(runs), 4), frameon=False)
    stem = Path(output) if output is not None else run_dirs[0] / "plots" / ("metrics" if len(runs) == 1 else
                                                                             "compared")
    stem = stem.with_suffix("") if stem.suffix.lower() in (".png", ".svg") else stem
    paths = [atomic_write(stem.with_suffix(f".{fmt}"), lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=150))
             for fmt in ("png", "svg")]
    return RunPlot(paths, panels)


def _series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of every numeric, finite column of a run's rows, in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in sorted(rows, key=lambda r: r["step"]):
        for key, value in row.items():
            if key not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                series.setdefault(key, []).append((row["step"], float(value)))
    return series


def _draw(ax, points: list[tuple[int, float]], color: str) -> None:
    steps, values = [p[0] for p in points], [p[1] for p in points]
    if len(points) < MIN_POINTS_TO_SMOOTH:
        ax.plot(steps, values, color=color, marker="o", markersize=3.5, linewidth=1.5)
        return
    ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
    smoothed, mean = [], 0.0
    for i, value in enumerate(values, start=1):  # debiased EMA (TensorBoard's smoothing)
        mean = SMOOTHING * mean + (1 - SMOOTHING) * value
        smoothed.append(mean / (1 - SMOOTHING ** i))
    ax.plot(steps, smoothed, color=color, linewidth=1.8)


def _run_names(run_dirs: list[Path]) -> list[str]:
    """The folder names, or parent/name where two runs share a name."""
    names = [d.resolve().name for d in run_dirs]
    return [f"{d.resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def _steps_per_epoch(runs: list[list[dict]]) -> float | None:
    """Steps per epoch the runs share (from their rows' step / epoch), or None when they differ or cannot say."""
    ratios = []
    for rows in runs:
        rows = [r for r in rows if r.get("epoch")]
        if not rows:
            return None
        ratios.append(rows[-1]["step"] / rows[-1]["epoch"])
    return ratios[0] if max(ratios) <= 1.01 * min(ratios) else None


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
