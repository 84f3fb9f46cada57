"""DINO loss forward / backward / full (fwd+bwd) time, bandwidth and peak memory per provider.

Providers: `torch` (the official formulation, `fastdino.kernels.reference.dino_loss_ref`), `compile`
(`torch.compile` of it, the fair baseline) and `triton` (`fastdino.kernels.dino_loss`, impl="triton").
GB/s counts the bytes any implementation must move, so providers compare on one scale:
fwd reads S (V*B, K) and T (2*B, K); bwd writes dS (V*B, K); full does both. The `copy` row is a measured
device copy of an S-sized buffer (read + write), the practical bandwidth ceiling of this device.

    python benchmarks/bench_dino_loss.py                                    # GPU: B in {64, 128, 256}, K=65536
    python benchmarks/bench_dino_loss.py --batch 2 --K 1000 --device cpu    # smoke test (Triton interpreter)
    python benchmarks/bench_dino_loss.py --batch 64 --device cpu --host     # host us per call, launches mocked

`--head` compares the head's last layer + loss: `unfused` (F.linear(H, F.normalize(v)) for student and teacher, then
`dino_loss`) against `fused_head` (`fused_head_loss`, no logits in memory), fwd+bwd time and peak memory.

    python benchmarks/bench_dino_loss.py --head --batch 128                   # GPU: fused vs unfused head + loss

`--ibot M` does the same for the iBOT term of the DINOv2 step at M masked patches: `dinov2` (its formulation,
benchmarks/model_head_loss.py `dinov2_ibot_loss`) against `fused_head` (`fused_head_loss(pairing="rows")`).

    python benchmarks/bench_dino_loss.py --ibot 9760                          # GPU: ViT-S/14 at batch 128

`--host` times only the Python side of the triton provider (checks, allocations, launch calls, the autograd node)
with the kernel launches mocked, so it runs on the CPU: fwd is `dino_loss(...)`, full adds `loss.backward()`.
"""
import time

import torch

from common import Table, base_parser, host_us, measure_ms, peak_memory_gib, start

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
PROVIDERS = ("torch", "compile", "triton")
MODES = ("fwd", "bwd", "full")


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256], help="images per GPU (B)")
    parser.add_argument("--K", type=int, default=65536, help="prototypes (head output dim)")
    parser.add_argument("--ncrops", type=int, default=12, help="crops per image (2 global + local)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--reps", type=int, default=10, help="timed runs off the GPU and of bwd (do_bench decides "
                                                             "for fwd/full on the GPU)")
    parser.add_argument("--head", action="store_true", help="head last layer + loss: unfused vs fused_head")
    parser.add_argument("--dim", type=int, default=256, help="head bottleneck width (D), with --head or --ibot")
    parser.add_argument("--ibot", type=int, nargs="+", default=None, metavar="M",
                        help="the iBOT term at M masked patches (batch 128 images): DINOv2's formulation vs "
                             "fused_head_loss(pairing=rows), fwd+bwd time and peak memory")
    parser.add_argument("--host", action="store_true", help="only the host us per call of the triton provider, "
                                                            "kernel launches mocked")
    return parser.parse_args()


