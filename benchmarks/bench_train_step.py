"""Images/s and peak memory of the full DINO train step (teacher + student forward, loss, backward, clip, AdamW,
EMA) on synthetic crops already on the device.

Defaults are the paper's ViT-S/16 setting: K=65536, 2x224² + 10x96² crops, batch 128 per GPU. Warm-up steps
(allocator, autotune, backend selection) run first; the timed window synchronises only at its edges. One row per
loss implementation. `--smoke` shrinks everything so that the script runs on the CPU in seconds.

`--host-overhead` times the host side of the whole step: the arch's depth and heads, 2 + 10 crops and every piece
of the step, on shapes so small (head_dim 2, 1 and 4 patches per crop, K=16, 2 images) that the device work is
negligible, so ms/step is what Python and the dispatcher cost per step. On the CPU it shows host regressions
without a GPU; on a GPU, compare it with the paper-shape step (a step shorter than its host time makes the GPU wait).

    python benchmarks/bench_train_step.py                        # GPU, paper shapes
    python benchmarks/bench_train_step.py --smoke --dtype float32  # CPU check
    python benchmarks/bench_train_step.py --host-overhead --dtype float32 --compile false,true
    python benchmarks/bench_train_step.py --compile false,true [--cuda-graph true|step] [--activation-checkpointing all]
    torchrun --nproc_per_node=8 benchmarks/bench_train_step.py     # FSDP2 over 8 GPUs (rank 0 prints)
"""
import itertools
import time

import torch

from common import Table, base_parser, peak_memory_gib, print_header
from fastdino.engine import config as C
from fastdino.engine.command_line import init_distributed, process_device
from fastdino.engine.train import Trainer
from fastdino.engine.vit import MODELS

PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SMOKE = dict(arch="vit_tiny", patch_size=8, embed_dim=64, depth=2, num_heads=2, out_dim=256, batch_size=8,
             global_size=32, local_size=16, local_crops=2, warmup=1, steps=2)
HOST_OVERHEAD = dict(embed_dim=None, out_dim=16, head_dim=8, batch_size=2, global_size=None, local_size=None,
                     warmup=5, steps=50)


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--embed-dim", type=int, default=None, help="override of the arch's width")
    parser.add_argument("--depth", type=int, default=None, help="override of the arch's depth")
    parser.add_argument("--num-heads", type=int, default=None, help="override of the arch's heads")
    parser.add_argument("--out-dim", type=int, default=65536, help="K prototypes")
    parser.add_argument("--batch-size", type=int, default=128, help="images per process")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--loss-impl", default="auto", help="comma-separated: auto, torch, triton")
    parser.add_argument("--mode", default="auto", choices=C.PARALLEL_MODES)
    parser.add_argument("--compile", default="auto", help="comma-separated model.compile values: auto, true, false")
    parser.add_argument("--activation-checkpointing", default="none", help="none, all, every-N or selective")
    parser.add_argument("--cuda-graph", default="false", choices=C.CUDA_GRAPH_MODES,
                        help="optim.cuda_graph: true = the update as CUDA graphs, step = the whole step as one")
    parser.add_argument("--head-dim", type=int, default=None, help="head.hidden_dim and head.bottleneck_dim")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes for a CPU run")
    parser.add_argument("--host-overhead", action="store_true", help="the arch's structure on negligible shapes")
    args = parser.parse_args()
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    if args.host_overhead:
        torch.set_num_threads(1)  # tiny ops: a thread pool would only add its wake-ups (and wait on busy cores)
        for name, value in HOST_OVERHEAD.items():
            setattr(args, name, value)
        args.num_heads = args.num_heads or MODELS[f"{args.arch}_patch16"]["num_heads"]
        args.embed_dim = 2 * args.num_heads  # head_dim 2
        args.global_size, args.local_size = 2 * args.patch_size, args.patch_size  # 4 and 1 patches
    return args


def config(args, world_size: int, loss_impl: str, *, compile_: str = "auto", activation_checkpointing: str = "none",
           cuda_graph: str = "false", head_dim: int | None = None) -> C.TrainConfig:
    overrides = [f"model.arch={args.arch}", f"model.patch_size={args.patch_size}",
                 f"model.img_size={args.global_size}", f"head.out_dim={args.out_dim}", f"loss.impl={loss_impl}",
                 f"data.batch_size={args.batch_size * world_size}", f"data.global_crops_size={args.global_size}",
                 f"data.local_crops_size={args.local_size}", f"data.local_crops_number={args.local_crops}",
                 f"parallel.mode={args.mode}", f"parallel.precision={PRECISION[args.dtype]}",
                 f"model.compile={compile_}", f"model.activation_checkpointing={activation_checkpointing}",
                 f"optim.cuda_graph={cuda_graph}",
                 "optim.freeze_last_layer_epochs=0"]  # time the full update: the last layer is frozen for 1 epoch
    if head_dim is not None:
        overrides += [f"head.hidden_dim={head_dim}", f"head.bottleneck_dim={head_dim}"]
    overrides += [f"model.{name}={getattr(args, name)}" for name in ("embed_dim", "depth", "num_heads")
                  if getattr(args, name) is not None]
    return C.apply_overrides(C.vit_small16_imagenet(), overrides=overrides)


def main():
    args = parse_args()
    device = process_device()
    mesh = init_distributed(device)
    rank, world_size = (mesh.get_rank(), mesh.size()) if mesh is not None else (0, 1)
    if rank == 0:
        print_header(str(device), getattr(torch, args.dtype))
        print(f"# {args.arch}/{args.patch_size}, K={args.out_dim}, {world_size} x {args.batch_size} images of "
              f"2x{args.global_size}² + {args.local_crops}x{args.local_size}², {args.warmup} warm-up + "
              f"{args.steps} timed steps")
    sizes = [args.global_size] * 2 + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch_size, 3, s, s, device=device) for s in sizes]
    table = Table(["loss_impl", "compile", "mode", "ms/step", "img/s/proc", "img/s", "peak GiB"],
                  args.csv) if rank == 0 else None
    for impl, compile_ in itertools.product(args.loss_impl.split(","), args.compile.split(",")):
        cfg = config(args, world_size, impl, compile_=compile_, activation_checkpointing=args.activation_checkpointing,
                     cuda_graph=args.cuda_graph, head_dim=args.head_dim)
        torch._dynamo.reset()  # each configuration compiles its own graphs
        trainer = Trainer(cfg, steps_per_epoch=1000, device=device, mesh=mesh)
        for _ in range(args.warmup):
            trainer.train_step(crops)
        trainer.stats.read()  # host sync: the warm-up is done

        elapsed = []

        def timed_window():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(crops)
            trainer.stats.read()  # host sync: the window ends when the last step has
            elapsed.append(time.perf_counter() - start)

        peak = peak_memory_gib(timed_window, str(device))
        ms = elapsed[0] / args.steps * 1e3
        if table is not None:
            table.add(**{"loss_impl": impl, "compile": trainer.compile, "mode": trainer.mode, "ms/step": ms,
                         "img/s/proc": args.batch_size / ms * 1e3, "img/s": world_size * args.batch_size / ms * 1e3,
                         "peak GiB": peak})
    if mesh is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
