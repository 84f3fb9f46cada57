"""Datasets on disk, listed and validated once: ImageFolder trees, folders of unlabeled images (any depth), file
lists, and tar shards (ImageFolder-in-tar or WebDataset, labelled or not, plain or compressed). Labels only matter
to evaluation: a layout without them gets label -1.

`open_source` lists a split, reads the header and the last bytes of every image, and keeps only images that both
backends can decode; each skipped file is counted by reason and reported in one warning. The check costs two
small reads per file (about 50 us; no pixel is decoded), so a bad file is found before training starts instead of
killing a DALI pipeline mid-epoch. What it cannot see (a JPEG whose entropy-coded data or tables are broken, a file
that changes after listing) is caught at decode time: the fallback replaces the image, the DALI loader finds the
file, drops it and rebuilds its pipeline (see `loader.py`).

Validating ImageNet (1.28M files) takes about a minute; large datasets keep the result in an index cache.
Tar shards are indexed once (member offsets) and read with `os.pread`, so any rank can read any image and the
order is chosen per image, exactly as for a folder: sharding and resuming work the same for every layout. Random
access needs an uncompressed tar, so a .tar.gz / .tgz / .tar.bz2 / .tar.xz shard is decompressed once into the
cache folder (keyed by its path, size and modification time).
"""
import bz2
import glob
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import signal
import stat
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
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
# A file list: one image path per line, relative to the list's folder or absolute; '#' starts a comment line.
FILE_LIST_SUFFIXES = (".txt", ".lst")
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}  # magic bytes -> opener
_GIF = "GIF (DALI cannot decode it: convert to PNG)"
_TAIL_BYTES = 1024
# Floating-point TIFFs (SampleFormat 3) have no agreed pixel range: DALI decodes 0..255 ones white, PIL 0..1 ones
# black. Neither backend can be told which range a file uses, so they are left out, and counted.
_SAMPLE_FORMAT, _FLOAT_SAMPLES = 339, 3
_FLOAT_TIFF = "floating-point TIFF (no agreed pixel range: convert it to 8 or 16 bits)"
_EXIF_ORIENTATION = 0x0112
# From this many images on, validation results are kept in default_dataset_dir()/index, keyed by the path, size
# and modification time of every file, so that later runs (and the other ranks) skip the header pass.
INDEX_CACHE_MIN_IMAGES = 20_000


class DatasetUnreadableError(RuntimeError):
    """No image of a dataset can be read any more (deleted, moved or unmounted while training)."""


class ImageSource:
    """The validated images of one split: where each one's bytes are, its label and its (height, width).

    Per image (N of them): `names` (N,) relative path or tar member, `labels` (N,) int64 (-1 when the layout has
    none), `sizes` (N, 2) int32 header size after EXIF orientation, and for tar layouts the location: shard
    `file_index` of `files`, `nbytes` bytes at `offset`. Arrays rather than lists, so that handing the source to
    worker processes stays cheap for millions of images.
    `skipped` maps a reason to (count, example) for every image left out, `ignored` the same for files and tar
    members that are not images. `classes` is empty for an unlabeled layout.
    """

    def __init__(self, root: str, layout: str, files: list[str], classes: list[str], entries: list[tuple],
                 skipped: dict[str, list], ignored: dict[str, list] | None = None):
        self._fds: dict[int, int] = {}  # shard descriptors, opened on first read in each process
        self.root, self.layout, self.files, self.classes = root, layout, files, classes
        self.skipped, self.ignored = dict(skipped), dict(ignored or {})
        # entries: (name, file_index, offset, nbytes, label, height, width)
        # File names may hold bytes that are not UTF-8 (os.fsencode / os.fsdecode round-trip them).
        self.names = np.array([os.fsencode(e[0]) for e in entries], dtype=np.bytes_)
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

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def describe(self, index: int) -> str:
        """Where image `index` lives, for messages."""
        name = os.fsdecode(self.names[index])
        if self.layout == "folder":
            return os.path.join(self.root, name)
        return f"{self.files[self.file_index[index]]}:{name}"

    def read(self, index: int) -> bytes:
        """The encoded bytes of image `index`."""
        file_index, offset, nbytes = int(self.file_index[index]), int(self.offset[index]), int(self.nbytes[index])
        if self.layout == "folder":
            with open_regular(os.path.join(self.root, os.fsdecode(self.names[index]))) as f:
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
    """List and validate a split: a folder (ImageFolder class folders, or unlabeled images at any depth), a
    folder of tar shards, one tar shard, a glob pattern of shards, or a file list (.txt / .lst). Raises ValueError
    for a missing, empty or unreadable dataset."""
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
        if p.name.lower().endswith(FILE_LIST_SUFFIXES):
            return _open_file_list(path, num_threads)
        if not p.name.lower().endswith(TAR_SUFFIXES):
            raise ValueError(f"dataset path {path!r} is a file but not a tar shard ({', '.join(TAR_SUFFIXES)}) "
                             f"or a file list ({', '.join(FILE_LIST_SUFFIXES)})")
        return _open_tars(path, [path], num_threads)
    try:
        entries = sorted(os.scandir(p), key=lambda e: e.name)
    except OSError as err:
        raise ValueError(f"dataset folder {path!r} is unreadable: {err}") from err
    entries = [e for e in entries if not e.name.startswith(".")]
    dirs = [e.name for e in entries if e.is_dir()]
    tars = [e.path for e in entries if e.is_file() and e.name.lower().endswith(TAR_SUFFIXES)]
    loose_images = [e for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS + (".gif",))]
    if tars and not dirs and not loose_images:
        return _open_tars(path, tars, num_threads)
    if not dirs and not loose_images:
        raise ValueError(f"dataset folder {path!r} is empty: no images, class folders or tar shards")
    # Class folders alone are ImageFolder; images beside them mean the folder is a plain unlabeled collection.
    return _open_folder(path, [] if loose_images else dirs, num_threads)