def head_table(args, device, dtype):
    """Last layer + loss, fwd+bwd: unfused (logits and normalised weights in memory) against fused_head."""
    import torch.nn.functional as F

    from fastdino.kernels import dino_loss, fused_head_loss

    def unfused(h_s, v_s, h_t, v_t, center):
        student = F.linear(h_s, F.normalize(v_s, dim=1))  # (V*B, K)
        with torch.no_grad():
            teacher = F.linear(h_t, F.normalize(v_t, dim=1))  # (2*B, K)
        return dino_loss(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP, args.ncrops)[0]

    def fused(h_s, v_s, h_t, v_t, center):
        return fused_head_loss(h_s, v_s, h_t, v_t, center, STUDENT_TEMP, TEACHER_TEMP, ncrops=args.ncrops)[0]

    table = Table(["B", "provider", "p50_ms", "p20_ms", "p80_ms", "speedup", "peak_GiB"], args.csv)
    for batch in args.batch:
        h_s = torch.nn.functional.normalize(torch.randn(args.ncrops * batch, args.dim, device=device), dim=-1)
        h_s = h_s.to(dtype).requires_grad_(True)
        h_t = torch.nn.functional.normalize(torch.randn(2 * batch, args.dim, device=device), dim=-1).to(dtype)
        v_s = torch.randn(args.K, args.dim, device=device, dtype=dtype, requires_grad=True)
        v_t = torch.randn(args.K, args.dim, device=device, dtype=dtype)
        center = torch.zeros(1, args.K, device=device)
        baseline = None
        for provider, loss_fn in (("unfused", unfused), ("fused_head", fused)):
            def full():
                loss_fn(h_s, v_s, h_t, v_t, center).backward()

            p50, p20, p80 = measure_ms(full, str(device), grad_to_none=[h_s, v_s], reps=args.reps)
            baseline = baseline or p50
            h_s.grad = v_s.grad = None
            table.add(B=batch, provider=provider, p50_ms=p50, p20_ms=p20, p80_ms=p80, speedup=baseline / p50,
                      peak_GiB=peak_memory_gib(full, str(device)))
            h_s.grad = v_s.grad = None


def ibot_table(args, device, dtype):
    """The iBOT term, fwd+bwd: DINOv2's formulation ((M, K) logits and probabilities in memory) against the fused
    head + loss; trainable gains, bf16 autocast on the GPU."""
    from model_head_loss import dinov2_ibot_loss, dinov2_ibot_teacher, fused_ibot_loss

    def dinov2(h_s, v_s, g_s, h_t, v_t, g_t, center, weights):
        teacher = dinov2_ibot_teacher(h_t, v_t, g_t, center)  # alive through backward, as in dinov2's step
        dinov2_ibot_loss(h_s, v_s, g_s, teacher, weights, n_images=128).backward()

    def fused(*inputs):
        fused_ibot_loss(*inputs, n_images=128).backward()

    table = Table(["M", "provider", "p50_ms", "p20_ms", "p80_ms", "speedup", "peak_GiB"], args.csv)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for masked in args.ibot:
        h_s = torch.nn.functional.normalize(torch.randn(masked, args.dim, device=device), dim=-1)
        h_s = h_s.to(dtype).requires_grad_(True)
        h_t = torch.nn.functional.normalize(torch.randn(masked, args.dim, device=device), dim=-1).to(dtype)
        v_s = torch.randn(args.K, args.dim, device=device, requires_grad=True)
        g_s = torch.ones(args.K, 1, device=device, requires_grad=True)
        v_t, g_t = torch.randn(args.K, args.dim, device=device), torch.ones(args.K, 1, device=device)
        center, weights = torch.zeros(1, 1, args.K, device=device), torch.rand(masked, device=device)
        baseline = None
        for provider, run in (("dinov2", dinov2), ("fused_head", fused)):
            def full():
                with autocast:
                    run(h_s, v_s, g_s, h_t, v_t, g_t, center, weights)

            p50, p20, p80 = measure_ms(full, str(device), grad_to_none=[h_s, v_s, g_s], reps=args.reps)
            baseline = baseline or p50
            h_s.grad = v_s.grad = g_s.grad = None
            table.add(M=masked, provider=provider, p50_ms=p50, p20_ms=p20, p80_ms=p80, speedup=baseline / p50,
                      peak_GiB=peak_memory_gib(full, str(device)))
            h_s.grad = v_s.grad = g_s.grad = None


