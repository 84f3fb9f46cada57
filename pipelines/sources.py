"""Datasets on disk: ImageFolder trees, ImageFolder-in-tar shards and WebDataset shards, listed and validated once.

`open_source` lists a split, reads the header and the last bytes of every image, and keeps only images that both
backends can decode; each skipped file is counted by reason and reported in one warning. The check costs two
small reads per file (about 50 us; no pixel is decoded), so a bad file is found before training starts instead of
killing a DALI pipeline mid-epoch. What it cannot see (a JPEG whose entropy-coded data or tables are broken, a file
that changes after listing) is caught at decode time: the fallback replaces the image, the DALI loader finds the
file, drops it and rebuilds its pipeline (see `loader.py`).

Validating ImageNet (1.28M files) takes about a minute; large datasets keep the result in an index cache.
Tar shards are indexed once (member offsets) and read with `os.pread`, so any rank can read any image and the
order is chosen per image, exactly as for a folder: sharding and resuming work the same for every layout.
"""
import glob
import hashlib
import io
import json
import logging
import os
import struct
import tarfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fastdino.files import atomic_write
from fastdino.pipelines.synthetic import default_dataset_dir

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm")
# Formats that both DALI's decoder and PIL read (PIL names). GIF is the notable one DALI does not.
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM"})
# What PIL raises on a broken or hostile file (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError)
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
_TAIL_BYTES = 1024
_EXIF_ORIENTATION = 0x0112
# From this many images on, validation results are kept in default_dataset_dir()/index, keyed by the path, size
# and modification time of every file, so that later runs (and the other ranks) skip the header pass.
INDEX_CACHE_MIN_IMAGES = 20_000


class ImageSource:
    """The validated images of one split: where each one's bytes are, its label and its (height, width).

    Per image (N of them): `names` (N,) relative path or tar member, `labels` (N,) int64 (-1 when the layout has
    none), `sizes` (N, 2) int32 header size after EXIF orientation, and for tar layouts the location: shard
    `file_index` of `files`, `nbytes` bytes at `offset`. Arrays rather than lists, so that handing the source to
    worker processes stays cheap for millions of images.
    `skipped` maps a reason to (count, example) for everything left out.
    """

    def __init__(self, root: str, layout: str, files: list[str], classes: list[str], entries: list[tuple],
                 skipped: dict[str, list]):
        self._fds: dict[int, int] = {}  # shard descriptors, opened on first read in each process
        self.root, self.layout, self.files, self.classes = root, layout, files, classes
        self.skipped = dict(skipped)
        # entries: (name, file_index, offset, nbytes, label, height, width)
        self.names = np.array([e[0].encode() for e in entries], dtype=np.bytes_)
        self.file_index = np.array([e[1] for e in entries], dtype=np.int64)
        self.offset = np.array([e[2] for e in entries], dtype=np.int64)
        self.nbytes = np.array([e[3] for e in entries], dtype=np.int64)
        self.labels = np.array([e[4] for e in entries], dtype=np.int64)
        self.sizes = np.array([(e[5], e[6]) for e in entries], dtype=np.int32).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_skipped(self) -> int:
        return sum(count for count, _ in self.skipped.values())

    def describe(self, index: int) -> str:
        """Where image `index` lives, for messages."""
        name = self.names[index].decode()
        if self.layout == "folder":
            return os.path.join(self.root, name)
        return f"{self.files[self.file_index[index]]}:{name}"

    def read(self, index: int) -> bytes:
        """The encoded bytes of image `index`."""
        file_index, offset, nbytes = int(self.file_index[index]), int(self.offset[index]), int(self.nbytes[index])
        if self.layout == "folder":
            with open(os.path.join(self.root, self.names[index].decode()), "rb") as f:
                return f.read()
        fd = self._fds.get(file_index)
        if fd is None:
            fd = self._fds[file_index] = os.open(self.files[file_index], os.O_RDONLY)
        return os.pread(fd, nbytes, offset)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self):  # open descriptors stay with the process that opened them
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self):
        self.close()


