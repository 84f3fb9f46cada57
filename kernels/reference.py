"""Plain-PyTorch references of the fastdino kernels: the spec that the Triton kernels are tested against.

Written for clarity, not speed. They are also the CPU path of `dino_loss` (impl="torch") and the fallback of
`ema_update_`, and the baselines of the benchmarks. Importing this module needs neither Triton nor a GPU.
"""
import torch
import torch.nn.functional as F

from ._launch import check_dino_loss_args, local_shard


def dino_loss_ref(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor | None,
    student_temp: float,
    teacher_temp: float,
    ncrops: int,
    *,
    teacher_is_probs: bool = False,
    return_entropy: bool = False,
):
    """DINO cross-entropy loss, written as in the official code (Caron et al. 2021, Sec. 3.1, Eq. 1 and 4).

    student_logits (V*B, K), crop-major (crop v of image b is row v*B + b); teacher (2*B, K): logits of the two
    global crops, or probabilities when `teacher_is_probs` (e.g. Sinkhorn-Knopp output); center (K,), (1, K) or None.
    Teacher crop iq is paired with every student crop v != iq; the loss is the mean over those 2*(V-1) pairs of the
    batch mean of -sum_k q_k log softmax(s / student_temp)_k, with q = softmax((t - center) / teacher_temp).

    Returns (loss, teacher_colsum) and, with `return_entropy`, also the mean entropy of the teacher rows q; all fp32.
    loss is differentiable w.r.t. student_logits; teacher_colsum (K,) is the sum over the 2*B teacher input rows.
    The gradient is the official order of operations: autograd multiplies by grad_output (a loss scale, say) in fp32
    and casts to the student dtype last, so small entries survive fp16; the fused kernel must do the same.
    """
    check_dino_loss_args(student_logits, teacher, center, student_temp, teacher_temp, ncrops)
    student_out = (student_logits.float() / student_temp).chunk(ncrops)
    with torch.no_grad():
        t = teacher.float()
        if teacher_is_probs:
            q = t
        else:
            logits = t if center is None else t - center.float().reshape(1, -1)
            q = F.softmax(logits / teacher_temp, dim=-1)
    teacher_out = q.chunk(2)

    total_loss = student_logits.new_zeros((), dtype=torch.float32)
    n_loss_terms = 0
    for iq, q_crop in enumerate(teacher_out):
        for v, s_crop in enumerate(student_out):
            if v == iq:  # the student is not asked to predict the teacher's view of the same crop
                continue
            total_loss = total_loss + torch.sum(-q_crop * F.log_softmax(s_crop, dim=-1), dim=-1).mean()
            n_loss_terms += 1
    loss = total_loss / n_loss_terms
    colsum = t.sum(dim=0)
    if not return_entropy:
        return loss, colsum
    return loss, colsum, torch.special.entr(q).sum(dim=-1).mean()


def fused_head_loss_ref(student_features, student_weight_v, teacher_features, teacher_weight_v, center,
                        student_temp, teacher_temp, *, pairing="crops", ncrops=None, row_weights=None,
                        student_gain=None, teacher_gain=None):
    """The spec of `fused_head_loss`: the weight-normalised last layer (rows g_k v_k / ||v_k||, as
    `F.normalize` and dinov2's `weight_norm`) applied to student and teacher features, then the cross-entropy.

    pairing="crops": `dino_loss_ref` of the logits (ncrops crops, row_weights unused). pairing="rows" (iBOT, as
    dinov2's `forward_masked`): loss = sum_i row_weights_i * -sum_k q_ik log softmax(s_i / student_temp)_k with
    q = softmax((t - center) / teacher_temp), row_weights default 1 / rows. Returns (loss, teacher_colsum,
    teacher_entropy) as `dino_loss_ref(..., return_entropy=True)`."""
    def last_layer(features, weight_v, gain):
        weight = F.normalize(weight_v, dim=1)
        weight = weight if gain is None else weight * gain.reshape(-1, 1)
        return F.linear(features, weight.to(features.dtype))  # master weights, low-precision features: as autocast

    student_logits = last_layer(student_features, student_weight_v, student_gain)
    with torch.no_grad():
        teacher_logits = last_layer(teacher_features, teacher_weight_v, teacher_gain)
    if pairing == "crops":
        return dino_loss_ref(student_logits, teacher_logits, center, student_temp, teacher_temp, ncrops,
                             return_entropy=True)
    with torch.no_grad():
        t = teacher_logits.float()
        logits = t if center is None else t - center.float().reshape(1, -1)
        q = F.softmax(logits / teacher_temp, dim=-1)
    if row_weights is None:
        row_weights = torch.full((student_logits.shape[0],), 1.0 / student_logits.shape[0],
                                 device=student_logits.device)
    per_row = torch.sum(-q * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1)
    loss = (per_row * row_weights.float()).sum()
    return loss, t.sum(dim=0), torch.special.entr(q).sum(dim=-1).mean()


