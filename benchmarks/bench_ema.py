"""EMA teacher update time and bandwidth per provider, over the parameter shapes of a ViT + DINO head.

Providers: `loop` (the official per-parameter `param_k.mul_(m).add_((1 - m) * param_q)`), `compile`
(`torch.compile` of that loop), `foreach` (`fastdino.kernels.reference.ema_update_ref`, one `torch._foreach_lerp_`)
and `triton` (`fastdino.kernels.ema_update_`, one launch). The teacher is fp32, the student `--dtype`.
GB/s counts numel * (2 * 4 + student bytes): read teacher and student, write teacher. The `copy` row is a measured
device copy of the teacher's bytes (read + write), the practical bandwidth ceiling of this device.

    python benchmarks/bench_ema.py                                              # GPU: ViT-S/16 + K=65536 head, 44M
    python benchmarks/bench_ema.py --arch vit_tiny --out-dim 1000 --hidden-dim 256 --reps 2 --device cpu  # smoke
    python benchmarks/bench_ema.py --device cpu --dtype float32 --host     # host us per call, kernel launch mocked

`--host` times only the Python side of `ema_update_(impl="triton")` (plan lookup, checks, the launch call) and of
`EMAUpdate` (plan held, no look-up; by default with its storage check per call, and with check_storage=False, the
trainer's, which reads no tensor) with the kernel launch mocked, so it runs on the CPU; the tensors are real, the
update is not done.
"""

import torch

from common import Table, base_parser, host_us, measure_ms, start

PROVIDERS = ("loop", "compile", "foreach", "triton")


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small", help="backbone whose parameter shapes are updated")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--out-dim", type=int, default=65536, help="DINO head prototypes (K)")
    parser.add_argument("--hidden-dim", type=int, default=2048, help="DINO head MLP width")
    parser.add_argument("--bottleneck-dim", type=int, default=256, help="DINO head bottleneck width")
    parser.add_argument("--momentum", type=float, default=0.996)
    parser.add_argument("--tensor-momentum", action="store_true",
                        help="pass momentum as a 0-d device tensor (as the trainer does) instead of a float")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--reps", type=int, default=10, help="timed runs off the GPU (do_bench decides on it)")
    parser.add_argument("--host", action="store_true", help="only the host us per call of the triton provider, "
                                                            "kernel launch mocked")
    return parser.parse_args()


def parameter_shapes(args) -> list[torch.Size]:
    """Shapes of the backbone + head parameters, from models built on the meta device (nothing allocated)."""
    from fastdino.engine.head import DINOHead
    from fastdino.engine.vit import build_backbone

    with torch.device("meta"):
        backbone = build_backbone(args.arch, args.patch_size)
        head = DINOHead(backbone.embed_dim, args.out_dim, hidden_dim=args.hidden_dim,
                        bottleneck_dim=args.bottleneck_dim)
    return [p.shape for module in (backbone, head) for p in module.parameters()]


@torch.no_grad()
def official_loop(teacher, student, momentum):
    """DINO main_dino.py: `param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)` per parameter."""
    for param_k, param_q in zip(teacher, student):
        param_k.mul_(momentum).add_((1 - momentum) * param_q)


def main():
    args = parse_args()
    device, dtype = start(args)
    from fastdino.kernels import EMAUpdate, ema_update_
    from fastdino.kernels.reference import ema_update_ref

    shapes = parameter_shapes(args)
    # Parameters, as the trainer passes them (their data_ptr costs more host time than a plain tensor's).
    teacher = [torch.nn.Parameter(torch.randn(s, device=device), requires_grad=False) for s in shapes]
    student = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in shapes]
    numel = sum(t.numel() for t in teacher)
    momentum = torch.tensor(args.momentum, device=device) if args.tensor_momentum else args.momentum
    print(f"# {args.arch}/{args.patch_size} + head K={args.out_dim}: {len(shapes)} tensors, {numel / 1e6:.1f}M "
          f"parameters, momentum {'0-d tensor' if args.tensor_momentum else 'float'}")

    if args.host:
        table = Table(["tensors", "api", "momentum", "host_p50_us", "host_p20_us", "host_p80_us"], args.csv)
        checked = EMAUpdate(teacher, student, impl="triton")  # the default: storage moves followed per call
        trainers = EMAUpdate(teacher, student, impl="triton", check_storage=False)  # checked at log steps instead
        for api, update in (("ema_update_", lambda m: ema_update_(teacher, student, m, impl="triton")),
                            ("EMAUpdate", checked), ("EMAUpdate(check_storage=False)", trainers)):
            for kind, m in (("float", args.momentum), ("0-d tensor", torch.tensor(args.momentum, device=device))):
                p50, p20, p80 = host_us(lambda: update(m))
                table.add(tensors=len(shapes), api=api, momentum=kind, host_p50_us=p50, host_p20_us=p20,
                          host_p80_us=p80)
        return

    updates = {
        "loop": lambda: official_loop(teacher, student, momentum),
        "compile": torch.compile(lambda: official_loop(teacher, student, momentum)),
        "foreach": lambda: ema_update_ref(teacher, student, momentum),
        "triton": lambda: ema_update_(teacher, student, momentum, impl="triton"),
    }
    table = Table(["params_M", "provider", "p50_ms", "p20_ms", "p80_ms", "GB/s", "speedup"], args.csv)
    flat, flat_dst = torch.empty(numel, device=device), torch.empty(numel, device=device)
    p50, p20, p80 = measure_ms(lambda: flat_dst.copy_(flat), str(device), reps=args.reps)
    table.add(params_M=numel / 1e6, provider="copy", p50_ms=p50, p20_ms=p20, p80_ms=p80,
              **{"GB/s": 2 * numel * 4 / p50 / 1e6}, speedup="")
    del flat, flat_dst

    bytes_moved = numel * (2 * 4 + student[0].element_size())
    baseline = None
    for provider in args.providers:
        p50, p20, p80 = measure_ms(updates[provider], str(device), warmup=1, reps=args.reps)
        if provider == "loop":
            baseline = p50
        table.add(params_M=numel / 1e6, provider=provider, p50_ms=p50, p20_ms=p20, p80_ms=p80,
                  **{"GB/s": bytes_moved / p50 / 1e6}, speedup=baseline / p50 if baseline else "")


if __name__ == "__main__":
    main()
