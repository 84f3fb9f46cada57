"""DINO model benchmark: student forward+backward and teacher forward, ms, images/s and peak memory.

One row per (arch, compile, attention backend, layout, mode):
- backend: the model's `attention` ("sdpa", "xformers", "varlen": one varlen_attn call over all crops), or SDPA
  pinned to one kernel ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math") with
  torch.nn.attention.sdpa_kernel. An unavailable one gets a row saying why.
- layout: "packed" = one backbone call over all crops (fastdino's multi-crop forward); "per-resolution" = one
  backbone call per resolution group, then one head call (the official DINO MultiCropWrapper).
- compile: "eager"; "compiled" = torch.compile of each transformer block with automatic dynamic shapes (the
  stochastic-depth scales are tensor arguments: one graph serves the blocks with drop path); "compiled-static" =
  dynamic=False (the recompile limit is raised here to allow one graph per block).
- mode: "student" = forward + backward over 2 global + N local crops (train mode, stochastic depth on);
  "teacher" = forward over the global crops under no_grad (eval mode).
The speedup column is against the first row of the same arch and mode (per-resolution, eager, first backend).

GPU: python benchmarks/bench_model.py                       (ViT-S/16 and ViT-S/8, batch 128, 2x224² + 10x96²)
CPU smoke: python benchmarks/bench_model.py --arch vit_tiny --batch 2 --local-crops 2 --device cpu --dtype float32
"""
import copy
import gc
import itertools
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import Table, base_parser, measure_ms, peak_memory_gib, print_header
from fastdino.engine.head import DINOHead
from fastdino.engine.model import DINOModel
from fastdino.engine.vit import build_backbone

SDPA_KERNELS = {
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
COLUMNS = ["arch", "compile", "backend", "layout", "mode", "p50_ms", "p20_ms", "p80_ms", "img_per_s", "peak_gib",
           "speedup", "status"]


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["vit_small"])
    parser.add_argument("--patch-size", nargs="+", type=int, default=[16, 8])
    parser.add_argument("--batch", type=int, default=128, help="images per step (each gives every crop)")
    parser.add_argument("--global-crops", type=int, default=2)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--out-dim", type=int, default=65536, help="K, the head's prototypes")
    parser.add_argument("--drop-path-rate", type=float, default=0.1, help="student stochastic depth")
    parser.add_argument("--backends", nargs="+", default=["sdpa", "xformers"],
                        choices=["sdpa", "xformers", "varlen", *SDPA_KERNELS])
    parser.add_argument("--layouts", nargs="+", default=["per-resolution", "packed"],
                        choices=["per-resolution", "packed"])
    parser.add_argument("--compile", nargs="+", choices=["eager", "compiled", "compiled-static"],
                        help="default: eager and compiled on the GPU, eager on the CPU (Inductor's CPU build is slow)")
    args = parser.parse_args()
    if args.compile is None:
        args.compile = ["eager", "compiled"] if args.device.startswith("cuda") else ["eager"]
    return args


def per_resolution(model: DINOModel, crops: list[torch.Tensor]) -> torch.Tensor:
    """The official MultiCropWrapper: the backbone once per run of same-resolution crops, the head once."""
    groups = [torch.cat(list(g)) for _, g in itertools.groupby(crops, key=lambda c: c.shape[-2:])]
    return model.head(torch.cat([model.backbone(g) for g in groups]))  # (V*B, K)


def build_models(args, arch: str, patch_size: int, backend: str, compile_mode: str) -> tuple[DINOModel, DINOModel]:
    attention = backend if backend in ("xformers", "varlen") else "sdpa"
    backbone = build_backbone(arch, patch_size, img_size=args.global_size, drop_path_rate=args.drop_path_rate,
                              attention=attention)
    head = DINOHead(backbone.embed_dim, args.out_dim)
    head.init_weights()
    student = DINOModel(backbone, head).to(args.device).train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if compile_mode != "eager":
        static = compile_mode == "compiled-static"
        if static:  # one graph per block and layout, student and teacher
            depth = len(student.backbone.blocks)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * depth)
        for block in [*student.backbone.blocks, *teacher.backbone.blocks]:
            block.compile(dynamic=False if static else None)
    return student, teacher


def step_functions(args, student: DINOModel, teacher: DINOModel, layout: str, crops: list[torch.Tensor]):
    """{mode: zero-argument function running one step} for the student and the teacher."""
    forward = per_resolution if layout == "per-resolution" else DINOModel.__call__
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    with autocast:
        grad = torch.randn_like(forward(student, crops))

    def student_step():
        with autocast:
            out = forward(student, crops)
        out.backward(grad)

    def teacher_step():
        with torch.no_grad(), autocast:
            forward(teacher, crops[: args.global_crops])

    return {"student": student_step, "teacher": teacher_step}


def main():
    args = parse_args()
    print_header(args.device, getattr(torch, args.dtype))
    print(f"# batch {args.batch}: {args.global_crops}x{args.global_size}² + {args.local_crops}x{args.local_size}², "
          f"K={args.out_dim}, drop_path_rate={args.drop_path_rate}")
    sizes = [args.global_size] * args.global_crops + [args.local_size] * args.local_crops
    crops = [torch.randn(args.batch, 3, s, s, device=args.device) for s in sizes]
    table, baselines = Table(COLUMNS, args.csv), {}
    for arch_name, patch_size in itertools.product(args.arch, args.patch_size):
        arch = f"{arch_name.removeprefix('vit_')}/{patch_size}"
        for compile_mode, backend in itertools.product(args.compile, args.backends):
            base = dict(arch=arch, compile=compile_mode, backend=backend)
            kernel = sdpa_kernel(SDPA_KERNELS[backend]) if backend in SDPA_KERNELS else nullcontext()
            try:
                student, teacher = build_models(args, arch_name, patch_size, backend, compile_mode)
                with kernel:
                    for layout in args.layouts:
                        steps = step_functions(args, student, teacher, layout, crops)
                        for mode, fn in steps.items():
                            for _ in range(3):  # compile, autotune and allocator warm-up
                                fn()
                            params = list(student.parameters()) if mode == "student" else None
                            p50, p20, p80 = measure_ms(fn, args.device, grad_to_none=params)
                            peak = peak_memory_gib(fn, args.device)
                            ref = baselines.setdefault((arch, mode), p50)
                            table.add(**base, layout=layout, mode=mode, p50_ms=p50, p20_ms=p20, p80_ms=p80,
                                      img_per_s=args.batch / p50 * 1e3, peak_gib=peak, speedup=ref / p50,
                                      status="ok")
            except (ValueError, RuntimeError) as err:  # an unavailable backend or kernel, or out of memory
                reason = str(err).strip().splitlines()[0][:100]
                nan = float("nan")
                table.add(**base, layout="-", mode="-", p50_ms=nan, p20_ms=nan, p80_ms=nan, img_per_s=nan,
                          peak_gib=nan, speedup=nan, status=f"{type(err).__name__}: {reason}")
            student = teacher = steps = None
            torch._dynamo.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
