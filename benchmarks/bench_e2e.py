"""End-to-end DINO training: fastdino against the official recipe in the same run, as images/s, model FLOP
utilisation (MFU) and peak memory, one row per (model, batch, data source, provider).

Providers:
- official: fastdino/official_dino.py, the official main_dino.py step restated (naive softmax(QKᵀ) attention, the
  backbone once per resolution, weight_norm head, per-pair loss loop, per-parameter EMA loop, fp16 autocast +
  GradScaler as its default, per-tensor clipping with host syncs). tests/test_official_baseline.py checks that it
  computes what fastdino computes. It should land near the official code's own figures on the H100
  (shared/gpu/README.md); being one process without DDP, it is if anything a little faster.
- fastdino: `fastdino.engine.train.Trainer.train_step` (config from bench_train_step.py) in its default precision
  (bf16 on CUDA): packed multi-crop forward with SDPA, stochastic depth that skips dropped images, Triton loss and
  EMA kernels, fused AdamW, no host sync.
- fastdino-compile: the same Trainer with model.compile=true (each block, the head and the torch loss compiled);
  the fastdino provider runs model.compile=false and optim.cuda_graph=false (the eager step the step model costs).
- fastdino-step-graph: the eager Trainer with optim.cuda_graph=step (the whole step replayed as one CUDA graph).
- fastdino-selective: the fastdino provider (eager) with model.activation_checkpointing=selective (every block
  keeps its matmul and attention outputs and recomputes the rest in backward; engine/parallelize.py).

Both providers run the same recipe (vit_small16_imagenet with the model, batch and crops of the row; the head's
last layer is not frozen, so every step does the full update). Data sources:
- device: random crops already on the GPU (the device); the step alone.
- jpeg: JPEG files decoded every step. fastdino reads them through `fastdino.pipelines.build_loader` (DALI on the
  GPU when installed; the notes say which backend ran), the official recipe through its PIL/torchvision
  DataLoader (bench_pipeline.official_loader). Unless --jpeg names a folder, ImageNet-sized synthetic JPEGs are
  written first (bench_pipeline.write_jpegs; --jpeg-unique distinct files, hard-linked up to --jpeg-images so an
  epoch outlasts the timed window). Warm-up is one batch per worker and the timed window two, so that the
  DataLoader's first burst of prefetched batches does not count as throughput.

Warm-up steps run first (and more until the official fp16 GradScaler stops skipping overflowing steps while it
lowers its scale); the timed window synchronises at its edges only (the official step itself syncs every step).
MFU = model FLOPs per image (`step_flops_per_image`, counted from the model's shapes: student forward + backward
over all crops, teacher forward over the 2 global crops, no savings from stochastic depth) x images/s, over the
bf16 matrix-product rate measured at start (or --peak-tflops). Peak memory is the CUDA allocator's peak over the
timed window (weights and optimizer state included). Rows print as they finish; a markdown table with the
command, device and date follows, ready for benchmarks/RESULTS.md. Rows that would start after --time-limit
minutes are skipped, so that the table always prints.

GPU (about 5 min, an estimate; --time-limit guards it):
               python benchmarks/bench_e2e.py --markdown $OUT/e2e.md --csv $OUT/e2e.csv
CPU smoke:     python benchmarks/bench_e2e.py --device cpu --dtype float32 --archs vit_tiny/8 --batch 2 \
                   --out-dim 256 --local-crops 2 --global-size 32 --local-size 16 --steps 2 --warmup 1 \
                   --jpeg-archs vit_tiny/8 --jpeg-images 16 --jpeg-unique 4 --workers 0
"""
import datetime
import fnmatch
import gc
import itertools
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn as nn

from bench_pipeline import batches_forever, official_loader, write_jpegs
from bench_train_step import config as train_step_config
from common import Table, base_parser, measure_ms, print_header
from fastdino import official_dino
from fastdino.engine import config as C
from fastdino.engine.model import build_model
from fastdino.engine.train import Trainer