def decode_rgb(data: bytes) -> Image.Image:
    """Decode to an 8-bit RGB PIL image as DALI's decoder does: EXIF orientation applied, alpha dropped, 16-bit
    samples scaled to 8 bits (PIL's own conversion would clip them), CMYK and palettes converted."""
    img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit samples ("I" is how older PIL opens them)
        pixels = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray((pixels >> 8).astype(np.uint8))
    return img.convert("RGB")


def open_source(path: str, *, num_threads: int = 8) -> ImageSource:
    """List and validate a split: an ImageFolder directory, a directory of .tar shards, one .tar, or a glob
    pattern of .tar files. Raises ValueError for a missing, empty or unreadable dataset."""
    path = str(path)
    if glob.has_magic(path):
        shards = sorted(glob.glob(path))
        if not shards:
            raise ValueError(f"no tar shards match {path!r}")
        return _open_tars(path, shards, num_threads)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"dataset path {path!r} does not exist")
    if p.is_file():
        if p.suffix != ".tar":
            raise ValueError(f"dataset path {path!r} is a file but not a .tar shard")
        return _open_tars(path, [path], num_threads)
    try:
        entries = sorted(os.scandir(p), key=lambda e: e.name)
    except OSError as err:
        raise ValueError(f"dataset folder {path!r} is unreadable: {err}") from err
    dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    tars = [e.path for e in entries if e.is_file() and e.name.endswith(".tar")]
    if tars and not dirs:
        return _open_tars(path, tars, num_threads)
    if not dirs:
        images = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        if not images:
            raise ValueError(f"dataset folder {path!r} is empty: no class folders, images or .tar shards")
        raise ValueError(f"dataset folder {path!r} holds images but no class folders: put them in "
                         f"{path}/<class>/ (ImageFolder layout)")
    return _open_folder(path, [d.name for d in dirs], num_threads)


def resolve_split(path: str, split: str) -> str:
    """PATH/split when it exists (a folder, PATH/split.tar or PATH/split-*.tar shards), else PATH itself for
    "train". Raises ValueError for a missing, empty or unreadable dataset or a missing non-train split."""
    p = Path(path)
    if not glob.has_magic(str(path)) and not p.exists():
        raise ValueError(f"dataset path {str(path)!r} does not exist")
    if p.is_dir():
        if (p / split).is_dir():
            return str(p / split)
        if (p / f"{split}.tar").is_file():
            return str(p / f"{split}.tar")
        if glob.glob(str(p / f"{split}-*.tar")):
            return str(p / f"{split}-*.tar")
        try:
            empty = next(os.scandir(p), None) is None
        except OSError as err:
            raise ValueError(f"dataset folder {str(path)!r} is unreadable: {err}") from err
        if empty:
            raise ValueError(f"dataset folder {str(path)!r} is empty")
    if split == "train":
        return str(path)
    raise ValueError(f"dataset {str(path)!r} has no {split!r} split: expected {path}/{split}/, "
                     f"{path}/{split}.tar or {path}/{split}-*.tar")


