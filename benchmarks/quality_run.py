"""Fixed wall-clock DINO pretraining of ViT-S/16 on Imagenette with fastdino and with the official recipe, then
k-NN accuracy (k=20, T=0.07) of the teacher on the validation split against minutes of training.

Providers (one or more per invocation; the wall clock of each is its own):
- fastdino: `fastdino.engine.train.Trainer` fed by `fastdino.pipelines.build_loader` (DALI on the GPU when it is
  installed, else the torchvision fallback; the log says which).
- official: fastdino/official_dino.py (the official main_dino.py step) fed by the official PIL/torchvision
  DataLoader (bench_pipeline.official_loader), i.e. what running the official code gives.
- official-fastdata: the official step fed by fastdino's loader, to separate the step from the data pipeline.

Both run the same recipe: the vit_small16_imagenet preset (the paper's 100-epoch ViT-S/16 run: K=65536, lr 5e-4 x
batch/256 with a 10-epoch warmup, teacher temperature 0.04 -> 0.07 over 30 epochs, momentum 0.996 -> 1, weight
decay 0.04 -> 0.4, last layer frozen for 1 epoch) with the batch of --batch, compressed into the budget: a
throughput probe on a throw-away copy of each provider (same data pipeline; not counted) says how many steps the
budget affords, and the schedules span exactly that many steps, cut into 100 "recipe epochs". Training then runs
until the schedule ends or the budget is spent. The clock counts everything from the loader's construction to the
last step (pipeline start-up, compilation and warm-up included) except the k-NN evaluations, which pause it. The
evaluations run at 0 and at every 1/--evals of the budget (or of --train-steps), on train/val images decoded once at
start and kept on the device, through `fastdino.engine.eval.extract_features` and `knn_classify`.

With --train-steps N both providers run the same N steps (no budget): the same number of steps should give the same
accuracy within noise (use official-fastdata to give both the same data pipeline).

Rows are appended to --results (JSON lines), so providers run in separate invocations (one per 10-minute command
on the GPU machine) merge: each invocation ends by printing the markdown table of every row in that file.

Data: --data is a folder with train and val splits, as folders or tar shards (shared/data/imagenette holds
train-{0,1,2}.tar and val.tar: pass the folder as is). The official DataLoader needs an ImageFolder, so tar shards
are unpacked into a temporary folder for it. Without --data, a small synthetic shapes dataset is generated
(smoke test).

On the GPU machine. It sees only the repository, each call carries at most 64 MiB, and /tmp there lasts only while
the machine stays warm (30 s after a call), so the tars and the DALI wheels go in ~62 MiB parts, one per call,
issued back to back. Here, in the repository root:
    bash ../shared/gpu/pack_dali.sh >/dev/null && mkdir -p /tmp/bundle/imagenette && rm -f /tmp/bundle.tar
    for i in $(seq 0 $(($(ls -d .device_carry/c* | wc -l) - 1))); do cat .device_carry/c$i/part; done \
        | tar -C /tmp/bundle -xf - && cp ../shared/data/imagenette/*.tar /tmp/bundle/imagenette/
    tar -C /tmp/bundle -cf /tmp/bundle.tar wheels imagenette && rm -rf .device_carry && mkdir .device_carry
    split -b 62m -d -a 1 /tmp/bundle.tar .device_carry/p && for p in .device_carry/p*; do
        mkdir -p .device_carry/c${p##*p}; mv $p .device_carry/c${p##*p}/part; done
Then call k (k = 0, 1, ...) carries [".device_carry/ck"] and starts with `cat .device_carry/ck/part >> /tmp/b.tar`;
after the last part: `tar -C /tmp -xf /tmp/b.tar && python3 -m pip install -q --no-index --no-deps --no-compile
--target /tmp/site /tmp/wheels/*.whl`; every call that runs Python first does `export PYTHONPATH=/tmp/site
PYTHONUNBUFFERED=1; python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .`. Then:
    python benchmarks/quality_run.py --data /tmp/imagenette --providers fastdino --minutes 4 \
        --results /tmp/quality.jsonl --markdown $OUT/quality.md
    python benchmarks/quality_run.py --data /tmp/imagenette --providers official --minutes 4 \
        --results /tmp/quality.jsonl --markdown $OUT/quality.md
(each under 10 minutes: budget + throughput probe + 5 k-NN evaluations + start-up).
CPU smoke:
    python benchmarks/quality_run.py --device cpu --dtype float32 --arch vit_tiny --patch-size 8 --batch 8 \
        --out-dim 256 --local-crops 2 --global-size 32 --local-size 16 --minutes 0.2 --evals 1 --workers 0 \
        --probe-steps 2 --sync-every 5 --providers fastdino official --results /tmp/quality_smoke.jsonl
"""
import datetime
import glob
import json
import logging
import math
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from bench_e2e import batch_stream, build_provider, release_memory, time_steps, warmup_and_steps
from bench_train_step import config as train_step_config
from common import base_parser, print_header
from fastdino.engine import config as C
from fastdino.engine.eval import extract_features, knn_classify
from fastdino.engine.model import build_model
from fastdino.pipelines import build_eval_loader, make_shapes_dataset, resolve_split