PROVIDERS = ("official", "fastdino", "fastdino-compile", "fastdino-selective", "fastdino-step-graph")
SOURCES = ("device", "jpeg")
STEPS_PER_EPOCH = 1000  # schedule length only: every row stays far inside the recipe's first epochs
MAX_SETTLE_STEPS = 30  # fp16 loss scaling from 2**16 needs one skipped step per halving
COLUMNS = ["model", "batch", "data", "provider", "img_per_s", "ms_step", "tflops", "mfu_pct", "peak_gib", "speedup",
           "notes"]


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vit_small/16", "vit_small/8", "vit_base/16"],
                        help="ARCH/PATCH of each model")
    parser.add_argument("--batch", nargs="+", type=int, default=[64, 128], help="images per GPU")
    parser.add_argument("--out-dim", type=int, default=65536, help="K prototypes")
    parser.add_argument("--embed-dim", type=int, default=None, help="override of every model's width (smoke runs)")
    parser.add_argument("--depth", type=int, default=None, help="override of every model's depth (smoke runs)")
    parser.add_argument("--num-heads", type=int, default=None, help="override of every model's heads (smoke runs)")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--providers", nargs="+", default=["official", "fastdino"], choices=PROVIDERS)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--jpeg-archs", nargs="+", default=["vit_small/16"],
                        help="models that also get rows from JPEG files")
    parser.add_argument("--only", nargs="+", default=None,
                        help="fnmatch patterns over 'ARCH/PATCH@BATCH' (e.g. 'vit_small/16@128'); default all")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (data on the device)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (data on the device)")
    parser.add_argument("--jpeg", default=None, help="an ImageFolder of JPEGs to read (default: synthetic ones)")
    parser.add_argument("--jpeg-images", type=int, default=8192, help="files of the synthetic JPEG folder")
    parser.add_argument("--jpeg-unique", type=int, default=1024, help="distinct synthetic JPEGs (300-500 px)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader workers / DALI threads")
    parser.add_argument("--data-backend", default="auto", choices=["auto", "dali", "torchvision"],
                        help="fastdino's loader backend")
    parser.add_argument("--official-fp16", choices=["on", "off"], default=None,
                        help="the official --use_fp16 (default: on with CUDA, as main_dino.py)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="MFU denominator (default: measured bf16 matrix products)")
    parser.add_argument("--time-limit", type=float, default=8.0, help="minutes; later rows are skipped")
    parser.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    if args.official_fp16 is None:
        args.official_fp16 = "on" if args.device.startswith("cuda") else "off"
    return args


# ------------------------------------------------------------------------------------------------ model FLOPs

def forward_flops(model: nn.Module, image_size: int) -> tuple[int, int]:
    """(patch embedding, everything else) matmul FLOPs of one image's forward at `image_size`, read from the
    shapes of `model` (fastdino's DINOModel or the official MultiCropWrapper: same module names)."""
    backbone, head = model.backbone, model.head
    conv = backbone.patch_embed.proj
    d, p = backbone.embed_dim, conv.kernel_size[0]
    patches = (image_size // p) ** 2
    n = patches + 1  # tokens, CLS included
    hidden = backbone.blocks[0].mlp.fc1.out_features
    embed = 2 * patches * conv.in_channels * p * p * d
    linear = 3 * d * d + d * d + 2 * d * hidden  # qkv, proj, fc1, fc2 multiply-adds per token
    attention = 2 * n * d  # q kᵀ and attn v multiply-adds per token, summed over heads
    blocks = len(backbone.blocks) * 2 * n * (linear + attention)
    head_shapes = [m.weight.shape for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    head_shapes.append(head.last_layer.weight_v.shape)
    return embed, blocks + sum(2 * out * inp for out, inp in head_shapes)


def step_flops_per_image(model: nn.Module, crop_sizes: list[int], teacher_crops: int = 2) -> int:
    """Model FLOPs of one DINO step per image: student forward + backward (2x forward, except the patch embedding,
    which needs no input gradient: 1x) over every crop, teacher forward over the first `teacher_crops`."""
    total = 0
    for i, size in enumerate(crop_sizes):
        embed, rest = forward_flops(model, size)
        total += 2 * embed + 3 * rest + (embed + rest if i < teacher_crops else 0)
    return total


def matmul_tflops(device: str, n: int = 8192) -> float:
    """Measured bf16 matrix-product rate, TFLOP/s (the MFU denominator)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (measure_ms(lambda: a @ b, device)[0] * 1e-3) / 1e12


# ------------------------------------------------------------------------------------------------- providers

def row_config(args, arch: str, patch: int, batch: int) -> C.TrainConfig:
    """The recipe of one row: bench_train_step's config (the head's last layer trained from step 0)."""
    shape = SimpleNamespace(arch=arch, patch_size=patch, global_size=args.global_size, out_dim=args.out_dim,
                            batch_size=batch, local_size=args.local_size, local_crops=args.local_crops,
                            mode="single", dtype=args.dtype, embed_dim=args.embed_dim, depth=args.depth,
                            num_heads=args.num_heads)
    return train_step_config(shape, 1, "auto", compile_="false")


@dataclass
class Provider:
    """A freshly built training setup of one provider."""

    step: Callable[[list[torch.Tensor]], None]
    """One training step on a list of crops (on the device, or in host memory for the official loader)."""
    sync: Callable[[], float]
    """Waits for every queued step; returns their mean loss (the official step syncs anyway, fastdino only here)."""
    skipped: Callable[[], int]
    """Steps so far whose update was skipped (fp16 overflow or non-finite gradient), as of the last sync."""
    teacher_backbone: nn.Module
    """The teacher's ViT (for evaluation)."""
    notes: str
    """Precision."""


def build_provider(provider: str, cfg: C.TrainConfig, args, device: torch.device,
                   steps_per_epoch: int = STEPS_PER_EPOCH) -> Provider:
    """The official step (official_dino.py) or fastdino's Trainer for `cfg`; schedules of `cfg.epochs` epochs of
    `steps_per_epoch` steps."""
    if provider == "official":
        official_args = official_dino.args_from_config(cfg, use_fp16=args.official_fp16 == "on")
        run = official_dino.build(official_args, steps_per_epoch, device)
        counter, losses, skipped = itertools.count(), [], [0]

        def step(crops):
            it = next(counter)
            scale = run.fp16_scaler.get_scale() if run.fp16_scaler is not None else None
            losses.append(official_dino.train_step(run, crops, it, epoch=it // steps_per_epoch))
            if scale is not None and run.fp16_scaler.get_scale() < scale:  # GradScaler skipped the update
                skipped[0] += 1

        def sync():
            mean = sum(losses) / len(losses) if losses else float("nan")
            losses.clear()
            return mean

        precision = "fp16+GradScaler" if run.fp16_scaler is not None else "fp32"
        return Provider(step, sync, lambda: skipped[0], run.teacher.backbone, precision)
    if provider == "fastdino-compile":
        cfg = C.apply_overrides(cfg, overrides=["model.compile=true"])
    if provider == "fastdino-selective":
        cfg = C.apply_overrides(cfg, overrides=["model.activation_checkpointing=selective"])
    if provider == "fastdino-step-graph":  # eager, the whole step replayed as one CUDA graph
        cfg = C.apply_overrides(cfg, overrides=["optim.cuda_graph=step"])
    trainer = Trainer(cfg, steps_per_epoch=steps_per_epoch, device=device)
    skipped = [0]

    def sync():
        stats = trainer.stats.read()  # the one host sync of fastdino's loop
        skipped[0] += stats["skipped_steps"]
        return stats["loss"]

    return Provider(trainer.train_step, sync, lambda: skipped[0], trainer.teacher.backbone, trainer.precision.name)


def jpeg_folder(args, tmp: Path) -> tuple[Path, str]:
    """(--jpeg, or a folder of --jpeg-images synthetic JPEG files (--jpeg-unique distinct ones, hard-linked), what
    it holds)."""
    if args.jpeg:
        return Path(args.jpeg), f"the JPEG files of {args.jpeg}"
    unique, root = tmp / "unique", tmp / "train"
    kb = write_jpegs(unique, args.jpeg_unique, 300, 500)
    files = sorted(unique.rglob("*.jpg"))
    for i in range(args.jpeg_images):
        source = files[i % len(files)]
        target = root / source.parent.name / f"{i:07d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
    what = f"{args.jpeg_images} synthetic JPEG files ({len(files)} distinct, 300-500 px, mean {kb:.0f} KB)"
    print(f"# {what} in {root}")
    return root, what


def batch_stream(source: str, loader_kind: str, cfg: C.TrainConfig, args, device: torch.device,
                 folder: Path | str | None):
    """(endless iterator of crop lists, loader to close or None, notes) of one data source: random crops on the
    device ("device"), or JPEG files in `folder` ("jpeg") through the official recipe's PIL DataLoader
    (`loader_kind` "official"; `folder` must be an ImageFolder) or fastdino's loader ("fastdino")."""
    d = cfg.data
    if source == "device":
        sizes = [d.global_crops_size] * 2 + [d.local_crops_size] * d.local_crops_number
        return itertools.repeat([torch.randn(d.batch_size, 3, s, s, device=device) for s in sizes]), None, ""
    if loader_kind == "official":
        shape = SimpleNamespace(global_size=d.global_crops_size, local_size=d.local_crops_size,
                                local_crops=d.local_crops_number, batch=d.batch_size, workers=args.workers,
                                device=str(device))
        return batches_forever(official_loader(folder, shape), labelled=True), None, "PIL DataLoader"
    from fastdino.pipelines import build_loader

    loader = build_loader(str(folder), d, d.batch_size, seed=cfg.seed, backend=args.data_backend, device=device,
                          num_workers=args.workers)
    return batches_forever(loader, labelled=False), loader, f"{loader.backend} loader"


def warmup_and_steps(source: str, warmup: int, steps: int, workers: int) -> tuple[int, int]:
    """Untimed and timed steps of a row: from JPEG, at least one batch per worker drains the DataLoader's first
    burst of prefetched batches, and at least two per worker are timed."""
    if source == "device":
        return warmup, steps
    return max(warmup, workers), max(steps, 2 * workers)


def time_steps(built: Provider, stream, warmup: int, steps: int, device: torch.device) -> tuple[float, float, int]:
    """(seconds for `steps` steps, peak GiB allocated during them, steps among them whose update was skipped).

    First `warmup` untimed steps, then more until one is not skipped: fp16 loss scaling starts high and skips the
    (cheaper) update of every overflowing step while it halves its scale, which must not count as speed."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        built.step(next(stream))
    built.sync()
    for _ in range(MAX_SETTLE_STEPS):
        before = built.skipped()
        built.step(next(stream))
        built.sync()
        if built.skipped() == before:
            break
    skipped = built.skipped()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        built.step(next(stream))
    built.sync()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return seconds, peak, built.skipped() - skipped


def run_row(provider: str, source: str, cfg: C.TrainConfig, args, device: torch.device, folder: Path | None):
    """(seconds per step, peak GiB, notes) of one provider on one data source; everything is freed on return."""
    loader = None
    try:
        built = build_provider(provider, cfg, args, device)
        kind = "official" if provider == "official" else "fastdino"
        stream, loader, data_notes = batch_stream(source, kind, cfg, args, device, folder)
        warmup, steps = warmup_and_steps(source, args.warmup, args.steps, args.workers)
        seconds, peak, skipped = time_steps(built, stream, warmup, steps, device)
        skips = f"{skipped}/{steps} updates skipped" if skipped else ""
        return seconds / steps, peak, ", ".join(n for n in (built.notes, data_notes, skips) if n)
    finally:
        if loader is not None:
            loader.close()


def release_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # main_dino.py sets it; it applies to both providers' patch embedding
    print_header(args.device, getattr(torch, args.dtype))
    peak_tflops = args.peak_tflops or (matmul_tflops(args.device) if device.type == "cuda" else None)
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    print(f"# K={args.out_dim}, crops 2x{args.global_size}² + {args.local_crops}x{args.local_size}², "
          f"peak bf16 matmul {peak_tflops or float('nan'):.0f} TFLOP/s, official fp16 {args.official_fp16}")
    started = time.perf_counter()
    table, rows_md, flops_md = Table(COLUMNS, args.csv), [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench_e2e_")) if "jpeg" in args.sources else None
    try:
        folder, jpeg_notes = jpeg_folder(args, tmp) if tmp is not None else (None, "")
        for model_name, batch in itertools.product(args.archs, args.batch):
            arch, patch = model_name.split("/")
            label = f"{model_name}@{batch}"
            if args.only and not any(fnmatch.fnmatch(label, pattern) for pattern in args.only):
                continue
            cfg = row_config(args, arch, int(patch), batch)
            with torch.device("meta"):
                flops = step_flops_per_image(build_model(cfg, student=True), sizes)
            flops_md.append(f"{model_name} {flops / 1e9:.1f}")
            baseline = {}
            for source, provider in itertools.product(args.sources, args.providers):
                if source == "jpeg" and model_name not in args.jpeg_archs:
                    continue
                nan = float("nan")
                row = dict(model=model_name, batch=batch, data=source, provider=provider, img_per_s=nan,
                           ms_step=nan, tflops=nan, peak_gib=nan, notes="")
                if (time.perf_counter() - started) / 60 > args.time_limit:
                    row["notes"] = f"skipped: past --time-limit {args.time_limit} min"
                else:
                    try:
                        seconds, peak, notes = run_row(provider, source, cfg, args, device, folder)
                        row.update(img_per_s=batch / seconds, ms_step=seconds * 1e3, peak_gib=peak, notes=notes,
                                   tflops=flops * batch / seconds / 1e12)
                    except torch.OutOfMemoryError:
                        row["notes"] = "out of memory"
                    except (RuntimeError, ValueError, FloatingPointError) as err:  # a backend that cannot run
                        reason = (str(err).strip().splitlines() or [""])[0][:120]
                        row["notes"] = f"{type(err).__name__}: {reason}"
                    finally:
                        release_memory(device)
                if provider == "official":
                    baseline[source] = row["img_per_s"]
                row["mfu_pct"] = 100 * row["tflops"] / peak_tflops if peak_tflops else nan
                row["speedup"] = row["img_per_s"] / baseline.get(source, nan)
                table.add(**row)
                rows_md.append(row)
                save(table, rows_md, args, peak_tflops, flops_md, jpeg_notes)  # every row: a killed run keeps them
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + save(table, rows_md, args, peak_tflops, flops_md, jpeg_notes))


def save(table: Table, rows: list[dict], args, peak_tflops: float | None, flops: list[str], jpeg_notes: str) -> str:
    """Write the rows so far to --markdown (the table wrote --csv); returns the markdown."""
    markdown = to_markdown(rows, args, peak_tflops, flops, jpeg_notes)
    if args.markdown:
        Path(args.markdown).write_text(markdown)
    return markdown


def to_markdown(rows: list[dict], args, peak_tflops: float | None, flops: list[str], jpeg_notes: str) -> str:
    import triton

    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    def cell(value, fmt):
        return "–" if isinstance(value, float) and value != value else format(value, fmt)

    lines = [
        "### End-to-end DINO train step: fastdino vs the official recipe",
        "",
        f"- command: `{command}`",
        f"- device: {device}; torch {torch.__version__}, triton {triton.__version__}; {date}",
        f"- vit_small16_imagenet recipe per model, K={args.out_dim}, 2×{args.global_size}² + "
        f"{args.local_crops}×{args.local_size}² crops; official: fp16 {args.official_fp16}; fastdino: {args.dtype}",
        "- data: device = random crops already on the GPU (the step alone); jpeg = "
        + (f"{jpeg_notes} decoded every step, {args.workers} workers" if jpeg_notes else "not run"),
        f"- model GFLOP per image (student fwd+bwd, teacher fwd): {', '.join(flops)}; MFU against "
        + (f"{peak_tflops:.0f} TFLOP/s (bf16 matrix products measured in this run)" if peak_tflops else "no peak"),
        "",
        "| model | batch | data | provider | img/s | ms/step | TFLOP/s | MFU % | peak GiB | speedup | notes |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['data']} | {r['provider']} | {cell(r['img_per_s'], '.0f')} "
                     f"| {cell(r['ms_step'], '.1f')} | {cell(r['tflops'], '.3g')} | {cell(r['mfu_pct'], '.1f')} "
                     f"| {cell(r['peak_gib'], '.1f')} | {cell(r['speedup'], '.2f')} | {r['notes']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