def epoch_batches(num_images: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> np.ndarray:
    """(num_batches, batch_size) image indices of `rank` for `epoch`.

    One permutation per (seed, epoch) is cut into global batches of world_size * batch_size images (the
    remainder is dropped); rank r takes the r-th slice of each. So the ranks together see every kept image once,
    and rank r's batch b is the same images whatever the ranks before it do.
    """
    global_batch = batch_size * world_size
    if num_images < global_batch:
        raise ValueError(f"the dataset has {num_images} images, fewer than one global batch "
                         f"({batch_size} x {world_size} ranks)")
    order = np.random.default_rng((seed, epoch)).permutation(num_images)
    num_batches = num_images // global_batch
    return order[:num_batches * global_batch].reshape(num_batches, world_size, batch_size)[:, rank]


# --- listing ------------------------------------------------------------------------------------------------------


class _Skips:
    """Counts of skipped files by reason, with one example each."""

    def __init__(self):
        self.reasons: dict[str, list] = defaultdict(lambda: [0, ""])

    def add(self, reason: str, where: str) -> None:
        entry = self.reasons[reason]
        entry[0] += 1
        entry[1] = entry[1] or where

    def report(self, root: str, kept: int) -> None:
        if self.reasons:
            parts = [f"{count} {reason} (e.g. {where})" for reason, (count, where) in sorted(self.reasons.items())]
            total = sum(count for count, _ in self.reasons.values())
            logger.warning("%s: skipped %d file(s) or folder(s), kept %d images: %s", root, total, kept,
                           "; ".join(parts))


def inspect_image(f, size: int) -> tuple[int, int] | str:
    """(height, width) after EXIF orientation of the image in file object `f` of `size` bytes, or why it is
    skipped. Reads the header and the last bytes only."""
    if size == 0:
        return "empty file"
    try:
        img = Image.open(f)
        fmt, (width, height) = img.format, img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1) if "exif" in img.info else 1
    except Image.DecompressionBombError:
        return "too large (PIL decompression-bomb limit)"
    except DECODE_ERRORS:
        return "not a readable image"
    if fmt not in DECODABLE_FORMATS:
        return f"unsupported format {fmt}"
    if width < 1 or height < 1:
        return "empty image"
    if fmt in ("JPEG", "MPO", "PNG"):
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
        if (b"IEND" if fmt == "PNG" else b"\xff\xd9") not in tail:
            return "truncated"
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


class _Window(io.RawIOBase):
    """Read-only file object over `size` bytes at `offset` of descriptor `fd` (a tar member)."""

    def __init__(self, fd: int, offset: int, size: int):
        super().__init__()
        self.fd, self.start, self.size, self.pos = fd, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, [pos, self.pos + pos, self.size + pos][whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.pos))
        data = os.pread(self.fd, count, self.start + self.pos)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _inspect_file(path: str) -> tuple[int, int] | str:
    try:
        with open(path, "rb") as f:
            return inspect_image(f, os.fstat(f.fileno()).st_size)
    except OSError:
        return "unreadable"


