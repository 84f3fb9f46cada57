"""Plain-PyTorch references of the fastdino kernels: the spec that the Triton kernels are tested against.

Written for clarity, not speed. They are also the CPU path of `dino_loss` (impl="torch") and the fallback of
`ema_update_`, and the baselines of the benchmarks. Importing this module needs neither Triton nor a GPU.
"""
import torch
import torch.nn.functional as F

from ._launch import check_dino_loss_args


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


def dino_loss_fused_head_ref(student_features, student_weight_v, teacher_features, teacher_weight_v, center,
                             student_temp, teacher_temp, ncrops):
    """The spec of `dino_loss_fused_head`: the DINO head's weight-normalised last layer (rows v_k / ||v_k||, gain 1,
    as `F.normalize`) applied to student and teacher features, then `dino_loss_ref` with the entropy."""
    student_logits = F.linear(student_features, F.normalize(student_weight_v, dim=1))  # (V*B, K)
    with torch.no_grad():
        teacher_logits = F.linear(teacher_features, F.normalize(teacher_weight_v, dim=1))  # (2*B, K)
    return dino_loss_ref(student_logits, teacher_logits, center, student_temp, teacher_temp, ncrops,
                         return_entropy=True)


@torch.no_grad()
def ema_update_ref(teacher_params, student_params, momentum) -> str:
    """teacher <- momentum * teacher + (1 - momentum) * student, in place, over two lists of tensors.

    One `torch._foreach_lerp_` (teacher + (1 - m) * (student - teacher)); `momentum` is a float or a 0-d tensor on the
    teachers' device. A student of another dtype is converted first. DTensors are updated through their local shards.
    Returns "foreach", the name of the path, as `ema_update_` does.
    """
    teachers = [_local(t) for t in teacher_params]
    students = [_local(s).to(t.dtype) for s, t in zip(student_params, teachers, strict=True)]
    if not teachers:
        return "foreach"
    if isinstance(momentum, torch.Tensor):
        torch._foreach_lerp_(teachers, students, [1 - momentum] * len(teachers))
    else:
        torch._foreach_lerp_(teachers, students, 1.0 - momentum)
    return "foreach"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameter), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
