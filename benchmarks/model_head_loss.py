"""The step model's figures (modelled, no GPU) for the head's last layer + loss: fused (`fused_head_loss`) against
the unfused formulations, time and memory, forward and backward.

Each formulation runs op by op on fake CUDA tensors under `fastdino.engine.estimate.estimate_ops` (the model of
`fastdino estimate`): every aten op and every Triton launch costed at max(bytes / (HBM x 0.75), FLOPs / (peak x
0.60)), memory followed allocation by allocation. "extra GiB" is the peak minus the inputs (features, last-layer
weights, center), so it includes the gradients of the features and weights (the same in every row).

- dino: the DINO head at ViT-S/16, batch B, 2 + 10 crops, K prototypes, D = 256: `F.linear(h, F.normalize(v))` for
  student and teacher, then `dino_loss` (Triton), against `fused_head_loss(pairing="crops")`.
- ibot: the iBOT term of the DINOv2 step at ViT-S/14, batch 128: M masked patches (about 9,760), K prototypes,
  D = 256, weight-normed last layers with trainable gains: DINOv2's formulation as dinov2 writes it (weight_norm's
  g v / ||v||, F.linear, `softmax_center_teacher`, `forward_masked`'s sum(t * log_softmax(s / temp)) * masks_weight)
  against `fused_head_loss(pairing="rows")`; with --sinkhorn the teacher is Sinkhorn-Knopp (dinov2's
  `sinkhorn_knopp_teacher` against `sinkhorn_center` + the fused loss).

    python benchmarks/model_head_loss.py                       # both, H200 and H100
    python benchmarks/model_head_loss.py --only ibot --gpu h200 --sinkhorn
"""
import argparse

import torch
import torch.nn.functional as F

from fastdino.engine.estimate import estimate_ops
from fastdino.kernels import dino_loss, fused_head_loss, sinkhorn_center

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=("dino", "ibot"), default=["dino", "ibot"])
    parser.add_argument("--gpu", nargs="+", default=["h200", "h100"])
    parser.add_argument("--batch", type=int, default=128, help="images per GPU (dino)")
    parser.add_argument("--ncrops", type=int, default=12, help="crops per image (dino)")
    parser.add_argument("--masked", type=int, default=9760, help="masked patches M (ibot)")
    parser.add_argument("--K", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256, help="head bottleneck width D")
    parser.add_argument("--sinkhorn", action="store_true", help="ibot: Sinkhorn-Knopp teacher instead of centering")
    return parser.parse_args()


def weight_norm(v, g):
    """dinov2's weight_norm'd last layer weight, g v / ||v|| per prototype."""
    return v * (g / v.norm(dim=1, keepdim=True))


def dinov2_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    """dinov2's `sinkhorn_knopp_teacher` on one process (its all-reduces are the identity there)."""
    q = torch.exp(teacher_output.float() / teacher_temp).t()
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= q.shape[0]
        q /= q.sum(dim=0, keepdim=True)
        q /= q.shape[1]
    q *= q.shape[1]
    return q.t()


def dinov2_ibot_teacher(h_t, v_t, g_t, center, sinkhorn=False):
    """dinov2's teacher for the masked patches (ssl_meta_arch.py `get_teacher_output`): the weight-normed last layer,
    then softmax-centered (ibot_patch_loss.py `softmax_center_teacher`) or Sinkhorn-Knopp. forward_backward keeps
    the result alive until its backward has run."""
    with torch.no_grad():
        t = F.linear(h_t, weight_norm(v_t, g_t))
        return dinov2_sinkhorn(t, TEACHER_TEMP) if sinkhorn else F.softmax((t - center) / TEACHER_TEMP, dim=-1)


def dinov2_ibot_loss(h_s, v_s, g_s, teacher, masks_weight, n_images):
    """dinov2's iBOT term (ibot_patch_loss.py `forward_masked`, no xformers): the student's weight-normed last layer
    on the masked patches, -sum(masks_weight * sum(t * log_softmax(s / temp))) / n_images."""
    s = F.linear(h_s, weight_norm(v_s, g_s))
    loss = torch.sum(teacher * F.log_softmax(s / STUDENT_TEMP, dim=-1), dim=-1)
    return -(loss * masks_weight).sum() / n_images


