"""iBOT masked-patch term: the head's last layer on the masked patches + the loss, fwd+bwd time and peak memory, in
DINOv2's formulation, and the step model's cost of the term.

M is the batch's static number of masked-patch rows (pipelines/masking.py: the upper bound of DINOv2's masks,
9,831 at B = 128 images per GPU and 16 x 16 patches): student logits (M, K) = H_s normalize(V_s)^T, teacher
logits likewise without gradient, teacher probabilities softmax((T - center) / temp), then
`iBOTPatchLoss.forward_masked` (fp32 log-softmax of the student logits, product with the teacher probabilities).

Providers: `torch` (DINOv2's formulation, eager), `compile` (torch.compile of the same function).

    python benchmarks/bench_ibot_loss.py                                   # GPU: B in {64, 128}, K = 65536
    python benchmarks/bench_ibot_loss.py --batch 2 --K 512 --device cpu   # smoke test
    python benchmarks/bench_ibot_loss.py --model --gpu h200                # step model: the term's memory and time

`--model` runs `fastdino estimate` (engine/estimate.py) on the dinov2_vit_small14 preset at each batch with
loss.ibot_weight 0 and 1 (KoLeo on in both; the term in DINOv2's formulation, loss.ibot_impl=torch, and on the
fused head + loss, fused) and prints the differences: what the iBOT term adds to one step's peak memory and
roofline time (the head on the masked rows, the losses, the mask token), modelled, no GPU needed.
"""
import torch
import torch.nn.functional as F

from common import Table, base_parser, measure_ms, peak_memory_gib, start

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
PROVIDERS = ("torch", "compile")


def parse_args():
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128], help="images per GPU (B)")
    parser.add_argument("--K", type=int, default=65536, help="prototypes of the (shared) head")
    parser.add_argument("--dim", type=int, default=256, help="head bottleneck width (D)")
    parser.add_argument("--grid", type=int, default=16, help="patches per side of a global crop (224 / 14)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--reps", type=int, default=10, help="timed runs off the GPU")
    parser.add_argument("--model", action="store_true", help="the step model's cost of the term (no GPU)")
    parser.add_argument("--gpu", default="h200", help="the step model's GPU, with --model")
    return parser.parse_args()


def masked_rows(batch: int, grid: int) -> int:
    from fastdino.pipelines import MaskingConfig

    return MaskingConfig(grid=grid).upper_bound(2 * batch)


def model_table(args):
    from fastdino.engine import config as C
    from fastdino.engine.estimate import estimate_step

    table = Table(["B", "M", "ibot", "ibot_impl", "peak_GiB", "step_ms", "term_GiB", "term_ms"], args.csv)
    for batch in args.batch:
        rows = {}
        for weight, impl in ((0.0, "torch"), (1.0, "torch"), (1.0, "fused")):
            cfg = C.apply_overrides(C.dinov2_vit_small14(), overrides=[
                f"data.batch_size={batch}", f"loss.ibot_weight={weight}", f"loss.ibot_impl={impl}",
                f"head.out_dim={args.K}"])
            rows[weight, impl] = estimate_step(cfg, args.gpu, which=("fastdino",))["fastdino"]
        off = rows[0.0, "torch"]
        for (weight, impl), row in rows.items():
            table.add(B=batch, M=masked_rows(batch, args.grid) if weight else 0, ibot=weight,
                      ibot_impl=impl if weight else "-", peak_GiB=row["peak_gib"], step_ms=row["step_ms"],
                      term_GiB=row["peak_gib"] - off["peak_gib"], term_ms=row["step_ms"] - off["step_ms"])


def main():
    args = parse_args()
    if args.model:
        return model_table(args)
    device, dtype = start(args)
    from fastdino.engine import iBOTPatchLoss

    loss_module = iBOTPatchLoss(args.K, STUDENT_TEMP).to(device)

    def ibot_term(h_s, v_s, h_t, v_t, masks, weights):
        student = F.linear(h_s, F.normalize(v_s, dim=1))  # (M, K)
        with torch.no_grad():
            teacher = F.linear(h_t, F.normalize(v_t, dim=1))
            probs = loss_module.softmax_center_teacher(teacher[None], TEACHER_TEMP)[0]
        return loss_module.forward_masked(student, probs, masks, masks_weight=weights)

    functions = {"torch": ibot_term, "compile": torch.compile(ibot_term)}
    table = Table(["B", "M", "provider", "p50_ms", "p20_ms", "p80_ms", "peak_GiB"], args.csv)
    for batch in args.batch:
        m = masked_rows(batch, args.grid)
        h_s = F.normalize(torch.randn(m, args.dim, device=device), dim=-1).to(dtype).requires_grad_(True)
        h_t = F.normalize(torch.randn(m, args.dim, device=device), dim=-1).to(dtype)
        v_s = torch.randn(args.K, args.dim, device=device, dtype=dtype, requires_grad=True)
        v_t = torch.randn(args.K, args.dim, device=device, dtype=dtype)
        masks = torch.zeros(2 * batch, args.grid ** 2, dtype=torch.bool, device=device)
        weights = torch.full((m,), 1 / 40, device=device)
        for provider in args.providers:
            def full():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = functions[provider](h_s, v_s, h_t, v_t, masks, weights)
                loss.backward()

            p50, p20, p80 = measure_ms(full, str(device), grad_to_none=[h_s, v_s], reps=args.reps)
            h_s.grad = v_s.grad = None
            table.add(B=batch, M=m, provider=provider, p50_ms=p50, p20_ms=p20, p80_ms=p80,
                      peak_GiB=peak_memory_gib(full, str(device)))
            h_s.grad = v_s.grad = None


if __name__ == "__main__":
    main()
