"""Continued pretraining on the CPU, measured (issue 25): does `fastdino train --init` adapt a backbone to a shifted
domain?

1. Pretrain a tiny DINOv3-style ViT (vit_small_patch16_dinov3's structure: RoPE, 4 registers, LayerScale; D=96,
   4 blocks, 3 heads) with the demo recipe on the built-in shapes (64 px, crops 64 / 32: a 4 x 4 patch grid).
2. Save it in timm's format (`fastdino export --weights`): the start, as a released backbone would be.
3. The shifted domain: the same shapes with inverted contrast (light ground, dark shapes), train/ and val/.
4. `fastdino train --init start --data shifted` with the adaptation schedule (presets dinov2_vit_small14_adapt /
   dinov3_vit_small16_adapt: a tenth of the from-scratch peak lr, 1 warmup epoch, teacher momentum 0.999 -> 1, constant
   weight decay, 5-epoch teacher temperature warmup), its ratios applied to the demo recipe this model is trained
   with (demo's peak lr / 10), for `--adapt-epochs`.
5. k-NN top-1 (k=20) on the shifted val split: the start, the adapted teacher, and, for scale, the same model
   trained from scratch on the shifted domain with the demo recipe for as many epochs; and the start and the
   adapted teacher on the original domain (what adapting costs there). The adaptation and the control run side
   by side.

    python benchmarks/adaptation_quality.py --out /tmp/adapt [--pretrain-steps 124] [--adapt-epochs 2]

The pretraining's schedules span 5 epochs (62 steps each) and it stops at --pretrain-steps, as a released
checkpoint is a point of a longer schedule; rerunning with the same --out resumes it.

Prints a Markdown table and writes OUT/adaptation_quality.json. CPU minutes, not a test.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

ARCH = ["model.arch=vit_small_patch16_dinov3", "model.patch_size=16", "model.img_size=64", "model.embed_dim=96",
        "model.depth=4", "model.num_heads=3", "data.global_crops_size=64", "data.local_crops_size=32",
        "data.shapes_image_size=64"]
# The demo recipe's head, loss, batch and crops (engine/config.py `demo`), for the adaptation run too.
DEMO_DATA = ["head.out_dim=512", "head.hidden_dim=512", "head.bottleneck_dim=128", "loss.teacher_temp=0.02",
             "loss.warmup_teacher_temp=0.02", "data.batch_size=32", "data.global_crops_scale=[0.4, 1.0]",
             "data.local_crops_number=6", "data.local_crops_scale=[0.05, 0.4]", "data.num_workers=2",
             "eval.at_end=false", "eval.knn_every_epochs=0", "checkpoint.every_steps=0", "log_every=40"]
DEMO_BASE_LR = 4e-3


def fastdino(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "fastdino", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"fastdino {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def knn_top1(checkpoint: Path, data: Path) -> float:
    out = fastdino("knn", "--checkpoint", checkpoint, "--data", data, "--image-size", 64, "--k", 20)
    return float(re.search(r"top-1\s+([\d.]+)", out).group(1))


def inverted(source: Path, target: Path) -> Path:
    """`source` (train/ and val/ of class folders) with every image's contrast inverted."""
    if target.exists():
        return target
    tmp = target.with_name(target.name + ".tmp")
    for image in source.rglob("*.jpg"):
        out = tmp / image.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(image).convert("RGB")).save(out, quality=90)
    tmp.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrain-steps", type=int, default=124, help="steps of the 5-epoch pretraining run")
    parser.add_argument("--adapt-epochs", type=int, default=2,
                        help="epochs (62 steps each) of the adaptation and of the from-scratch control")
    parser.add_argument("--lr-fraction", type=float, default=0.1,
                        help="the adaptation's peak lr as a fraction of the demo recipe's (the presets': 0.1)")
    parser.add_argument("--teacher-momentum", type=float, default=None,
                        help="the adaptation's starting teacher momentum (default: the presets' 0.999)")
    parser.add_argument("--arch", choices=("dinov3", "demo"), default="dinov3",
                        help="dinov3: the tiny DINOv3-style ViT above; demo: the demo preset's own DINO ViT (8-px "
                             "patches, 32-px crops), which learns the shapes in the README's two minutes")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="epochs the pretraining's schedules span")
    args = parser.parse_args()
    arch = ARCH if args.arch == "dinov3" else []
    # The adaptation: the presets' schedule (config.py `adaptation`), or its ratios on the demo recipe.
    adapt_preset = ["--preset", "dinov3_vit_small16_adapt" if args.arch == "dinov3" else "demo"]
    adapt_ratios = [] if args.arch == "dinov3" else ["optim.weight_decay_end=0.04", "optim.teacher_momentum=0.999"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from fastdino.pipelines import make_shapes_dataset

    original = make_shapes_dataset(out / "shapes", num_train=2000, num_val=500, image_size=64)
    shifted = inverted(original, out / "shapes_inverted")
    started = time.perf_counter()
    fastdino("train", "--preset", "demo", "--output", out / "pretrain", "--data", original, *arch, *DEMO_DATA,
             f"epochs={args.pretrain_epochs}", "--max-steps", args.pretrain_steps)
    start = out / "start_timm.safetensors"
    fastdino("export", "--checkpoint", out / "pretrain", "--weights", "--output", start)
    adapt = [*adapt_ratios, f"optim.base_lr={DEMO_BASE_LR * args.lr_fraction}", "optim.min_lr=1e-6", f"epochs={args.adapt_epochs}"]
    adapt += [f"optim.teacher_momentum={args.teacher_momentum}"] if args.teacher_momentum is not None else []
    adapted = f"adapted_lr{args.lr_fraction:g}_m{args.teacher_momentum or 0.999:g}_e{args.adapt_epochs}"
    scratch = f"scratch_e{args.adapt_epochs}"
    runs = [[*init, "--output", out / name, "--data", shifted, *arch, *DEMO_DATA, *extra]
            for name, init, extra in ((adapted, ["--init", start, *adapt_preset], adapt),
                                      (scratch, ["--preset", "demo"], [f"epochs={args.adapt_epochs}"]))]
    procs = [subprocess.Popen([sys.executable, "-m", "fastdino", "train", *map(str, run)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for run in runs]
    for proc in procs:
        if proc.wait():
            raise SystemExit(f"a training run failed:\n{proc.stderr.read()[-3000:]}")
    minutes = (time.perf_counter() - started) / 60
    rows = {
        "start (pretrained on the original shapes)": (knn_top1(start, shifted), knn_top1(start, original)),
        f"--init start, adapted on the inverted shapes (peak lr {args.lr_fraction:g} x demo's, teacher momentum "
        f"{args.teacher_momentum or 0.999:g} -> 1)": (knn_top1(out / adapted, shifted), knn_top1(out / adapted, original)),
        "from scratch on the inverted shapes": (knn_top1(out / scratch, shifted), None),
    }
    print(f"| weights (pretrained {args.pretrain_steps} steps; adapted / from scratch {args.adapt_epochs * 62} "
          f"steps) | k-NN top-1, inverted val | k-NN top-1, original val |\n|---|---:|---:|")
    for name, (shift, orig) in rows.items():
        print(f"| {name} | {shift:.1f} | {'' if orig is None else f'{orig:.1f}'} |")
    print(f"\n{minutes:.1f} min of training")
    (out / "adaptation_quality.json").write_text(json.dumps(
        {"rows": rows, "arch": args.arch, "pretrain_steps": args.pretrain_steps, "adapt_epochs": args.adapt_epochs,
         "lr_fraction": args.lr_fraction, "teacher_momentum": args.teacher_momentum, "train_minutes": minutes},
        indent=1))


if __name__ == "__main__":
    main()