def _open_folder(root: str, classes: list[str], num_threads: int) -> ImageSource:
    skips = _Skips()
    candidates = []  # (relative name, label)
    for label, name in enumerate(classes):
        found = []
        for folder, subdirs, files in os.walk(os.path.join(root, name), followlinks=True):
            subdirs.sort()
            rel = os.path.relpath(folder, root)
            found += [(os.path.join(rel, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            skips.add("empty class folder", name)
        candidates += found
    files = [os.path.join(root, name) for name, _ in candidates]

    def identity():
        return [f"{path}\t{st.st_size}\t{st.st_mtime_ns}" for path in files for st in (os.stat(path),)]

    results = _inspect_all(files, _inspect_file, num_threads, identity)
    entries = []
    for path, (name, label), result in zip(files, candidates, results):
        if isinstance(result, str):
            skips.add(result, path)
        else:
            entries.append((name, 0, 0, 0, label, *result))
    return _finish(root, "folder", [], classes, entries, skips)


def _open_tars(root: str, shards: list[str], num_threads: int) -> ImageSource:
    members = []  # (shard index, name, offset, size)
    for s, shard in enumerate(shards):
        try:
            with tarfile.open(shard, mode="r:") as tar:
                members += [(s, m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        except (tarfile.TarError, OSError) as err:
            raise ValueError(f"tar shard {shard!r} is unreadable or compressed (only plain .tar is supported): "
                             f"{err}") from err
    fds = [os.open(shard, os.O_RDONLY) for shard in shards]
    try:
        skips = _Skips()
        if any(name.endswith(".cls") for _, name, _, _ in members):
            layout, classes, candidates = "webdataset", *_webdataset_samples(members, fds, skips)
        elif members and all("/" in name for _, name, _, _ in members if name.lower().endswith(IMAGE_EXTENSIONS)):
            layout, classes, candidates = "tar-folder", *_tar_folder_samples(members)
        else:
            layout, classes, candidates = "webdataset", *_webdataset_samples(members, fds, skips)

        def inspect(c):
            return inspect_image(_Window(fds[c[1]], c[2], c[3]), c[3])

        def identity():
            return [f"{shard}\t{st.st_size}\t{st.st_mtime_ns}" for shard in shards for st in (os.stat(shard),)]

        results = _inspect_all(candidates, inspect, num_threads, identity)
    finally:
        for fd in fds:
            os.close(fd)
    entries = []
    for (name, shard, offset, size, label), result in zip(candidates, results):
        if isinstance(result, str):
            skips.add(result, f"{shards[shard]}:{name}")
        else:
            entries.append((name, shard, offset, size, label, *result))
    return _finish(root, layout, shards, classes, entries, skips)


def _inspect_all(items: list, inspect, num_threads: int, identity) -> list:
    """inspect(item) for every item on a thread pool; cached on disk for large datasets (see
    INDEX_CACHE_MIN_IMAGES), where identity() lists what the results depend on."""
    cache = None
    if len(items) >= INDEX_CACHE_MIN_IMAGES:
        key = hashlib.sha1("\n".join(identity()).encode()).hexdigest()
        cache = default_dataset_dir() / "index" / f"{key}.json"
        try:
            results = json.loads(cache.read_text())
            if len(results) == len(items):
                logger.info("validation results of %d images read from %s", len(items), cache)
                return [r if isinstance(r, str) else tuple(r) for r in results]
        except (OSError, ValueError):
            pass  # no cache yet, or a damaged one: validate again
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(pool.map(inspect, items, chunksize=256))
    if cache is not None:
        try:
            atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(results)))
        except OSError as err:
            logger.warning("could not write the validation cache %s: %s", cache, err)
    return results


def _tar_folder_samples(members):
    images = [m for m in members if m[1].lower().endswith(IMAGE_EXTENSIONS)]
    classes = sorted({os.path.basename(os.path.dirname(name)) for _, name, _, _ in images})
    label = {c: i for i, c in enumerate(classes)}
    return classes, [(name, s, off, size, label[os.path.basename(os.path.dirname(name))])
                     for s, name, off, size in images]


def _webdataset_samples(members, fds, skips):
    """Group members by key (path up to the first dot of the basename); label from the .cls member if any."""
    samples: dict[tuple, dict] = defaultdict(dict)
    for s, name, off, size in members:
        folder, base = os.path.split(name)
        key, _, ext = base.partition(".")
        samples[(s, os.path.join(folder, key))][ext.lower()] = (name, off, size)
    candidates = []
    for (s, key), parts in samples.items():
        image = next((parts[k] for k in WEBDATASET_IMAGE_KEYS if k in parts), None)
        if image is None:
            skips.add("sample without an image", key)
            continue
        label = -1
        if "cls" in parts:
            _, off, size = parts["cls"]
            try:
                label = int(os.pread(fds[s], size, off).decode().strip())
            except ValueError:
                skips.add("unreadable .cls label", key)
                continue
        candidates.append((image[0], s, image[1], image[2], label))
    num_classes = max((c[4] for c in candidates), default=-1) + 1
    return [str(i) for i in range(num_classes)], candidates


def _finish(root, layout, files, classes, entries, skips: _Skips) -> ImageSource:
    skips.report(root, len(entries))
    if not entries:
        reasons = ", ".join(f"{count} {reason}" for reason, (count, _) in sorted(skips.reasons.items()))
        raise ValueError(f"dataset {root!r} has no decodable images" + (f" ({reasons})" if reasons else ""))
    return ImageSource(root, layout, files, classes, entries, {k: list(v) for k, v in skips.reasons.items()})