def resolve_split(path: str, split: str) -> str:
    """PATH/split when it exists (a folder, a shard PATH/split.tar, shards PATH/split-*.tar, each also compressed,
    or a file list PATH/split.txt), else PATH itself for "train". Raises ValueError for a missing, empty or
    unreadable dataset or a missing non-train split."""
    p = Path(path)
    if not glob.has_magic(str(path)) and not p.exists():
        raise ValueError(f"dataset path {str(path)!r} does not exist")
    if p.is_dir():
        if (p / split).is_dir():
            return str(p / split)
        for suffix in TAR_SUFFIXES + FILE_LIST_SUFFIXES:
            if (p / f"{split}{suffix}").is_file():
                return str(p / f"{split}{suffix}")
        for suffix in TAR_SUFFIXES:
            if glob.glob(str(p / f"{split}-*{suffix}")):
                return str(p / f"{split}-*{suffix}")
        try:
            empty = next(os.scandir(p), None) is None
        except OSError as err:
            raise ValueError(f"dataset folder {str(path)!r} is unreadable: {err}") from err
        if empty:
            raise ValueError(f"dataset folder {str(path)!r} is empty")
    if split == "train":
        return str(path)
    raise ValueError(f"dataset {str(path)!r} has no {split!r} split: expected {path}/{split}/, "
                     f"{path}/{split}.tar (or .tar.gz), {path}/{split}-*.tar or {path}/{split}.txt")


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
    """Counts by reason, with one example each, of the images left out (`reasons`) and of the files or tar
    members that are not images (`ignored`)."""

    def __init__(self):
        self.reasons: dict[str, list] = defaultdict(lambda: [0, ""])
        self.ignored: dict[str, list] = defaultdict(lambda: [0, ""])

    def add(self, reason: str, where: str, *, ignored: bool = False) -> None:
        entry = (self.ignored if ignored else self.reasons)[reason]
        entry[0] += 1
        entry[1] = entry[1] or where

    def add_file(self, name: str, where: str) -> None:
        """Count a file that has no image extension: a GIF is an image left out, anything else is ignored."""
        if name.lower().endswith(".gif"):
            self.add(_GIF, where)
        else:
            self.add("not an image", where, ignored=True)

    def report(self, root: str, kept: int, classes: list[str]) -> None:
        """One summary line: images kept, labels, and everything left out (a warning when images were)."""
        labels = f"{len(classes)} classes" if classes else "no labels"
        line = f"{root}: kept {kept} images ({labels})"
        for verb, reasons in (("skipped", self.reasons), ("ignored", self.ignored)):
            if reasons:
                total = sum(count for count, _ in reasons.values())
                line += f"; {verb} {total} file(s): " + ", ".join(
                    f"{count} {reason} (e.g. {where})" for reason, (count, where) in sorted(reasons.items()))
        logger.log(logging.WARNING if self.reasons else logging.INFO, "%s", line)


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
    if fmt == "TIFF" and _FLOAT_SAMPLES in _as_tuple(img.tag_v2.get(_SAMPLE_FORMAT, ())):
        return _FLOAT_TIFF
    if width < 1 or height < 1:
        return "empty image"
    if fmt in ("JPEG", "MPO", "PNG"):
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
        if (b"IEND" if fmt == "PNG" else b"\xff\xd9") not in tail:
            return "truncated"
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


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


