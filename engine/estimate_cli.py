"""`fastdino estimate`: the step model (estimate.py) of a config, printed as a table or as one JSON object.

    fastdino estimate [--preset P] [--config FILE.yaml] [section.key=value ...] [--gpu h100|h200|a100]
                      [--world-size N] [--json]

torch is imported only after the arguments parsed, so that `--help` answers at once.
"""
import argparse
import json
import sys

from fastdino.engine import config as C
from fastdino.engine.command_line import EXIT_USAGE, HelpFormatter, Parser
from fastdino.engine.gpus import FLOP_EFFICIENCY, GPUS, HBM_EFFICIENCY

DESCRIPTION = (
    "Peak GPU memory per rank (and what holds it), FLOPs per image, bytes per op class, aten op count and a roofline "
    "step time and img/s of one training step, for fastdino and for the official DINO step side by side, without a "
    "GPU. One real step of each (the Trainer's train_step; official_dino.train_step, the restated main_dino.py) "
    "runs on fake CUDA tensors under CUDA autocast's cast rules; the second of two steps is measured.")
EPILOG = (
    "Assumptions: each op costs max(bytes / (HBM x {hbm:.2f}), FLOPs / (peak x {flop:.2f})) with no launch latency, "
    "no cache and no fusion (the eager step: model.compile and optim.cuda_graph are set off); SDPA runs flash "
    "attention (bf16/fp16); memory is what torch.cuda.max_memory_allocated reads (512-byte blocks, cuBLAS "
    "workspace), not reserved memory or the CUDA context; one rank holds all weights (no FSDP2 sharding, no "
    "communication). The official step is main_dino.py's defaults as measured on the H100: fp16 autocast and "
    "GradScaler (fp32 with parallel.precision=fp32), foreach AdamW, explicit attention. GPUs: {gpus}. "
    "engine/estimate.py's docstring has the whole method.")


def build_parser() -> argparse.ArgumentParser:
    gpus = "; ".join(f"{key}: {g.name}, {g.tflops['bf16']:g} TFLOP/s bf16, {g.hbm_tb_s:g} TB/s ({g.source})"
                     for key, g in GPUS.items())
    parser = Parser(prog="fastdino estimate", description=DESCRIPTION, formatter_class=HelpFormatter,
                    epilog=EPILOG.format(hbm=HBM_EFFICIENCY, flop=FLOP_EFFICIENCY, gpus=gpus))
    parser.add_argument("--preset", default="vit_small16_imagenet", help=f"named config: {', '.join(sorted(C.PRESETS))}")
    parser.add_argument("--config", default=None, help="YAML file with sections of the config tree")
    parser.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the GPU of the roofline")
    parser.add_argument("--world-size", type=int, default=1,
                        help="ranks sharing data.batch_size: each rank's step has data.batch_size / N images")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"fastdino": {...}, "official": {...}} instead of the default table')
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. data.batch_size=256")
    return parser


ROWS = [("peak memory per rank, GiB", "peak_gib", "{:.2f}"), ("step, ms (roofline)", "step_ms", "{:.1f}"),
        ("img/s per rank", "img_per_s", "{:,.0f}"), ("GFLOP per image", "gflop_per_image", "{:.1f}"),
        ("GB moved per step", "gbytes", "{:.1f}"), ("aten ops (non-view)", "aten_ops", "{:,}"),
        ("launches (ops moving bytes)", "launches", "{:,}"), ("host reads (.item())", "host_reads", "{:,}")]


def format_table(result: dict, top: int = 8) -> str:
    """The formulations side by side (official, when estimated, then fastdino), what holds the peak, and the op
    classes with the most bytes."""
    names = [name for name in ("official", "fastdino") if name in result]
    ours = result["fastdino"]
    precisions = ", ".join(f"{name} {result[name]['precision']}" for name in reversed(names))
    lines = [f"# {ours['gpu']['name']}; {ours['batch_per_rank']} images per rank; {precisions}",
             f"{'':34}" + "".join(f" {name:>12}" for name in names)]
    lines += [f"{label:34}" + "".join(f" {fmt.format(result[name][key]):>12}" for name in names)
              for label, key, fmt in ROWS]
    lines.append("peak held by, GiB")
    roles = dict.fromkeys(role for name in names for role in result[name]["peak_by_role_gib"])
    lines += [f"  {role:32}" + "".join(f" {result[name]['peak_by_role_gib'].get(role, 0):>12.2f}" for name in names)
              for role in roles]
    for name in names:
        lines.append(f"{name}: op classes by bytes (count, GB, ms)")
        lines += [f"  {op:32} {e['count']:>6} {e['gbytes']:>8.1f} {e['ms']:>8.2f}"
                  for op, e in list(result[name]["by_op"].items())[:top]]
    lines.append(f"roofline: max(bytes / ({ours['gpu']['hbm_tb_s']:g} TB/s x {HBM_EFFICIENCY}), FLOPs / "
                 f"({ours['gpu']['tflops']['bf16']:g} TFLOP/s x {FLOP_EFFICIENCY})) per op; see --help")
    if "official" not in result:
        lines.append("official: not estimated (DINO's code builds only DINO's ViTs, not model.arch="
                     f"{ours.get('arch', 'this one')})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = C.apply_overrides(C.preset(args.preset), file_values=C.load_yaml(args.config) if args.config else None,
                                overrides=args.overrides)
        if args.world_size < 1 or cfg.data.batch_size % args.world_size:
            raise ValueError(f"--world-size must be >= 1 and divide data.batch_size ({cfg.data.batch_size}), got "
                             f"{args.world_size}")
    except ValueError as error:
        sys.stderr.write(f"fastdino: error: {error}\n")
        return EXIT_USAGE
    from fastdino.engine.estimate import estimate_step

    which = ("fastdino", "official") if cfg.model.arch in C.ARCHS else ("fastdino",)  # DINOv2 / DINOv3: ours only
    result = estimate_step(cfg, args.gpu, world_size=args.world_size, which=which)
    result["fastdino"]["arch"] = cfg.model.arch
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0
