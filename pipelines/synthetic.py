"""The built-in dataset: labelled images of 10 shapes, made so that raw pixels are poor features.

Each image shows 2 to 5 copies of one shape (the label), each with a random colour, size, position and
rotation, over a random background (gradient or blotchy) with a few distractor strokes and pixel noise. Colour
and position carry no label information, so a classifier must see shape; DINO's crops, colour jitter and blur
teach exactly those invariances. Images are drawn at twice the size and downsampled (antialiased edges), then
saved as JPEG.

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
FORMAT_VERSION = 2
_SUPERSAMPLE = 2


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


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """A gradient between two colours or blotches of 3x3 to 6x6 random colours, so that crops of one image do
    not share one background colour (which would be an easier cue than the shapes for telling images apart)."""
    if rng.random() < 0.3:
        t = np.linspace(0, 1, 8)[:, None, None]
        arr = (1 - t) * rng.integers(0, 256, 3) + t * rng.integers(0, 256, 3)
        arr = np.rot90(np.broadcast_to(arr, (8, 8, 3)), rng.integers(4))
    else:
        cells = rng.integers(3, 7)
        arr = rng.integers(0, 256, (cells, cells, 3))
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).resize((side, side), Image.Resampling.BICUBIC)


def _far_colour(rng: np.random.Generator, background: np.ndarray) -> tuple:
    """A random colour at least ~100 away (RGB distance) from `background`."""
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - background) > 100:
            break
    return tuple(int(c) for c in colour)


def render_shape(rng: np.random.Generator, label: int, image_size: int) -> Image.Image:
    """One RGB image showing 2 to 5 copies of shape CLASSES[label], each with its own colour, size, position and
    rotation: a crop of any size is likely to hold one, so small and large crops of an image agree on the shape
    and on little else."""
    side = image_size * _SUPERSAMPLE
    img = _background(rng, side)
    background = np.asarray(img, dtype=np.float64)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(0, 4)):  # distractor strokes
        points = [tuple(p) for p in rng.uniform(0, side, (2, 2))]
        draw.line(points, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    for _ in range(rng.integers(2, 6)):
        radius = rng.uniform(0.12, 0.25) * side
        centre = rng.uniform(radius * 0.7, side - radius * 0.7, 2)
        angle = rng.uniform(0, 2 * np.pi)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        mask = Image.new("L", (side, side), 0)
        mask_draw = ImageDraw.Draw(mask)
        for polygon, value in _outlines(CLASSES[label]):
            points = polygon @ rotation.T * radius + centre
            mask_draw.polygon([tuple(p) for p in points], fill=value)
        under = background[np.asarray(mask) > 0]
        colour = _far_colour(rng, under.mean(axis=0) if len(under) else background.mean(axis=(0, 1)))
        img = Image.composite(Image.new("RGB", (side, side), colour), img, mask)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, rng.uniform(0, 12), (image_size, image_size, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


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