class NotRegularFileError(OSError):
    """A path to be read as an image or a shard is a FIFO, socket or device."""


def open_regular(path: str):
    """`open(path, "rb")` for a regular file only: opened without blocking and checked, so a FIFO (which would
    block until a writer appears), a socket or a device under an image's name is an OSError, not a hang."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK does nothing to a regular file's reads
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def _inspect_file(path: str) -> tuple[int, int] | str:
    try:
        with open_regular(path) as f:
            return inspect_image(f, os.fstat(f.fileno()).st_size)
    except NotRegularFileError:
        return "not a regular file (a FIFO, socket or device)"
    except OSError:
        return "unreadable"


def _open_folder(root: str, classes: list[str], num_threads: int) -> ImageSource:
    """ImageFolder when `classes` names its class folders; else every image under `root`, unlabeled.

    Symbolic links are followed, into each folder once: folders are known by (device, inode), so a link back up
    (`sub/up -> ..`, `self -> .`) cannot loop and a second link to a folder does not list its images twice."""
    skips = _Skips()
    candidates = []  # (relative name, label)
    visited = {_folder_key(root)}
    for label, name in enumerate(classes) if classes else [(-1, "")]:
        found = []
        top = os.path.join(root, name)
        if classes and not _first_visit(top, visited, skips):
            continue
        for folder, subdirs, files in os.walk(top, followlinks=True):
            subdirs[:] = [d for d in sorted(subdirs)
                          if not d.startswith(".") and _first_visit(os.path.join(folder, d), visited, skips)]
            rel = os.path.relpath(folder, root)
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    found.append((os.path.normpath(os.path.join(rel, f)), label))
                elif not f.startswith("."):
                    skips.add_file(f, os.path.join(folder, f))
        if not found and classes:
            skips.add("empty class folder", name)
        candidates += found
    return _open_files(root, classes, candidates, skips, num_threads)


def _folder_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows links: the folder a link leads to
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _first_visit(path: str, visited: set, skips: _Skips) -> bool:
    """Whether the folder at `path` is walked: False (counted) when a link leads to a folder already walked."""
    key = _folder_key(path)
    if key is None:  # unreadable: os.walk skips it
        return True
    if key in visited:
        skips.add("link(s) to a folder listed already", path, ignored=True)
        return False
    visited.add(key)
    return True


def _open_file_list(path: str, num_threads: int) -> ImageSource:
    root = os.path.dirname(os.path.abspath(path))
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"file list {path!r} is unreadable: {err}") from err
    skips = _Skips()
    candidates = []
    for line in lines:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.lower().endswith(IMAGE_EXTENSIONS):
            candidates.append((name, -1))
        else:
            skips.add_file(name, name)
    if not candidates and not skips.reasons:
        raise ValueError(f"file list {path!r} is empty: expected one image path per line")
    return _open_files(root, [], candidates, skips, num_threads, name=path)


def _open_files(root: str, classes: list[str], candidates: list[tuple[str, int]], skips: _Skips, num_threads: int,
                name: str | None = None) -> ImageSource:
    """Validate image files (`candidates`: name relative to `root`, label) into a "folder" source."""
    files = [os.path.join(root, name) for name, _ in candidates]

    def identity():
        return [f"{path}\t{_stat_key(path)}" for path in files]

    results = _inspect_all(files, _inspect_file, num_threads, identity)
    entries = []
    for path, (name_, label), result in zip(files, candidates, results):
        if isinstance(result, str):
            skips.add(result, path)
        else:
            entries.append((name_, 0, 0, 0, label, *result))
    return _finish(name or root, "folder", [], classes, entries, skips, root=root)


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}\t{st.st_mtime_ns}"


def plain_tar(shard: str) -> str:
    """`shard` itself when it is an uncompressed tar, else its decompressed copy in the cache folder (made once:
    reading members at their offsets needs random access)."""
    try:
        with open_regular(shard) as f:
            magic = f.read(6)
    except OSError as err:
        raise ValueError(f"tar shard {shard!r} is unreadable: {err}") from err
    opener = next((op for prefix, op in _COMPRESSED.items() if magic.startswith(prefix)), None)
    if opener is None:
        return shard
    identity = f"{os.path.abspath(shard)}\t{_stat_key(shard)}"
    key = hashlib.sha1(identity.encode(errors="surrogateescape")).hexdigest()[:16]
    name = os.path.basename(shard)
    for suffix in TAR_SUFFIXES:
        name = name.removesuffix(suffix)
    plain = default_dataset_dir() / "untarred" / f"{name}-{key}.tar"
    if plain.is_file():
        return str(plain)
    logger.info("decompressing %s once into %s (tar members are read at their offsets)", shard, plain)
    tmp = plain.with_name(f".{plain.name}.{os.getpid()}.tmp")
    try:
        plain.parent.mkdir(parents=True, exist_ok=True)
        with opener(shard, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, plain)
    except (OSError, EOFError, lzma.LZMAError) as err:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"tar shard {shard!r} could not be decompressed into {plain}: {err} (or unpack it "
                         f"yourself: tar -xf {shard} -C DIR, and pass DIR)") from err
    return str(plain)


def _open_tars(root: str, shards: list[str], num_threads: int) -> ImageSource:
    shards = [plain_tar(shard) for shard in shards]
    members = []  # (shard index, name, offset, size)
    for s, shard in enumerate(shards):
        try:
            with tarfile.open(shard, mode="r:") as tar:
                members += [(s, m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        except (tarfile.TarError, OSError) as err:
            raise ValueError(f"tar shard {shard!r} is unreadable: {err}") from err
    fds = [os.open(shard, os.O_RDONLY) for shard in shards]
    try:
        skips = _Skips()
        if any(name.endswith(".cls") for _, name, _, _ in members):
            layout, classes, candidates = "webdataset", *_webdataset_samples(members, fds, skips)
        elif members and all("/" in name for _, name, _, _ in members if name.lower().endswith(IMAGE_EXTENSIONS)):
            layout, classes, candidates = "tar-folder", *_tar_folder_samples(members, skips)
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
        key = hashlib.sha1("\n".join(identity()).encode(errors="surrogateescape")).hexdigest()
        cache = default_dataset_dir() / "index" / f"{key}.json"
        try:
            results = json.loads(cache.read_text())
            if len(results) == len(items):
                logger.info("validation results of %d images read from %s", len(items), cache)
                return [r if isinstance(r, str) else tuple(r) for r in results]
        except (OSError, ValueError):
            pass  # no cache yet, or a damaged one: validate again
    with ThreadPoolExecutor(max(1, num_threads), initializer=_leave_signals_to_the_main_thread) as pool:
        results = list(pool.map(inspect, items, chunksize=256))
    if cache is not None:
        try:
            atomic_write(cache, lambda tmp: tmp.write_text(json.dumps(results)))
        except OSError as err:
            logger.warning("could not write the validation cache %s: %s", cache, err)
    return results


def _leave_signals_to_the_main_thread() -> None:
    """Block Ctrl-C and SIGTERM in a pool thread: the kernel then delivers them to the main thread, whose wait on the
    pool they interrupt, so a run blocked on a hung filesystem still stops at once."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _tar_folder_samples(members, skips):
    images = [m for m in members if m[1].lower().endswith(IMAGE_EXTENSIONS)]
    for _, name, _, _ in members:
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            skips.add_file(name, name)
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
        image_key = next((k for k in WEBDATASET_IMAGE_KEYS if k in parts), None)
        for ext, (name, _, _) in parts.items():
            if ext not in (image_key, "cls"):
                skips.add_file(name, name)
        if image_key is None:
            if not any(ext.endswith("gif") for ext in parts):
                skips.add("sample without an image", key)
            continue
        image = parts[image_key]
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


def _finish(name, layout, files, classes, entries, skips: _Skips, root=None) -> ImageSource:
    """The source of `entries`; `name` is the dataset in messages, `root` the folder names are relative to."""
    skips.report(name, len(entries), classes)
    if not entries:
        reasons = ", ".join(f"{count} {reason}" for reason, (count, _) in
                            sorted({**skips.reasons, **skips.ignored}.items()))
        raise ValueError(f"dataset {name!r} has no decodable images" + (f" ({reasons})" if reasons else ""))
    return ImageSource(root or name, layout, files, classes, entries, {k: list(v) for k, v in skips.reasons.items()},
                       {k: list(v) for k, v in skips.ignored.items()})