def host_table(args, device, dtype, dino_loss):
    """Host us per call of the triton provider, launches mocked (see the module docstring)."""
    table = Table(["B", "mode", "host_p50_us", "host_p20_us", "host_p80_us"], args.csv)
    for batch in args.batch:
        student = torch.randn(args.ncrops * batch, args.K, device=device).to(dtype).requires_grad_(True)
        teacher = torch.randn(2 * batch, args.K, device=device).to(dtype)
        center = torch.zeros(1, args.K, device=device)

        def forward():
            return dino_loss(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP, args.ncrops, impl="triton")[0]

        def full():
            student.grad = None  # else autograd's accumulation into .grad, a real CPU add, is timed too
            forward().backward()

        for mode, fn in (("fwd", forward), ("full", full)):
            p50, p20, p80 = host_us(fn, reps=args.reps)
            table.add(B=batch, mode=mode, host_p50_us=p50, host_p20_us=p20, host_p80_us=p80)


def backward_ms(make_loss, device, reps, warmup=3):
    """(p50, p20, p80) ms of `loss.backward()` alone: each rep builds a fresh graph outside the timed window,
    because the fused kernel's backward scales its saved gradient in place and runs once per forward."""
    cuda = str(device).startswith("cuda")
    times = []
    for i in range(warmup + reps):
        loss = make_loss()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            loss.backward()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            loss.backward()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return tuple(q)


def main():
    args = parse_args()
    device, dtype = start(args)
    from fastdino.kernels import dino_loss
    from fastdino.kernels.reference import dino_loss_ref

    if args.host:
        return host_table(args, device, dtype, dino_loss)
    if args.head:
        return head_table(args, device, dtype)
    if args.ibot:
        return ibot_table(args, device, dtype)
    compiled_ref = torch.compile(dino_loss_ref)
    loss_fns = {
        "torch": dino_loss_ref,
        "compile": compiled_ref,
        "triton": lambda *a: dino_loss(*a, impl="triton"),
    }
    table = Table(["B", "provider", "mode", "p50_ms", "p20_ms", "p80_ms", "GB/s", "speedup", "peak_GiB"], args.csv)
    for batch in args.batch:
        rows_s, rows_t = args.ncrops * batch, 2 * batch
        student = torch.randn(rows_s, args.K, device=device, dtype=dtype, requires_grad=True)
        teacher = torch.randn(rows_t, args.K, device=device, dtype=dtype)
        center = torch.randn(1, args.K, device=device) * 0.1
        elem = student.element_size()
        bytes_per_mode = {"fwd": (rows_s + rows_t) * args.K * elem, "bwd": rows_s * args.K * elem}
        bytes_per_mode["full"] = bytes_per_mode["fwd"] + bytes_per_mode["bwd"]

        copy_dst = torch.empty_like(student)
        p50, p20, p80 = measure_ms(lambda: copy_dst.copy_(student), str(device), reps=args.reps)
        table.add(B=batch, provider="copy", mode="copy", p50_ms=p50, p20_ms=p20, p80_ms=p80,
                  **{"GB/s": 2 * student.numel() * elem / p50 / 1e6}, speedup="", peak_GiB="")
        del copy_dst

        baseline = {}
        for provider in args.providers:
            loss_fn = loss_fns[provider]

            def forward():
                return loss_fn(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP, args.ncrops)[0]

            def full():
                forward().backward()

            for mode in args.modes:
                if mode == "bwd":
                    p50, p20, p80 = backward_ms(forward, device, args.reps)
                else:
                    p50, p20, p80 = measure_ms(forward if mode == "fwd" else full, str(device),
                                               grad_to_none=[student], reps=args.reps)
                if provider == "torch":
                    baseline[mode] = p50
                peak = peak_memory_gib(full, str(device)) if mode == "full" else ""
                student.grad = None
                table.add(B=batch, provider=provider, mode=mode, p50_ms=p50, p20_ms=p20, p80_ms=p80,
                          **{"GB/s": bytes_per_mode[mode] / p50 / 1e6},
                          speedup=baseline[mode] / p50 if mode in baseline else "", peak_GiB=peak)


if __name__ == "__main__":
    main()
