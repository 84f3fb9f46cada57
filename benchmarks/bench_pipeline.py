"""Multi-crop data pipeline throughput (images/s) from JPEG files, per provider.

Providers: `official` (DINO's main_dino.py DataAugmentationDINO: torchvision transforms on PIL images,
ImageFolder, DataLoader workers; the baseline), `torchvision` (fastdino's fallback: PIL + torch in DataLoader
workers) and `dali` (fastdino's DALI pipeline: nvJPEG decoding and GPU ops on cuda, the CPU pipeline on cpu), all
producing
2 global + N local views per image. The script writes its own JPEGs of ImageNet-like size (sides 300-500 px,
~80 KB at quality 90) unless --data names an ImageFolder. Timing: warm-up batches (pipeline build, worker start),
then a timed run of --batches batches with the device synchronised at both ends only.

--step-ms T adds a check on cuda: a stand-in training step (bf16 matmuls taking about T ms) is timed alone and
while the pipeline feeds it, and the slowdown is reported (target: <= 10 %).

    python benchmarks/bench_pipeline.py                                          # GPU: 4096 images, batch 128
    python benchmarks/bench_pipeline.py --device cpu --images 32 --batch 8       # smoke test on CPU
"""
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import Table, base_parser, print_header

PROVIDERS = ("official", "torchvision", "dali")  # speedups are over the first one measured


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="JPEGs to generate (ignored with --data)")
    parser.add_argument("--data", default=None, help="an existing ImageFolder to read instead")
    parser.add_argument("--batch", type=int, default=128, help="images per batch")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader workers / DALI threads")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=2, help="batches before timing")
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--step-ms", type=float, default=0.0, help="cuda: also measure the slowdown of a "
                        "concurrent stand-in training step of about this many ms (0 = off)")
    return parser.parse_args()


def write_jpegs(root: Path, count: int, min_side: int, max_side: int, classes: int = 10) -> float:
    """ImageFolder of `count` photo-like JPEGs (smooth colour fields + texture); returns the mean size in KB."""
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(count):
        h, w = (int(s) for s in rng.integers(min_side, max_side + 1, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h),
                                                                                        Image.Resampling.BICUBIC)
        texture = rng.normal(0, 14, (h, w, 1)) * rng.uniform(0.5, 1.5, (1, 1, 3))
        pixels = (np.asarray(coarse, dtype=np.float64) + texture).clip(0, 255).astype(np.uint8)
        path = root / f"c{i % classes}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def official_loader(root, args):
    """DINO main_dino.py's DataAugmentationDINO over torchvision's ImageFolder (the reference recipe)."""
    from PIL import ImageFilter, ImageOps
    from torchvision import datasets, transforms

    class GaussianBlur:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            if torch.rand(1) > self.p:
                return img
            return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(0.1, 2.0))))

    class Solarization:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            return ImageOps.solarize(img) if torch.rand(1) < self.p else img

    bicubic = transforms.InterpolationMode.BICUBIC
    flip_and_color_jitter = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2)])
    normalize = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    global1 = transforms.Compose([transforms.RandomResizedCrop(args.global_size, scale=(0.4, 1.0),
                                                               interpolation=bicubic),
                                  flip_and_color_jitter, GaussianBlur(1.0), normalize])
    global2 = transforms.Compose([transforms.RandomResizedCrop(args.global_size, scale=(0.4, 1.0),
                                                               interpolation=bicubic),
                                  flip_and_color_jitter, GaussianBlur(0.1), Solarization(0.2), normalize])
    local = transforms.Compose([transforms.RandomResizedCrop(args.local_size, scale=(0.05, 0.4),
                                                             interpolation=bicubic),
                                flip_and_color_jitter, GaussianBlur(0.5), normalize])

    def transform(img):
        return [global1(img), global2(img)] + [local(img) for _ in range(args.local_crops)]

    dataset = datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                       pin_memory=args.device.startswith("cuda"), drop_last=True,
                                       persistent_workers=args.workers > 0)


def batches_forever(loader, labelled: bool):
    """Views of batch after batch, epoch after epoch (ImageFolder batches are [views, labels])."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for item in loader:
            yield item[0] if labelled else item
        epoch += 1


def to_device(views, device, dtype):
    return [v.to(device, dtype, non_blocking=True) for v in views]


def time_batches(stream, count, device, dtype, step=None) -> float:
    """Seconds for `count` batches (each moved to `device` and, if given, followed by `step`)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(count):
        to_device(next(stream), device, dtype)
        if step is not None:
            step()
    sync()
    return time.perf_counter() - start


def stand_in_step(device, target_ms):
    """A bf16 matmul chain taking about target_ms on `device` (a stand-in for a training step)."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    reps = max(1, round(target_ms / ((time.perf_counter() - start) * 1e3 / 10)))

    def step():
        for _ in range(reps):
            a @ b
    return step


def main():
    args = parse_args()
    from fastdino.pipelines import MultiCropConfig, build_loader

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print_header(str(device), dtype)
    tmp = None
    if args.data:
        root = Path(args.data)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
        root = tmp / "train"
        kb = write_jpegs(root, args.images, args.min_side, args.max_side)
        print(f"# {args.images} JPEGs of {args.min_side}-{args.max_side} px, mean {kb:.0f} KB, in {root}")
    crops = MultiCropConfig(global_crops_size=args.global_size, local_crops_number=args.local_crops,
                            local_crops_size=args.local_size)
    print(f"# views: 2 x {args.global_size}^2 + {args.local_crops} x {args.local_size}^2, batch {args.batch}, "
          f"{args.workers} workers")
    step = stand_in_step(device, args.step_ms) if args.step_ms > 0 and device.type == "cuda" else None
    step_alone = None
    if step is not None:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.batches):
            step()
        torch.cuda.synchronize(device)
        step_alone = (time.perf_counter() - start) / args.batches
        print(f"# stand-in step alone: {step_alone * 1e3:.1f} ms")
    table = Table(["provider", "device", "workers", "batch", "img_per_s", "ms_per_batch", "speedup",
                   "step_slowdown_pct"], args.csv)
    rates = {}
    try:
        for provider in args.providers:
            if provider == "official":
                loader = official_loader(root, args)
            else:
                loader = build_loader(str(root), crops, args.batch, backend=provider, device=device,
                                      num_workers=args.workers, dtype=dtype)
            stream = batches_forever(loader, labelled=provider == "official")
            time_batches(stream, args.warmup, device, dtype)
            seconds = time_batches(stream, args.batches, device, dtype)
            rates[provider] = args.batches * args.batch / seconds
            slowdown = float("nan")
            if step is not None:
                with_data = time_batches(stream, args.batches, device, dtype, step) / args.batches
                slowdown = 100 * (with_data - step_alone) / step_alone
            base = next(iter(rates.values()))
            table.add(provider=provider, device=str(device), workers=args.workers, batch=args.batch,
                      img_per_s=rates[provider], ms_per_batch=1e3 * seconds / args.batches,
                      speedup=rates[provider] / base, step_slowdown_pct=slowdown)
            if hasattr(loader, "close"):
                loader.close()
            del stream, loader
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
