"""What each kernel must move through HBM, and the time floor that puts on an H100 (3.35 TB/s) and an H200 (4.3 TB/s).

Counts are the minimal HBM traffic of the kernels as written: every input read once, every output written once; re-reads
that the launch order keeps in L2 (the teacher rows and the center, read by every crop of an image) are not counted. The
loss and EMA counts come from the kernels themselves (kernels/dino_loss.py `dino_loss_launch_bytes`, kernels/ema.py
`ema_launch_bytes`, which the step model uses too); the fused head's from kernels/fused_head_loss.py
`fused_head_loss_launch_cost`. The fused head is compute-bound, so its matmul FLOPs and the bf16 dense floor
(H100 989 TFLOP/s, H200 the same) are shown.

    python benchmarks/bytes_floor.py                          # B=64, 12 crops, K=65536, bf16, ViT-S/16 EMA
    python benchmarks/bytes_floor.py --batch 128 --dim 256
"""
import argparse

from fastdino.kernels import dino_loss_launch_bytes, ema_launch_bytes, fused_head_loss_launch_cost

BANDWIDTH = {"H100": 3.35e12, "H200": 4.3e12}  # bytes/s (SXM datasheets)
BF16_FLOPS = 989e12  # dense bf16 tensor-core FLOP/s, H100 and H200 SXM


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per GPU (B)")
    parser.add_argument("--ncrops", type=int, default=12, help="crops per image (V)")
    parser.add_argument("--K", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256, help="head bottleneck width (D)")
    parser.add_argument("--elem", type=int, default=2, help="bytes per element of logits/features (bf16: 2)")
    parser.add_argument("--ema-params", type=float, default=44.0e6, help="parameters updated by the EMA")
    parser.add_argument("--ema-student-bytes", type=int, default=4, help="bytes per student parameter")
    return parser.parse_args()


def rows(args):
    """(kernel, what it moves, bytes, flops); the loss and EMA counts are the kernels' own (`*_launch_bytes`)."""
    b, v, k, d, e = args.batch, args.ncrops, args.K, args.dim, args.elem
    f32 = 4
    loss = dino_loss_launch_bytes(b, v, k, e, e)
    out = [
        ("loss fwd", "read S, T, C; write C copy, colsum per image group, chunk partials",
         loss["_dino_loss_fwd_kernel"], 0),
        ("loss combine", "read partials; write colsum, LSE, teacher stats, image terms",
         loss["_dino_loss_combine_kernel"], 0),
        ("loss bwd", "read S, T, C, LSE; write dS", loss["_dino_loss_bwd_kernel"], 0),
    ]
    out.append(("loss fwd+bwd", "sum of the three above", sum(r[2] for r in out), 0))
    # Unfused head's last layer per step: normalise v for student and teacher (read v, write W) and the backward of
    # normalize (read v, dW; write dv), besides the logits that the loss reads.
    out.append(("head weight norm (unfused)", "F.normalize(v) fwd x2 + bwd", (2 * 2 + 3) * k * d * e, 0))
    head = fused_head_loss_launch_cost("crops", b, v, k, d, e, 4)  # fp32 last-layer weights
    fwd, bwd = head["_fused_head_loss_fwd_kernel"], head["_fused_head_loss_bwd_kernel"]
    out.append(("fused head+loss fwd", "read H_s, H_t, v_s, v_t, scales; write partials; no logits", *fwd))
    out.append(("fused head+loss bwd kernel", "read H, v again; write dS (dH, dv by cuBLAS after)", *bwd))
    ema_bytes = ema_launch_bytes(round(args.ema_params), 4, args.ema_student_bytes)["_ema_update_kernel"]
    out.append(("ema update", "read teacher (fp32), student; write teacher", ema_bytes, 0))
    return out


def main():
    args = parse_args()
    print(f"# B={args.batch}, V={args.ncrops}, K={args.K}, D={args.dim}, {args.elem}-byte logits; "
          f"EMA {args.ema_params / 1e6:.1f}M params, {args.ema_student_bytes}-byte student")
    print(f"{'kernel':28} | {'MB':>8} | {'H100 floor ms':>13} | {'H200 floor ms':>13} | {'GFLOP':>7} | "
          f"{'FLOP floor ms':>13} | moves")
    for name, what, nbytes, flops in rows(args):
        floors = [nbytes / bw * 1e3 for bw in BANDWIDTH.values()]
        flop_floor = f"{flops / BF16_FLOPS * 1e3:13.4f}" if flops else f"{'':13}"
        print(f"{name:28} | {nbytes / 1e6:8.1f} | {floors[0]:13.4f} | {floors[1]:13.4f} | {flops / 1e9:7.1f} | "
              f"{flop_floor} | {what}")


if __name__ == "__main__":
    main()
