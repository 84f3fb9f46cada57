"""The built-in dataset: labelled images of 10 shapes, made so that raw pixels are poor features.

Each image shows two copies of one shape (the label), each with a random grey level, size, position and rotation,
light on a random dark ground (a gradient or blotches), with 0-2 distractor strokes and pixel noise. Level and
position carry no label information, so a classifier must see shape; DINO's crops and brightness/contrast jitter
teach exactly those invariances. Images are drawn at twice the size and downsampled (antialiased edges), then
saved as RGB JPEG.

Why grey, light on dark (measured, benchmarks/RESULTS.md): with random colours, even pale tints, the demo's few
CPU minutes of DINO learn to tell images apart by colour, which the paper's colour jitter (hue +-0.1) leaves
intact, and k-NN on shape got worse than the untrained network; with random polarity (dark on light as well) the
tiny ViT did not learn the shapes in that budget even with labels.

The dataset is a pure function of its parameters and seed; it is written once into a temporary folder that is
renamed into place, so a reader never sees half a dataset and concurrent writers do not clash.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("arrow", "circle", "crescent", "cross", "ellipse", "pentagon", "ring", "square", "star", "triangle")
FORMAT_VERSION = 3
_SUPERSAMPLE = 2
_COPIES = 2
_RADIUS = (0.15, 0.28)  # of the image side
_GROUND_MAX = 90  # the ground's grey levels are 0..90
_SHAPE_LEVELS = (150, 256)  # a shape's grey level is drawn from [150, 256)


def default_dataset_dir() -> Path:
    """Cache folder for built-in data: $FASTDINO_CACHE, else ~/.cache/fastdino."""
    return Path(os.environ.get("FASTDINO_CACHE") or Path.home() / ".cache" / "fastdino")


def _regular(n: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], 1)


def _outlines(name: str) -> list[tuple[np.ndarray, int]]:
    """Polygons (unit size, centred at 0) filled in order with mask value 255 or 0 (holes)."""
    circle = _regular(48)
    if name == "circle":
        return [(circle, 255)]
    if name == "ring":
        return [(circle, 255), (0.55 * circle, 0)]
    if name == "crescent":
        return [(circle, 255), (0.85 * circle + [0.45, -0.1], 0)]
    if name == "ellipse":
        return [(circle * [1.0, 0.5], 255)]
    if name == "square":
        return [(_regular(4, phase=np.pi / 4), 255)]
    if name == "triangle":
        return [(_regular(3), 255)]
    if name == "pentagon":
        return [(_regular(5), 255)]
    if name == "star":
        points = _regular(10)
        points[1::2] *= 0.42
        return [(points, 255)]
    if name == "cross":
        a, b = 0.3, 1.0
        return [(np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a],
                           [-b, a], [-b, -a], [-a, -a]]), 255)]
    if name == "arrow":
        return [(np.array([[-1, -0.25], [0.2, -0.25], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.25],
                           [-1, 0.25]]), 255)]
    raise ValueError(f"unknown shape {name!r}")


def _background(rng: np.random.Generator, side: int) -> np.ndarray:
    """Dark grey ground (levels 0-90): a gradient between two levels or blotches of 3x3 to 6x6 random levels, so
    that crops of one image do not share one background level."""
    if rng.random() < 0.3:
        t = np.linspace(0, 1, 8)[:, None]
        arr = np.rot90(np.broadcast_to((1 - t) * rng.uniform(0, 1) + t * rng.uniform(0, 1), (8, 8)), rng.integers(4))
    else:
        cells = rng.integers(3, 7)
        arr = rng.uniform(0, 1, (cells, cells))
    img = Image.fromarray(np.ascontiguousarray(arr * 255).astype(np.uint8))
    return np.asarray(img.resize((side, side), Image.Resampling.BICUBIC), np.float64) * _GROUND_MAX / 255


def render_shape(rng: np.random.Generator, label: int, image_size: int) -> Image.Image:
    """One image (grey, stored as RGB) showing two light copies of shape CLASSES[label] on a dark ground, each
    with its own grey level, size, position and rotation, plus 0-2 distractor strokes and pixel noise."""
    side = image_size * _SUPERSAMPLE
    img = Image.fromarray(_background(rng, side).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 3)):
        points = [tuple(p) for p in rng.uniform(0, side, (2, 2))]
        draw.line(points, fill=int(rng.integers(0, 256)), width=int(rng.integers(1, 4)))
    for _ in range(_COPIES):
        radius = rng.uniform(*_RADIUS) * side
        centre = rng.uniform(radius * 0.8, side - radius * 0.8, 2)
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        mask = Image.new("L", (side, side), 0)
        mask_draw = ImageDraw.Draw(mask)
        for polygon, value in _outlines(CLASSES[label]):
            points = polygon @ rotation.T * radius + centre
            mask_draw.polygon([tuple(p) for p in points], fill=value)
        img = Image.composite(Image.new("L", (side, side), int(rng.integers(*_SHAPE_LEVELS))), img, mask)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, rng.uniform(0, 8), (image_size, image_size))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).convert("RGB")


def make_shapes_dataset(root: str | Path, *, num_train: int, num_val: int, image_size: int, seed: int = 0) -> Path:
    """ImageFolder dataset at `root` (train/ and val/, one folder per class of CLASSES), written once.

    Returns `root`. An existing dataset with the same parameters is reused as is; one with other parameters is
    a ValueError (choose another root).
    """
    for name, value in (("num_train", num_train), ("num_val", num_val), ("image_size", image_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    root = Path(root)
    spec = {"kind": "shapes", "version": FORMAT_VERSION, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "seed": seed, "classes": list(CLASSES)}
    if root.exists():
        _check_existing(root, spec)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
            for name in CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for i in range(count):
                label = i % len(CLASSES)
                img = render_shape(np.random.default_rng((seed, split_id, i)), label, image_size)
                img.save(tmp / split / CLASSES[label] / f"{i:06d}.jpg", quality=90)
        (tmp / "dataset.json").write_text(json.dumps(spec, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: use its copy
            _check_existing(root, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _check_existing(root: Path, spec: dict) -> None:
    try:
        found = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{root} exists but is not a shapes dataset (no readable dataset.json): {err}") from err
    if found != spec:
        diff = {k: (found.get(k), v) for k, v in spec.items() if found.get(k) != v}
        raise ValueError(f"{root} holds a shapes dataset with other parameters (found, wanted): {diff}; "
                         f"pass another root")
