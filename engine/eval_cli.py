"""`fastdino knn | linear | attention | export | plot`: evaluation from the command line.

`fastdino.engine.cli` forwards these subcommands to `main(argv)`; `python -m fastdino.engine.eval_cli` works too.
--checkpoint takes a run directory, a .safetensors file or an official DINO .pth (see backbone_io.py); --data a
folder with train/ and val/ ImageFolder trees or tar shards. Results go to stdout: this module is a command-line
front end, the one place in engine/ that prints. An error the user can act on (missing file, checkpoint of
another architecture than --arch or the run's config, dataset whose val split has classes the train split lacks,
image not a multiple of the patch size) is one line on stderr and exit code 2, without a traceback.

Under torchrun (WORLD_SIZE > 1 in the environment), knn, linear and export initialise torch.distributed for the
command's duration: every rank extracts the features of its shard, and rank 0 prints and writes.
"""
import argparse
import contextlib
import functools
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastdino.engine.backbone_io import export_timm_weights, load_backbone
from fastdino.engine.command_line import (
    EVAL_COMMANDS,
    EXIT_USAGE,
    HelpFormatter,
    Parser,
    init_distributed,
    output_lock,
    process_device,
)
from fastdino.engine.eval import POOLINGS, distributed_rank_world, export_features, knn_evaluate
from fastdino.engine.linear import linear_probe
from fastdino.engine.visualize import plot_runs, save_attention_png

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastdino", description="Evaluate a DINO backbone: k-NN, linear probe, attention maps, "
                                                 "feature export, run plots.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    def backbone_args(p, data=True, data_required=True):
        p.add_argument("--checkpoint", required=True, type=Path,
                       help="run dir, .safetensors file, or official DINO .pth")
        p.add_argument("--arch", help="expected architecture (vit_tiny / vit_small / vit_base / vit_large): "
                                      "a checkpoint of another one is an error")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
        if data:
            p.add_argument("--data", required=data_required, type=Path, help="dataset folder with train/ and val/")
            p.add_argument("--image-size", type=int, default=None,
                           help="resize + center-crop side in pixels (default: the size the backbone was trained "
                                "at, from the checkpoint; 224 for official DINO weights)")
            p.add_argument("--batch-size", type=int, default=256, help="images per feature-extraction batch")
            p.add_argument("--num-workers", type=int, default=2, help="data loading workers")

    p = sub.add_parser("knn", help=EVAL_COMMANDS["knn"])
    backbone_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[20], help="neighbour counts, e.g. --k 10 20 100")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the vote weights exp(sim / T)")

    p = sub.add_parser("linear", help=EVAL_COMMANDS["linear"])
    backbone_args(p)
    p.add_argument("--output", required=True, type=Path, help="directory for the probe checkpoint and results")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=None, help="base lr (default 0.001 * 1024 / 256, as DINO)")
    p.add_argument("--pooling", default="auto", choices=("auto", "cls4", "cls_avgpool"),
                   help="features: auto = cls4 below D=768, else cls_avgpool (DINO's choices)")

    p = sub.add_parser("attention", help=EVAL_COMMANDS["attention"])
    backbone_args(p, data=False)
    p.add_argument("--image", required=True, type=Path, help="image file (any size, any format PIL reads)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the shorter side to this many pixels, then center-crop to patch multiples (default: "
                        "the size the backbone was trained at; 0 = keep the image as it is)")
    p.add_argument("--output", required=True, type=Path, help="PNG file to write")
    p.add_argument("--threshold", type=float, default=0.6, help="attention mass kept by the masks")

    p = sub.add_parser("export", help=EVAL_COMMANDS["export"])
    backbone_args(p, data_required=False)
    p.add_argument("--output", required=True, type=Path, help="FILE.safetensors or FILE.npz (FILE.pth with --weights)")
    p.add_argument("--weights", action="store_true",
                   help="write the backbone's weights instead of features, under timm's parameter names: timm's "
                        "model of the same name loads them strictly (the command prints the timm.create_model call); "
                        "no --data")
    p.add_argument("--split", nargs="+", default=["train", "val"], help="splits to export, train first")
    p.add_argument("--pooling", default="cls", choices=POOLINGS, help="cls = final-norm CLS (the k-NN feature)")

    p = sub.add_parser("plot", help=EVAL_COMMANDS["plot"])
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="DIR", help="run folders (their metrics.jsonl)")
    p.add_argument("--output", type=Path, default=None,
                   help="PATH: writes PATH.png and PATH.svg (default DIR/plots/metrics, or FIRST_DIR/plots/compared "
                        "for several runs)")
    return parser