def fused_ibot_loss(h_s, v_s, g_s, h_t, v_t, g_t, center, masks_weight, n_images, sinkhorn=False):
    """The same term by `fused_head_loss(pairing="rows")` (and `sinkhorn_center`): the call engine/ibot_loss.py
    makes."""
    if sinkhorn:
        center = sinkhorn_center(h_t, v_t, TEACHER_TEMP, teacher_gain=g_t)
    return fused_head_loss(h_s, v_s, h_t, v_t, center, STUDENT_TEMP, TEACHER_TEMP, pairing="rows",
                           row_weights=masks_weight / n_images, student_gain=g_s, teacher_gain=g_t)[0]


def dino_cases(args):
    rows_s, rows_t, k, d = args.ncrops * args.batch, 2 * args.batch, args.K, args.dim

    def build():
        h_s = torch.empty(rows_s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v_s = torch.empty(k, d, device="cuda", requires_grad=True)
        h_t = torch.empty(rows_t, d, device="cuda", dtype=torch.bfloat16)
        return h_s, v_s, h_t, torch.empty(k, d, device="cuda"), torch.empty(1, k, device="cuda")

    def unfused(h_s, v_s, h_t, v_t, center):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            student = F.linear(h_s, F.normalize(v_s, dim=1))
            with torch.no_grad():
                teacher = F.linear(h_t, F.normalize(v_t, dim=1))
            loss = dino_loss(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP, args.ncrops)[0]
        loss.backward()

    def fused(h_s, v_s, h_t, v_t, center):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fused_head_loss(h_s, v_s, h_t, v_t, center, STUDENT_TEMP, TEACHER_TEMP, ncrops=args.ncrops)[0]
        loss.backward()

    label = f"dino B={args.batch} V={args.ncrops} K={k} D={d}"
    return [(label, "unfused: F.linear + dino_loss", build, unfused), (label, "fused_head_loss crops", build, fused)]


def ibot_cases(args):
    m, k, d = args.masked, args.K, args.dim

    def build():
        h_s = torch.empty(m, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v_s = torch.empty(k, d, device="cuda", requires_grad=True)
        g_s = torch.empty(k, 1, device="cuda", requires_grad=True)
        h_t = torch.empty(m, d, device="cuda", dtype=torch.bfloat16)
        v_t, g_t = torch.empty(k, d, device="cuda"), torch.empty(k, 1, device="cuda")
        return h_s, v_s, g_s, h_t, v_t, g_t, torch.empty(1, 1, k, device="cuda"), torch.empty(m, device="cuda")

    def dinov2(h_s, v_s, g_s, h_t, v_t, g_t, center, masks_weight):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            teacher = dinov2_ibot_teacher(h_t, v_t, g_t, center, args.sinkhorn)
            loss = dinov2_ibot_loss(h_s, v_s, g_s, teacher, masks_weight, n_images=128)
        loss.backward()

    def fused(*inputs):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fused_ibot_loss(*inputs, n_images=128, sinkhorn=args.sinkhorn)
        loss.backward()

    teacher = "Sinkhorn-Knopp" if args.sinkhorn else "centering"
    label = f"ibot M={m} K={k} D={d}, {teacher}"
    return [(label, "DINOv2 formulation", build, dinov2), (label, "fused_head_loss rows", build, fused)]


def main():
    args = parse_args()
    cases = (dino_cases(args) if "dino" in args.only else []) + (ibot_cases(args) if "ibot" in args.only else [])
    print("# modelled (fastdino.engine.estimate.estimate_ops): max(bytes / (HBM x 0.75), FLOPs / (peak x 0.60)) "
          "per op, bf16 autocast, forward + backward")
    print(f"{'case':40} | {'formulation':32} | gpu  | {'ms':>7} | {'extra GiB':>9} | {'GB moved':>8} | "
          f"{'GFLOP':>7} | launches")
    for label, name, build, run in cases:
        for gpu in args.gpu:
            r = estimate_ops(build, run, gpu)
            gflop = sum(op["gflop"] for op in r["by_op"].values())
            print(f"{label:40} | {name:32} | {gpu} | {r['step_ms']:7.3f} | {r['peak_gib'] - r['inputs_gib']:9.3f} | "
                  f"{r['gbytes']:8.2f} | {gflop:7.0f} | {r['launches']}")


if __name__ == "__main__":
    main()
