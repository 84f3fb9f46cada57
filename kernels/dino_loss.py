"""Fused DINO loss: teacher centering + sharpening, multi-crop cross-entropy, its gradient, and the center statistics.

Math (DINO, Caron et al. 2021, Sec. 3.1, Eq. 1 and Eq. 4; `kernels/reference.py: dino_loss_ref` is the spec).
Shapes: student S (V*B, K) crop-major (row v*B + b is crop v of image b), teacher T (2*B, K), center C (K,).
- Teacher (Sec. 3.1 "Avoiding collapse", centering and sharpening): q_i = softmax((T_i - C) / tau_t) for teacher
  row i = iq*B + b (global crop iq of image b); or q_i = T_i as given when `teacher_is_probs` (Sinkhorn-Knopp).
- Student crop v of image b is paired with every teacher crop iq != v (Eq. 4 skips the same view). With x = S_row /
  tau_s and w = sum_{iq != v} q_{iq*B+b} (one or two teacher rows), the row's summed loss terms are
      sum_{iq != v} -q_iq . log_softmax(x) = (sum_k w_k) * LSE(x) - sum_k w_k x_k,
  so log_softmax is never built per pair. loss = sum over rows / (B * n_terms) with n_terms = 2*(V-1) pairs.
- Gradient (the loss is the last node, so it is computed in forward, Liger-style):
      d loss / d S_row = ((sum_k w_k) * softmax(x) - w) / (tau_s * B * n_terms).
  sum_k w_k is the number of paired teacher crops (1 for v < 2, else 2) when q is a softmax; for given probabilities
  the teacher kernel sums each row, so the result matches the official formula even for unnormalised rows.
- Teacher entropy (logged, not differentiated): H_i = -sum_k q_ik log q_ik = log L - (sum_k e^(z_k - M) (z_k - M)) / L
  for z = (T_i - C) / tau_t with row max M and L = sum_k e^(z_k - M) (no large terms cancel).

Two kernels, each reading its input once per pass, fp32 math, loads/stores in the storage dtype:
1. `_teacher_stats_kernel`, one program per column block of T: loops over the 2B rows, writes the column sum of T
   (for the center update, so T is read once for it) and per-(row, block) partials (max, sum of exp, sum of exp*z)
   or, for probabilities, (row sum, -sum q log q). Reads 2B*K elements of T and K of C; writes K + 3*2B*K/BLOCK fp32.
2. `_dino_loss_kernel`, one program per student row, ordered image-major so the V programs that share the two
   teacher rows of one image run together and find them in L2. It combines the teacher partials of its rows, makes
   one pass over S for the online max/sum of x, and a second pass that rebuilds w from T and C, accumulates
   sum_k w_k x_k and writes dS. Reads S twice, T once or twice per row (mostly from L2), writes dS and one fp32 loss.
Backward saves only dS (V*B, K) in the student dtype and scales it in place by grad_output: no fp32 (V*B, K)
intermediate exists at any point.
"""
import torch
import triton
import triton.language as tl

from . import _launch
from .reference import dino_loss_ref

# Column-block caps. On the GPU 4096 keeps the row loops' registers in check (Liger CE uses up to 65536/2 with 32
# warps; 4096 with 8 warps streams as well for a memory-bound loop). The interpreter runs one numpy op per block, so
# there bigger blocks mean fewer Python steps.
MAX_BLOCK_K = {"cuda": 4096, "cpu": 16384}
# Teacher kernel tile: BLOCK_T columns x TEACHER_BLOCK_R rows per step.
MAX_BLOCK_T = 512
TEACHER_BLOCK_R = 8