def main(argv=None) -> int:
    """Run one evaluation subcommand; returns the exit code (0, or 2 after a one-line error on stderr)."""
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit_:  # --help, or a usage error already said
        return int(exit_.code or 0)
    # Progress lines on stderr (rank 0), unless the caller configured logging already.
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        return _run(args)
    except (ValueError, OSError) as err:
        return _error(f"fastdino {args.command}: error: {err}")


def _error(message: str) -> int:
    print(" ".join(message.split()), file=sys.stderr)
    return EXIT_USAGE


def _run(args) -> int:
    if args.command == "plot":
        for path in plot_runs(args.run_dirs, args.output).paths:
            print(path)
        return 0
    if args.command == "export" and args.weights:
        path, call = export_timm_weights(args.checkpoint, args.output)
        print(f"{path}: load with {call}.load_state_dict(...)")
        return 0
    if args.command == "export" and args.data is None:
        raise ValueError("export needs --data (features of its splits), or --weights (the backbone's weights)")
    device = _device(args.device)
    if args.command == "attention":
        backbone = load_backbone(args.checkpoint, device=device, arch=args.arch)
        print(save_attention_png(backbone, args.image, args.output, threshold=args.threshold,
                                 image_size=args.image_size))
        return 0
    with _distributed(device), _probe_folder(args):
        backbone = load_backbone(args.checkpoint, device=device, arch=args.arch)
        image_size = args.image_size or backbone.patch_embed.img_size[0]
        logger.info("evaluating at %d px (%s)", image_size,
                    "--image-size" if args.image_size else "the checkpoint's size")
        data = dict(image_size=image_size, batch_size=args.batch_size, device=device, num_workers=args.num_workers)
        is_main = distributed_rank_world()[0] == 0
        if args.command == "knn":
            results = knn_evaluate(backbone, args.data, ks=args.k, temperature=args.temperature, **data)
            for k, acc in results.items():
                _print_if(is_main, f"k-NN k={k:<4d} T={args.temperature:g}  top-1 {acc['top1']:6.2f}  "
                                   f"top-5 {acc['top5']:6.2f}")
        elif args.command == "linear":
            data["extract_batch_size"] = data.pop("batch_size")
            res = linear_probe(backbone, args.data, args.output, pooling=args.pooling, epochs=args.epochs,
                               lr=args.lr, **data)
            _print_if(is_main, f"linear probe: top-1 {res['top1']:.2f}  top-5 {res['top5']:.2f}  "
                               f"(best top-1 {res['best_top1']:.2f}) after {res['epochs']} epochs; {args.output}")
        else:
            path = export_features(backbone, args.data, args.output, splits=args.split, pooling=args.pooling, **data)
            _print_if(is_main, path)
    return 0


def _probe_folder(args):
    """The lock of linear's --output folder (made if missing): one probe per folder, or a second one would resume
    the first's checkpoint. The other commands write a single file, atomically."""
    if args.command != "linear":
        return contextlib.nullcontext()
    args.output.mkdir(parents=True, exist_ok=True)
    return output_lock(args.output)


def _print_if(condition: bool, text) -> None:
    if condition:
        print(text)


def _device(name: str) -> torch.device:
    return process_device() if name == "auto" else torch.device(name)


@contextlib.contextmanager
def _distributed(device: torch.device):
    """torch.distributed for the command's duration when launched by torchrun and nobody initialised it yet."""
    if dist.is_initialized() or init_distributed(device) is None:
        yield
        return
    try:
        yield
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