# provider -> (training step for bench_e2e.build_provider, data loader for bench_e2e.batch_stream)
PROVIDERS = {"fastdino": ("fastdino", "fastdino"), "official": ("official", "official"),
             "official-fastdata": ("official", "fastdino")}


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="dataset with train and val splits (default: synthetic)")
    parser.add_argument("--providers", nargs="+", default=["fastdino", "official"], choices=PROVIDERS)
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget per provider")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="run exactly this many steps (rounded down to whole recipe epochs) instead of a budget")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--out-dim", type=int, default=65536, help="K prototypes")
    parser.add_argument("--embed-dim", type=int, default=None, help="override of the arch's width (smoke runs)")
    parser.add_argument("--depth", type=int, default=None, help="override of the arch's depth (smoke runs)")
    parser.add_argument("--num-heads", type=int, default=None, help="override of the arch's heads (smoke runs)")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--workers", type=int, default=16, help="DataLoader workers / DALI threads")
    parser.add_argument("--data-backend", default="auto", choices=["auto", "dali", "torchvision"],
                        help="fastdino's loader backend")
    parser.add_argument("--official-fp16", choices=["on", "off"], default=None,
                        help="the official --use_fp16 (default: on with CUDA, as main_dino.py)")
    parser.add_argument("--evals", type=int, default=4, help="k-NN evaluations after the one at 0")
    parser.add_argument("--knn-k", type=int, default=20)
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--eval-batch", type=int, default=256)
    parser.add_argument("--sync-every", type=int, default=20, help="steps between host syncs (loss, clock)")
    parser.add_argument("--probe-steps", type=int, default=10, help="at least this many timed probe steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default="quality_results.jsonl", help="JSON lines file the rows go to")
    parser.add_argument("--markdown", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    if args.official_fp16 is None:
        args.official_fp16 = "on" if args.device.startswith("cuda") else "off"
    return args


def recipe(args) -> C.TrainConfig:
    """The vit_small16_imagenet preset with this run's model, batch, crops and seed (bench_train_step's config)."""
    shape = SimpleNamespace(arch=args.arch, patch_size=args.patch_size, global_size=args.global_size,
                            out_dim=args.out_dim, batch_size=args.batch, local_size=args.local_size,
                            local_crops=args.local_crops, mode="single", dtype=args.dtype, embed_dim=args.embed_dim,
                            depth=args.depth, num_heads=args.num_heads)
    return C.apply_overrides(train_step_config(shape, 1, "auto"), overrides=[f"seed={args.seed}"])


# ------------------------------------------------------------------------------------------------------ data

def dataset(args, tmp: Path) -> str:
    """--data, or a small synthetic shapes dataset (train/ and val/) for smoke tests."""
    if args.data:
        return args.data
    return str(make_shapes_dataset(tmp / "shapes", num_train=96, num_val=48, image_size=48, seed=args.seed))


def image_folder(train_split: str, tmp: Path) -> Path:
    """An ImageFolder of the training split for torchvision: the split itself, or its tar shards unpacked."""
    if Path(train_split).is_dir():
        return Path(train_split)
    root = tmp / "unpacked"
    for shard in sorted(glob.glob(train_split)):
        with tarfile.open(shard) as tar:
            tar.extractall(root, filter="data")
    nested = root / "train"  # shards of SPLIT/CLASS/FILE (shared/data/README.md)
    return nested if nested.is_dir() else root


class KNN:
    """Weighted k-NN top-1/top-5 of a teacher backbone on the val split, with train and val images decoded once."""

    def __init__(self, data: str, args, cfg: C.TrainConfig, device: torch.device):
        self.args, self.device = args, device
        self.backbone = build_model(cfg, student=False).backbone.to(device)  # weights: the teacher's, at each call
        # Kept on the device in fp16 (≈4 GB for Imagenette at 224²): each evaluation is then forward passes only.
        self.store = torch.float16 if device.type == "cuda" else torch.float32
        self.splits, classes = {}, []
        for split in ("train", "val"):
            loader = build_eval_loader(resolve_split(data, split), image_size=args.global_size,
                                       batch_size=args.eval_batch, num_workers=args.workers, device=str(device))
            self.splits[split] = [(images.to(self.store), labels) for images, labels in loader]
            classes.append(list(loader.classes))
        if classes[0] != classes[1]:
            raise ValueError(f"{data}: train and val have different classes ({classes[0]} vs {classes[1]})")
        self.num_classes = len(classes[0])

    def __call__(self, teacher_backbone: torch.nn.Module) -> dict[str, float]:
        args = self.args
        self.backbone.load_state_dict(teacher_backbone.state_dict())  # official and fastdino ViTs share names
        feats = {split: extract_features(self.backbone, ((x.float(), y) for x, y in batches), self.device)
                 for split, batches in self.splits.items()}
        result = knn_classify(*feats["train"], *feats["val"], ks=(args.knn_k,), temperature=args.knn_temperature,
                              num_classes=self.num_classes)
        return result[args.knn_k]


class Clock:
    """Wall-clock seconds that can be paused."""

    def __init__(self):
        self.total, self.since = 0.0, time.perf_counter()

    def seconds(self) -> float:
        return self.total + (time.perf_counter() - self.since if self.since is not None else 0.0)

    def pause(self) -> None:
        self.total, self.since = self.seconds(), None

    def resume(self) -> None:
        self.since = time.perf_counter()


# -------------------------------------------------------------------------------------------------- training

def data_source(provider: str, train_split: str, tmp: Path) -> tuple[str, Path | str]:
    """(loader kind for bench_e2e.batch_stream, what it reads) of a provider."""
    kind = PROVIDERS[provider][1]
    return kind, image_folder(train_split, tmp) if kind == "official" else train_split


def probe(provider: str, cfg: C.TrainConfig, args, device: torch.device, source) -> float:
    """Images/s of a throw-away copy of `provider` on its data pipeline (warm-up drained, as bench_e2e)."""
    kind, folder = source
    loader = None
    try:
        built = build_provider(PROVIDERS[provider][0], cfg, args, device)
        stream, loader, _ = batch_stream("jpeg", kind, cfg, args, device, folder)
        warmup, steps = warmup_and_steps("jpeg", 3, args.probe_steps, args.workers)
        seconds, _, _ = time_steps(built, stream, warmup, steps, device)
        return steps * cfg.data.batch_size / seconds
    finally:
        if loader is not None:
            loader.close()
        release_memory(device)


def train(provider: str, cfg: C.TrainConfig, args, device: torch.device, source, knn: KNN, num_images: int,
          save: Callable[[dict], None]) -> None:
    """Train `provider` for the budget (or --train-steps), evaluating on the way; each result row goes to `save` as
    soon as it is measured (a run stopped part-way keeps its evaluations)."""
    batch = cfg.data.batch_size
    img_per_s = float("nan")
    if args.train_steps:
        total_steps = args.train_steps
    else:
        img_per_s = probe(provider, cfg, args, device, source)
        total_steps = int(args.minutes * 60 * img_per_s / batch)
    steps_per_epoch = max(1, total_steps // cfg.epochs)  # one "recipe epoch"
    total_steps = steps_per_epoch * cfg.epochs
    budget = math.inf if args.train_steps else args.minutes * 60
    print(f"# {provider}: probe {img_per_s:.0f} img/s -> schedules of {total_steps} steps "
          f"({cfg.epochs} recipe epochs of {steps_per_epoch}), budget {budget / 60:.1f} min", flush=True)

    torch.manual_seed(cfg.seed)
    built = build_provider(PROVIDERS[provider][0], cfg, args, device, steps_per_epoch=steps_per_epoch)
    kind, folder = source
    clock = Clock()
    stream, loader, notes = batch_stream("jpeg", kind, cfg, args, device, folder)
    loss, step, printed, evaluated_at = float("nan"), 0, 0.0, None

    def evaluate():
        nonlocal evaluated_at
        clock.pause()
        result = knn(built.teacher_backbone)
        row = dict(provider=provider, notes=f"{built.notes}, {notes}", step=step, total_steps=total_steps,
                   minutes=clock.seconds() / 60, images_seen=step * batch, data_epochs=step * batch / num_images,
                   loss=loss, knn_top1=result["top1"], knn_top5=result["top5"], probe_img_per_s=img_per_s,
                   budget_minutes=None if args.train_steps else args.minutes)
        print(f"  {provider} step {step}/{total_steps} at {row['minutes']:.2f} min: loss {loss:.4f}, k-NN top-1 "
              f"{row['knn_top1']:.2f}% top-5 {row['knn_top5']:.2f}%", flush=True)
        save(row)
        evaluated_at = step
        clock.resume()

    try:
        evaluate()
        next_eval = 1
        while step < total_steps:
            built.step(next(stream))
            step += 1
            if step % args.sync_every and step != total_steps:
                continue
            loss = built.sync()  # host sync: the loss, and an honest clock
            elapsed = clock.seconds()
            if elapsed - printed >= 30:
                printed = elapsed
                print(f"  {provider} step {step}/{total_steps}, {elapsed / 60:.2f} min, loss {loss:.4f}, "
                      f"{step * batch / elapsed:.0f} img/s", flush=True)
            if elapsed >= budget:
                break
            progress = elapsed / budget if budget < math.inf else step / total_steps
            if progress >= next_eval / args.evals:
                evaluate()
                next_eval = math.floor(progress * args.evals) + 1
        if evaluated_at != step:
            evaluate()
    finally:
        if loader is not None:
            loader.close()


# --------------------------------------------------------------------------------------------------- results

def to_markdown(rows: list[dict], header: dict) -> str:
    lines = [
        "### Short-budget DINO pretraining: k-NN accuracy vs minutes",
        "",
        f"- commands: {'; '.join(f'`{c}`' for c in header['commands'])}",
        f"- device: {header['device']}; {header['date']}",
        f"- data: {header['data']}; recipe: {header['recipe']}; k-NN k={header['k']}, "
        f"T={header['temperature']} on the val split",
        "",
        "| provider | minutes | step | of | images seen | data epochs | loss | k-NN top-1 % | top-5 % | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['provider']} | {r['minutes']:.2f} | {r['step']} | {r['total_steps']} | "
                     f"{r['images_seen']} | {r['data_epochs']:.1f} | {r['loss']:.4f} | {r['knn_top1']:.2f} | "
                     f"{r['knn_top5']:.2f} | {r['notes']} |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    device = torch.device(args.device)
    print_header(args.device, getattr(torch, args.dtype))
    cfg = recipe(args)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    tmp = Path(tempfile.mkdtemp(prefix="quality_run_"))
    try:
        data = dataset(args, tmp)
        train_split = resolve_split(data, "train")
        knn = KNN(data, args, cfg, device)
        num_images = sum(len(labels) for _, labels in knn.splits["train"])
        with open(args.results, "a", buffering=1) as results:  # line-buffered: each row on disk as written

            def save(row: dict) -> None:
                row.update(command=command, device=device_name, data=data,
                           date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
                results.write(json.dumps(row) + "\n")

            for provider in args.providers:
                train(provider, cfg, args, device, data_source(provider, train_split, tmp), knn, num_images, save)
                release_memory(device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    header = dict(commands=list(dict.fromkeys(r["command"] for r in rows)),
                  device=", ".join(dict.fromkeys(r["device"] for r in rows)),
                  date=", ".join(dict.fromkeys(r["date"][:10] for r in rows)), k=args.knn_k,
                  data=", ".join(dict.fromkeys(r["data"] for r in rows)),
                  temperature=args.knn_temperature,
                  recipe=f"vit_small16_imagenet preset as {args.arch}/{args.patch_size}, K={args.out_dim}, batch "
                         f"{args.batch}, 2×{args.global_size}² + {args.local_crops}×{args.local_size}², schedules "
                         f"sized to each provider's budget")
    markdown = to_markdown(rows, header)
    print("\n" + markdown)
    if args.markdown:
        Path(args.markdown).write_text(markdown)


if __name__ == "__main__":
    main()