@triton.jit
def _teacher_stats_kernel(
    t_ptr, c_ptr, colsum_ptr, part_a_ptr, part_b_ptr, part_c_ptr,
    n_rows, n_cols, stride_t_row, inv_teacher_temp, n_blocks,
    HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Column sums of T and per-(row, column block) softmax partials, for one block of BLOCK_T columns.

    t_ptr: T (n_rows, n_cols), rows `stride_t_row` apart, any float dtype. c_ptr: C (n_cols,) (unused without
    HAS_CENTER). colsum_ptr: (n_cols,) fp32 out, sum over rows of T. part_*_ptr: (n_rows, n_blocks) fp32 out, entry
    [i, pid]. Logits (IS_PROBS=False): a = max z, b = sum exp(z - a), c = sum exp(z - a) * (z - a) over the block, with
    z = (T - C) * inv_teacher_temp. Probabilities (IS_PROBS=True): a = sum q, b = -sum q log q, c unused.
    """
    pid = tl.program_id(0)
    cols = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    col_mask = cols < n_cols
    if HAS_CENTER:
        center = tl.load(c_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    colsum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for row_start in range(0, n_rows, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        t = tl.load(t_ptr + rows[:, None].to(tl.int64) * stride_t_row + cols[None, :], mask=mask, other=0.0)
        t = t.to(tl.float32)
        colsum += tl.sum(t, axis=0)
        part_offs = rows.to(tl.int64) * n_blocks + pid
        if IS_PROBS:
            neg_q_log_q = tl.where(t > 0, -t * tl.log(tl.where(t > 0, t, 1.0)), 0.0)
            tl.store(part_a_ptr + part_offs, tl.sum(t, axis=1), mask=row_mask)
            tl.store(part_b_ptr + part_offs, tl.sum(neg_q_log_q, axis=1), mask=row_mask)
        else:
            if HAS_CENTER:
                t = t - center[None, :]
            z = t * inv_teacher_temp
            # Masked lanes are -inf for the max and 0 after the exp; masked rows get max 0 (they are not stored).
            z_max = tl.where(row_mask, tl.max(tl.where(mask, z, float("-inf")), axis=1), 0.0)
            e = tl.where(mask, tl.exp(z - z_max[:, None]), 0.0)
            tl.store(part_a_ptr + part_offs, z_max, mask=row_mask)
            tl.store(part_b_ptr + part_offs, tl.sum(e, axis=1), mask=row_mask)
            tl.store(part_c_ptr + part_offs, tl.sum(e * (z - z_max[:, None]), axis=1), mask=row_mask)
    tl.store(colsum_ptr + cols, colsum, mask=col_mask)


@triton.jit
def _combine_teacher_row(part_a_ptr, part_b_ptr, part_c_ptr, row, n_blocks, IS_PROBS: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """(shift, scale, entropy) of teacher row `row` from its partials: q = exp(z - shift) / scale for logits;
    for probabilities shift = 0 and scale = sum q (unused for q itself)."""
    offs = tl.arange(0, BLOCK_P)
    mask = offs < n_blocks
    base = row.to(tl.int64) * n_blocks
    if IS_PROBS:
        row_sum = tl.sum(tl.load(part_a_ptr + base + offs, mask=mask, other=0.0), axis=0)
        entropy = tl.sum(tl.load(part_b_ptr + base + offs, mask=mask, other=0.0), axis=0)
        return 0.0, row_sum, entropy
    block_max = tl.load(part_a_ptr + base + offs, mask=mask, other=float("-inf"))
    row_max = tl.max(block_max, axis=0)
    rescale = tl.exp(block_max - row_max)  # 0 for the padding blocks
    block_sumexp = tl.load(part_b_ptr + base + offs, mask=mask, other=0.0)
    row_sumexp = tl.sum(block_sumexp * rescale, axis=0)
    # sum_k e^(z_k - M) (z_k - M), re-based from each block's max: every term is <= 0, so nothing cancels.
    block_c = tl.load(part_c_ptr + base + offs, mask=mask, other=0.0)
    block_shift = tl.where(mask, block_max - row_max, 0.0)
    shifted = rescale * (block_c + block_shift * block_sumexp)
    entropy = tl.log(row_sumexp) - tl.sum(shifted, axis=0) / row_sumexp
    return row_max, row_sumexp, entropy


@triton.jit
def _teacher_probs(t_row_ptr, c_ptr, cols, mask, shift, scale, inv_teacher_temp,
                   HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr):
    """fp32 teacher probabilities of one block of a teacher row, 0 where `mask` is off."""
    t = tl.load(t_row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_PROBS:
        return t
    if HAS_CENTER:
        t = t - tl.load(c_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, tl.exp(t * inv_teacher_temp - shift) / scale, 0.0)


@triton.jit
def _dino_loss_kernel(
    s_ptr, t_ptr, c_ptr, grad_ptr, row_loss_ptr, entropy_ptr, part_a_ptr, part_b_ptr, part_c_ptr,
    n_batch, n_crops, n_cols, n_blocks, stride_s_row, stride_t_row, stride_grad_row,
    inv_student_temp, inv_teacher_temp, grad_scale,
    HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Loss, gradient and teacher entropy for one student row.

    s_ptr: S (V*B, n_cols), rows `stride_s_row` apart. t_ptr: T (2B, n_cols) logits or probabilities (IS_PROBS).
    c_ptr: C (n_cols,) (unused without HAS_CENTER). grad_ptr: dS out, like S, rows `stride_grad_row` apart (unused
    without COMPUTE_GRAD), already multiplied by grad_scale = 1 / (tau_s * B * n_terms). row_loss_ptr: (V*B,) fp32 out,
    the row's summed loss terms, (sum w) * LSE(x) - sum w x. entropy_ptr: (2B,) fp32 out, written by the programs of
    crops 0 and 1, whose row index equals their teacher row's. part_*_ptr: (2B, n_blocks) partials of the teacher
    kernel. n_batch = B, n_crops = V. Program p handles image b = p // V, crop v = p % V (row v*B + b).
    """
    pid = tl.program_id(0)
    b = pid // n_crops
    v = pid % n_crops
    row = v * n_batch + b
    # Teacher crop 0 (row b) pairs with every student crop but 0, teacher crop 1 (row B + b) with every crop but 1.
    use_q0 = v != 0
    use_q1 = v != 1
    shift0, scale0, entropy0 = _combine_teacher_row(part_a_ptr, part_b_ptr, part_c_ptr, b, n_blocks,
                                                    IS_PROBS, BLOCK_P)
    shift1, scale1, entropy1 = _combine_teacher_row(part_a_ptr, part_b_ptr, part_c_ptr, n_batch + b, n_blocks,
                                                    IS_PROBS, BLOCK_P)
    if v < 2:
        tl.store(entropy_ptr + row, tl.where(v == 0, entropy0, entropy1))
    if IS_PROBS:
        w_total = tl.where(use_q0, scale0, 0.0) + tl.where(use_q1, scale1, 0.0)
    else:
        w_total = use_q0.to(tl.float32) + use_q1.to(tl.float32)

    s_row_ptr = s_ptr + row.to(tl.int64) * stride_s_row
    t0_row_ptr = t_ptr + b.to(tl.int64) * stride_t_row
    t1_row_ptr = t_ptr + (n_batch + b).to(tl.int64) * stride_t_row

    # Pass 1: online max and sum of exp of x = S / tau_s over the row.
    x_max = float("-inf")
    x_sumexp = 0.0
    for start in range(0, n_cols, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        mask = cols < n_cols
        x = tl.load(s_row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_student_temp
        new_max = tl.maximum(x_max, tl.max(x, axis=0))
        x_sumexp = x_sumexp * tl.exp(x_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        x_max = new_max
    lse = x_max + tl.log(x_sumexp)

    # Pass 2: w from the paired teacher rows, sum w*x, and dS = ((sum w) softmax(x) - w) * grad_scale.
    wx = tl.zeros([BLOCK_K], dtype=tl.float32)
    grad_row_ptr = grad_ptr + row.to(tl.int64) * stride_grad_row
    for start in range(0, n_cols, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        mask = cols < n_cols
        x = tl.load(s_row_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv_student_temp
        # A teacher row that is not paired with this crop is masked off entirely: no memory traffic.
        w = _teacher_probs(t0_row_ptr, c_ptr, cols, mask & use_q0, shift0, scale0, inv_teacher_temp,
                           HAS_CENTER, IS_PROBS)
        w += _teacher_probs(t1_row_ptr, c_ptr, cols, mask & use_q1, shift1, scale1, inv_teacher_temp,
                            HAS_CENTER, IS_PROBS)
        wx += w * x
        if COMPUTE_GRAD:
            grad = (w_total * tl.exp(x - lse) - w) * grad_scale
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(row_loss_ptr + row, w_total * lse - tl.sum(wx, axis=0))


def _dino_loss_fwd(student_logits, teacher, center, student_temp, teacher_temp, ncrops, teacher_is_probs,
                   compute_grad):
    """Validate, allocate and launch both kernels. Returns (loss, colsum, entropy, grad or None)."""
    batch, n_cols = _launch.check_dino_loss_args(student_logits, teacher, center, student_temp, teacher_temp, ncrops)
    student_logits = _launch.last_dim_contiguous(student_logits)
    teacher = _launch.last_dim_contiguous(teacher)
    device = student_logits.device
    n_rows_t = 2 * batch
    n_terms = 2 * (ncrops - 1)
    has_center = center is not None and not teacher_is_probs
    center = center.reshape(-1).contiguous() if has_center else teacher  # a placeholder pointer when unused

    block_k, num_warps = _launch.row_settings(n_cols, MAX_BLOCK_K["cuda" if device.type == "cuda" else "cpu"])
    block_t = min(triton.next_power_of_2(n_cols), MAX_BLOCK_T)
    n_blocks = triton.cdiv(n_cols, block_t)

    colsum = _launch.empty((n_cols,), torch.float32, device)
    parts = [_launch.empty((n_rows_t, n_blocks), torch.float32, device) for _ in range(3)]
    _teacher_stats_kernel[(n_blocks,)](
        teacher, center, colsum, *parts,
        n_rows_t, n_cols, teacher.stride(0), 1.0 / teacher_temp, n_blocks,
        HAS_CENTER=has_center, IS_PROBS=teacher_is_probs, BLOCK_R=TEACHER_BLOCK_R, BLOCK_T=block_t,
    )

    grad = _launch.empty(student_logits.shape, student_logits.dtype, device) if compute_grad else None
    row_loss = _launch.empty((ncrops * batch,), torch.float32, device)
    entropy = _launch.empty((n_rows_t,), torch.float32, device)
    _dino_loss_kernel[(ncrops * batch,)](  # without a gradient, student_logits stands in for the unused grad_ptr
        student_logits, teacher, center, grad if compute_grad else student_logits, row_loss, entropy, *parts,
        batch, ncrops, n_cols, n_blocks, student_logits.stride(0), teacher.stride(0),
        grad.stride(0) if compute_grad else 0,
        1.0 / student_temp, 1.0 / teacher_temp, 1.0 / (student_temp * batch * n_terms),
        HAS_CENTER=has_center, IS_PROBS=teacher_is_probs, COMPUTE_GRAD=compute_grad,
        BLOCK_K=block_k, BLOCK_P=triton.next_power_of_2(n_blocks), num_warps=num_warps,
    )
    loss = row_loss.sum() / (batch * n_terms)
    return loss, colsum, entropy.mean(), grad


class DINOLossFunction(torch.autograd.Function):
    """Fused DINO loss; forward computes the gradient, backward only rescales it (in place: backward runs once)."""

    @staticmethod
    def forward(ctx, student_logits, teacher, center, student_temp, teacher_temp, ncrops, teacher_is_probs):
        loss, colsum, entropy, grad = _dino_loss_fwd(
            student_logits, teacher, center, student_temp, teacher_temp, ncrops, teacher_is_probs,
            compute_grad=ctx.needs_input_grad[0],
        )
        ctx.mark_non_differentiable(colsum, entropy)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.backward_done = False
        return loss, colsum, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_colsum, _grad_entropy):
        if ctx.backward_done:
            raise RuntimeError("dino_loss (triton) scales its saved gradient in place: backward can run only once")
        ctx.backward_done = True
        (grad,) = ctx.saved_tensors
        # grad_loss is a 0-d tensor: multiplying on device avoids Liger's host-side `grad_output == 1` check.
        return grad.mul_(grad_loss), None, None, None, None, None, None


def dino_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor | None,
    student_temp: float,
    teacher_temp: float,
    ncrops: int,
    *,
    teacher_is_probs: bool = False,
    impl: str = "auto",
    return_entropy: bool = False,
):
    """DINO multi-crop cross-entropy with teacher centering and sharpening (see the module docstring).

    student_logits (V*B, K) with V = ncrops; teacher (2*B, K) logits of the two global crops (probabilities when
    `teacher_is_probs`, then center and teacher_temp are not used); center (K,), (1, K) or None. Temperatures are
    positive Python numbers. impl: "auto" (Triton on CUDA tensors, the reference elsewhere), "triton" (CUDA, or CPU
    with TRITON_INTERPRET=1), "torch" (`dino_loss_ref`).
    Returns (loss, teacher_colsum): a 0-d fp32 loss, differentiable w.r.t. student_logits, and the fp32 (K,) sum of
    the teacher input over its 2*B rows (for the center update); with `return_entropy` also the 0-d fp32 mean entropy
    of the teacher probability rows.
    """
    chosen = _launch.select_impl("dino_loss", impl, student_logits.device, "torch", _dino_loss_kernel)
    if chosen == "torch":
        return dino_loss_ref(student_logits, teacher, center, student_temp, teacher_temp, ncrops,
                             teacher_is_probs=teacher_is_probs, return_entropy=return_entropy)
    loss, colsum, entropy = DINOLossFunction.apply(
        student_logits, teacher.detach(), None if center is None else center.detach(), student_temp, teacher_temp,
        ncrops, teacher_is_probs,
    )
    return (loss, colsum, entropy) if return_entropy else (loss, colsum)