def gelu_mlp_residual_ref(x, normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale=None) -> torch.Tensor:
    """x + scale * fc2(gelu(fc1(normed))): a ViT block's MLP branch (timm's Mlp, exact GELU) and its residual add,
    the branch scaled per row by `scale` (T, 1) (stochastic depth) when given; autograd's composition."""
    branch = F.linear(F.gelu(F.linear(normed, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
    return x + branch if scale is None else torch.addcmul(x, branch, scale.reshape(-1, 1))


@torch.no_grad()
def ema_update_ref(teacher_params, student_params, momentum) -> str:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place, over two lists of tensors.

    One `torch._foreach_lerp_` (teacher + (1 - m) * (student - teacher)); `momentum` is a float or a 0-d tensor on the
    teachers' device. A student of another dtype is converted first. DTensors are updated through their local shards.
    Returns "foreach", the name of the path, as `ema_update_` does.
    """
    teachers = [local_shard(t) for t in teacher_params]
    students = [local_shard(s).to(t.dtype) for s, t in zip(student_params, teachers, strict=True)]
    if not teachers:
        return "foreach"
    if isinstance(momentum, torch.Tensor):
        torch._foreach_lerp_(teachers, students, [1 - momentum] * len(teachers))
    else:
        torch._foreach_lerp_(teachers, students, 1.0 - momentum)
    return "foreach"


CLIP_MODES = ("global", "per_tensor")
CLIP_EPS = 1e-6  # added to the norm before dividing, as torch's clip_grad_norm_ and the official clip_gradients do


def clip_coefficients_ref(grads, max_norm: float, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coefficients (n,), total norm, skip flag) of `clip_coefficients` (kernels/clip.py), in fp32: per tensor
    min(1, max_norm / (||g_i|| + eps)) ("per_tensor", the official clip_gradients) or min(1, max_norm / (total +
    eps)) ("global"), 1 with max_norm 0; the flag is 1.0 when the total norm is not finite. fp64 gradients are
    measured in fp64 (a reference for the tests), others in fp32."""
    norms = torch.stack(torch._foreach_norm([g if g.dtype == torch.float64 else g.float() for g in grads]))
    total = norms.square().sum().sqrt()
    norm = norms if mode == "per_tensor" else total.expand_as(norms)
    coefficients = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0) if max_norm > 0 else torch.ones_like(norms)
    return coefficients, total, (~torch.isfinite(total)).float()


@torch.no_grad()
def adamw_step_ref(params, grads, exp_avgs, exp_avg_sqs, steps, lrs, weight_decays, *, betas, eps,
                   grad_coefficients=None, skip=None, zero_grads=False) -> None:
    """`adamw_step_` (kernels/adamw.py) as torch's fused AdamW computes it, one tensor at a time."""
    beta1, beta2 = betas
    keep = None if skip is None else 1 - skip  # 1.0: update, 0.0: leave everything as it is
    for i, (p, g, m, v, step, lr, wd) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, lrs,
                                                        weight_decays)):
        g = g if grad_coefficients is None else g * grad_coefficients[i]
        t = step + 1
        new_p = p - lr * wd * p
        new_m = beta1 * m + (1 - beta1) * g
        new_v = beta2 * v + (1 - beta2) * g * g
        denom = new_v.sqrt() / (1 - beta2 ** t).sqrt() + eps
        new_p = new_p - lr / (1 - beta1 ** t) * new_m / denom
        if keep is not None:
            new_p, new_m, new_v, t = (torch.where(keep > 0, new, old) for new, old in
                                      ((new_p, p), (new_m, m), (new_v, v), (t, step)))
        p.copy_(new_p)
        m.copy_(new_m)
        v.copy_(new_v)
        step.copy_(t)
        if zero_grads:
            grads[i].zero_()


N_STEP_STATS = 7  # loss sum, entropy sum, finite steps, skipped steps, non-finite in a row, longest such run, norm


@torch.no_grad()
def add_step_stats_(values, loss, entropy, grad_norm, skipped, nonfinite) -> None:
    """Add one step to the (7,) accumulators `values` in place (`skipped`, `nonfinite`: 0-d bool tensors)."""
    loss_sum, entropy_sum, finite, skipped_steps, in_a_row, longest, _ = values.unbind()
    in_a_row = (in_a_row + 1) * nonfinite
    values.copy_(torch.stack([  # in place: a CUDA graph of the step keeps writing this tensor
        loss_sum + torch.where(nonfinite, 0.0, loss.float()),
        entropy_sum + torch.where(nonfinite, 0.0, entropy.float()),
        finite + ~nonfinite,
        skipped_steps + skipped,
        in_a_row,
        torch.maximum(longest, in_a_row),
        grad_norm.float(),
    ]))


@torch.no_grad()
def step_stats_ref(values, loss, entropy, grad_norm, skip, momentum, momentum_out, center=None, center_before=None,
                   *, skip_is_nonfinite: bool = True) -> None:
    """`step_stats_update_` (kernels/step_stats.py) in torch ops, in place."""
    skipped = skip != 0
    nonfinite = ~torch.isfinite(loss)
    if skip_is_nonfinite:
        nonfinite |= skipped
    add_step_stats_(values, loss, entropy, grad_norm, skipped, nonfinite)
    momentum_out.copy_(torch.where(skipped, 1.0, momentum.float()))
    if center is not None:
        center.copy_(torch.where(skipped, center_before, center))
