"""Fused DINO loss: teacher centering + sharpening, multi-crop cross-entropy, its gradient, and the center statistics.

Math (DINO, Caron et al. 2021, Sec. 3.1, Eq. 1 and Eq. 4; `kernels/reference.py: dino_loss_ref` is the spec).
Shapes: student S (V*B, K) crop-major (row v*B + b is crop v of image b), teacher T (2*B, K), center C (K,).
- Teacher (Sec. 3.1 "Avoiding collapse", centering and sharpening): q_i = softmax((T_i - C) / tau_t) for teacher
  row i = iq*B + b (global crop iq of image b); or q_i = T_i as given when `teacher_is_probs` (Sinkhorn-Knopp).
- Student crop v of image b is paired with every teacher crop iq != v (Eq. 4 skips the same view). With x = S_row /
  tau_s and w = sum_{iq != v} q_{iq*B+b} (one or two teacher rows), the row's summed loss terms are
      sum_{iq != v} -q_iq . log_softmax(x) = (sum_k w_k) * LSE(x) - sum_k w_k x_k,
  so log_softmax is never built per pair. loss = sum over rows / (B * n_terms) with n_terms = 2*(V-1) pairs.
- Gradient, computed in backward from S, the saved per-row LSE and grad_output g:
      d (g * loss) / d S_row = g * ((sum_k w_k) * softmax(x) - w) / (tau_s * B * n_terms),
  in fp32 and only then cast to the storage dtype, so that a loss scale in g (fp16 GradScaler, 2^16) lifts small
  entries into range before the cast instead of after it (stored unscaled, they flush to zero in fp16).
  sum_k w_k is the number of paired teacher crops (1 for v < 2, else 2) when q is a softmax; for given probabilities
  it is the sum of the paired rows, so the result matches the official formula even for unnormalised rows.
- Teacher entropy (logged, not differentiated): H_i = -sum_k q_ik log q_ik = log L - (sum_k e^(z_k - M) (z_k - M)) / L
  for z = (T_i - C) / tau_t with row max M and L = sum_k e^(z_k - M) (no large terms cancel).

Forward, three launches; fp32 math, loads in the storage dtype:
1. `_teacher_stats_kernel`, a 2-D grid of BLOCK_T columns x TEACHER_ROWS_PER_PROGRAM rows of T: per-group column
   sums of T (for the center update), a snapshot of C (backward needs the center of this step; the caller updates
   it in place), and per-(row, block) softmax partials. Reads T (2B*K) once and C once per row group.
2. `_dino_loss_fwd_kernel`, one program per (image b, chunk of BLOCK_K columns): combines the teacher partials of
   the image's two teacher rows, builds their probabilities for the chunk once, then for each of the V crops makes
   one pass over the chunk of S for the max, the sum of exp and sum w*x together (per-chunk partials). Reads S once
   and T once; writes 3 fp32 per (row, chunk). The image-0 programs also add up the teacher column sums.
3. `_dino_loss_finish_kernel`, one program: per-row LSE from the chunk partials, the loss and the mean entropy.
Backward, one launch: `_dino_loss_bwd_kernel` on the same (image, chunk) grid reads S, T and C once and writes dS
once. Saved for backward: S and T (inputs), C's snapshot (K,), per-row LSE (V*B,) and per-teacher-row softmax shift
and scale (2B,) each: no (V*B, K) tensor beyond the input itself.
"""
import functools

import torch
import triton
import triton.language as tl

from . import _launch
from .reference import dino_loss_ref

# Column-chunk caps of the student kernels (one chunk per program, so also the grid's second extent). On the GPU
# 4096 columns with 8 warps hold the chunk's two teacher rows in registers without spills (benchmarks/aot_report.py)
# and give B * 16 programs at K = 65536. The interpreter runs one numpy op per block, so there bigger blocks mean
# fewer Python steps.
MAX_BLOCK_K = {"cuda": 4096, "cpu": 16384}
# Teacher kernel tile: BLOCK_T columns x TEACHER_BLOCK_R rows per step. 256 columns give 256 programs at K = 65536,
# about two per SM on an H100/H200 (512 gave 128 programs for 132 SMs); the fwd programs then combine 256 partials
# per teacher row, from L2. Two warps keep 4 columns per thread: 128-bit center loads and colsum stores.
MAX_BLOCK_T = 256
TEACHER_BLOCK_R = 8
TEACHER_NUM_WARPS = 2
# Teacher rows per program (a multiple of TEACHER_BLOCK_R): the grid's second extent is 2B / this, 8 at B = 64.
TEACHER_ROWS_PER_PROGRAM = 16
# Rows per step of the one-program finish kernel (V*B rows of n_chunks partials each).
FINISH_BLOCK_R = 64


@triton.jit
def _teacher_stats_kernel(
    t_ptr, c_ptr, colsum_part_ptr, c_copy_ptr, part_a_ptr, part_b_ptr, part_c_ptr,
    n_rows, n_cols, stride_t_row, inv_teacher_temp, n_blocks, rows_per_group,
    HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Column sums and per-(row, column block) softmax partials of one tile of T: BLOCK_T columns (program_id(0))
    by `rows_per_group` rows (program_id(1)), a 2-D grid so that the chip is full at K = 65536.

    t_ptr: T (n_rows, n_cols), rows `stride_t_row` apart, any float dtype. c_ptr: C (n_cols,) (unused without
    HAS_CENTER). colsum_part_ptr: (n_groups, n_cols) fp32 out, the sum over the group's rows of T (the forward
    kernel adds the groups up). c_copy_ptr: (n_cols,) fp32 out, a snapshot of C (with HAS_CENTER) for backward. part_*_ptr: (n_rows, n_blocks) fp32 out, entry
    [i, pid]. Logits (IS_PROBS=False): a = max z, b = sum exp(z - a), c = sum exp(z - a) * (z - a) over the block, with
    z = (T - C) * inv_teacher_temp. Probabilities (IS_PROBS=True): a = sum q, b = -sum q log q, c unused.
    """
    pid = tl.program_id(0)
    group = tl.program_id(1)
    cols = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    col_mask = cols < n_cols
    if HAS_CENTER:
        center = tl.load(c_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if group == 0:
            tl.store(c_copy_ptr + cols, center, mask=col_mask)
    colsum = tl.zeros([BLOCK_T], dtype=tl.float32)
    group_start = group * rows_per_group
    group_end = tl.minimum(group_start + rows_per_group, n_rows)
    for row_start in range(group_start, group_end, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        row_mask = rows < group_end
        mask = row_mask[:, None] & col_mask[None, :]
        t = tl.load(t_ptr + rows[:, None].to(tl.int64) * stride_t_row + cols[None, :], mask=mask, other=0.0)
        t = t.to(tl.float32)
        colsum += tl.sum(t, axis=0)
        part_offs = rows.to(tl.int64) * n_blocks + pid
        if IS_PROBS:
            # torch.special.entr: 0 at q = 0, -inf below, NaN stays NaN.
            not_positive = tl.where(t == 0, 0.0, tl.where(t < 0, float("-inf"), t))
            neg_q_log_q = tl.where(t > 0, -t * tl.log(tl.where(t > 0, t, 1.0)), not_positive)
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
    tl.store(colsum_part_ptr + group.to(tl.int64) * n_cols + cols, colsum, mask=col_mask)


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
def _load(ptr, mask, other, EVEN: tl.constexpr):
    """tl.load with `mask` unless EVEN (every block full), where the unmasked load lets the compiler vectorize."""
    if EVEN:
        return tl.load(ptr)
    return tl.load(ptr, mask=mask, other=other)


@triton.jit
def _store(ptr, value, mask, EVEN: tl.constexpr):
    """tl.store with `mask` unless EVEN."""
    if EVEN:
        tl.store(ptr, value)
    else:
        tl.store(ptr, value, mask=mask)


@triton.jit
def _teacher_probs(t_row_ptr, c_ptr, cols, mask, shift, scale, inv_teacher_temp,
                   HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 teacher probabilities of one chunk of a teacher row, 0 where `mask` is off."""
    t = _load(t_row_ptr + cols, mask, 0.0, EVEN_K).to(tl.float32)
    if IS_PROBS:
        return t
    if HAS_CENTER:
        t = t - _load(c_ptr + cols, mask, 0.0, EVEN_K)
    q = tl.exp(t * inv_teacher_temp - shift) / scale
    return q if EVEN_K else tl.where(mask, q, 0.0)


@triton.jit
def _dino_loss_fwd_kernel(
    s_ptr, t_ptr, c_ptr, part_max_ptr, part_sumexp_ptr, part_wx_ptr, t_shift_ptr, t_scale_ptr, t_entropy_ptr,
    part_a_ptr, part_b_ptr, part_c_ptr, colsum_part_ptr, colsum_ptr,
    n_batch, n_crops, n_cols, n_chunks, n_blocks, n_groups, stride_s_row, stride_t_row, inv_student_temp,
    inv_teacher_temp,
    HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Chunk partials of every crop of image b = program_id(0), over columns chunk * BLOCK_K + [0, BLOCK_K).

    s_ptr: S (V*B, n_cols), rows `stride_s_row` apart. t_ptr: T (2B, n_cols) logits or probabilities (IS_PROBS).
    c_ptr: the fp32 center snapshot (n_cols,) (unused without HAS_CENTER). part_max/sumexp/wx_ptr: (V*B, n_chunks)
    fp32 out: max x, sum exp(x - max x) and sum w*x over the chunk, x = S / tau_s. t_shift/scale/entropy_ptr: (2B,)
    fp32 out, written by the chunk-0 programs: q = exp(z - shift) / scale (probabilities: shift 0, scale = row sum)
    and the row entropy. part_a/b/c_ptr: (2B, n_blocks) teacher partials of `_teacher_stats_kernel`, and
    colsum_part_ptr its (n_groups, n_cols) column sums, which the image-0 programs add into colsum_ptr (n_cols,).
    """
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    shift0, scale0, entropy0 = _combine_teacher_row(part_a_ptr, part_b_ptr, part_c_ptr, b, n_blocks,
                                                    IS_PROBS, BLOCK_P)
    shift1, scale1, entropy1 = _combine_teacher_row(part_a_ptr, part_b_ptr, part_c_ptr, n_batch + b, n_blocks,
                                                    IS_PROBS, BLOCK_P)
    if chunk == 0:
        tl.store(t_shift_ptr + b, shift0)
        tl.store(t_shift_ptr + n_batch + b, shift1)
        tl.store(t_scale_ptr + b, scale0)
        tl.store(t_scale_ptr + n_batch + b, scale1)
        tl.store(t_entropy_ptr + b, entropy0)
        tl.store(t_entropy_ptr + n_batch + b, entropy1)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < n_cols
    if b == 0:
        colsum = tl.zeros([BLOCK_K], dtype=tl.float32)
        for group in range(0, n_groups):
            colsum += _load(colsum_part_ptr + group * n_cols + cols, mask, 0.0, EVEN_K)
        _store(colsum_ptr + cols, colsum, mask, EVEN_K)
    # The image's two teacher rows, once for all V crops (each crop pairs with one or both).
    q0 = _teacher_probs(t_ptr + b.to(tl.int64) * stride_t_row, c_ptr, cols, mask, shift0, scale0,
                        inv_teacher_temp, HAS_CENTER, IS_PROBS, EVEN_K)
    q1 = _teacher_probs(t_ptr + (n_batch + b).to(tl.int64) * stride_t_row, c_ptr, cols, mask, shift1, scale1,
                        inv_teacher_temp, HAS_CENTER, IS_PROBS, EVEN_K)
    for v in range(0, n_crops):
        row = v * n_batch + b
        w = tl.where(v != 0, q0, 0.0) + tl.where(v != 1, q1, 0.0)
        x = _load(s_ptr + row.to(tl.int64) * stride_s_row + cols, mask, float("-inf"), EVEN_K)
        x = x.to(tl.float32) * inv_student_temp
        x_max = tl.max(x, axis=0)
        wx = w * x if EVEN_K else w * tl.where(mask, x, 0.0)  # masked lanes: 0 * -inf would be NaN
        part = row.to(tl.int64) * n_chunks + chunk
        tl.store(part_max_ptr + part, x_max)
        tl.store(part_sumexp_ptr + part, tl.sum(tl.exp(x - x_max), axis=0))
        tl.store(part_wx_ptr + part, tl.sum(wx, axis=0))


@triton.jit
def _dino_loss_finish_kernel(
    part_max_ptr, part_sumexp_ptr, part_wx_ptr, t_scale_ptr, t_entropy_ptr, lse_ptr, loss_ptr, entropy_ptr,
    n_batch, n_rows, n_chunks, loss_scale,
    IS_PROBS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One program: per-row LSE (lse_ptr, (V*B,) fp32 out) from the chunk partials, the loss (loss_ptr, 0-d) =
    loss_scale * sum over rows of (sum w) * LSE - sum w x, and the mean teacher entropy (entropy_ptr, 0-d).
    n_rows = V*B; loss_scale = 1 / (B * n_terms)."""
    chunks = tl.arange(0, BLOCK_P)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for row_start in range(0, n_rows, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (chunks < n_chunks)[None, :]
        offs = rows[:, None].to(tl.int64) * n_chunks + chunks[None, :]
        part_max = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))
        row_max = tl.where(row_mask, tl.max(part_max, axis=1), 0.0)
        sumexp = tl.sum(tl.load(part_sumexp_ptr + offs, mask=mask, other=0.0) * tl.exp(part_max - row_max[:, None]),
                        axis=1)
        sumexp = tl.where(row_mask, sumexp, 1.0)  # padding rows: no log(0)
        lse = row_max + tl.log(sumexp)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        wx = tl.sum(tl.load(part_wx_ptr + offs, mask=mask, other=0.0), axis=1)
        v = rows // n_batch
        if IS_PROBS:
            b = rows % n_batch
            w_total = (tl.where(v != 0, tl.load(t_scale_ptr + b, mask=row_mask, other=0.0), 0.0)
                       + tl.where(v != 1, tl.load(t_scale_ptr + n_batch + b, mask=row_mask, other=0.0), 0.0))
        else:
            w_total = tl.where(v < 2, 1.0, 2.0)
        total += tl.where(row_mask, w_total * lse - wx, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * loss_scale)
    entropy = tl.zeros([BLOCK_R], dtype=tl.float32)
    for row_start in range(0, 2 * n_batch, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        entropy += tl.load(t_entropy_ptr + rows, mask=rows < 2 * n_batch, other=0.0)
    tl.store(entropy_ptr, tl.sum(entropy, axis=0) / (2 * n_batch))


@triton.jit
def _dino_loss_bwd_kernel(
    s_ptr, t_ptr, c_ptr, grad_ptr, lse_ptr, t_shift_ptr, t_scale_ptr, grad_loss_ptr,
    n_batch, n_crops, n_cols, stride_s_row, stride_t_row, stride_grad_row,
    inv_student_temp, inv_teacher_temp, grad_scale,
    HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dS for every crop of image b = program_id(0) over one chunk of BLOCK_K columns, on the forward's grid.

    grad_ptr: dS out, like S, rows `stride_grad_row` apart. lse_ptr: (V*B,) per-row LSE of the forward.
    t_shift/scale_ptr: (2B,) teacher softmax statistics of the forward. grad_loss_ptr: the 0-d grad_output, read on
    device (no host sync) and applied in fp32 with grad_scale = 1 / (tau_s * B * n_terms) before the cast to dS's
    dtype. Other arguments as in `_dino_loss_fwd_kernel`.
    """
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    g = tl.load(grad_loss_ptr).to(tl.float32) * grad_scale
    shift0, scale0 = tl.load(t_shift_ptr + b), tl.load(t_scale_ptr + b)
    shift1, scale1 = tl.load(t_shift_ptr + n_batch + b), tl.load(t_scale_ptr + n_batch + b)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < n_cols
    q0 = _teacher_probs(t_ptr + b.to(tl.int64) * stride_t_row, c_ptr, cols, mask, shift0, scale0,
                        inv_teacher_temp, HAS_CENTER, IS_PROBS, EVEN_K)
    q1 = _teacher_probs(t_ptr + (n_batch + b).to(tl.int64) * stride_t_row, c_ptr, cols, mask, shift1, scale1,
                        inv_teacher_temp, HAS_CENTER, IS_PROBS, EVEN_K)
    for v in range(0, n_crops):
        row = v * n_batch + b
        w = tl.where(v != 0, q0, 0.0) + tl.where(v != 1, q1, 0.0)
        if IS_PROBS:
            w_total = tl.where(v != 0, scale0, 0.0) + tl.where(v != 1, scale1, 0.0)
        else:
            w_total = tl.where(v < 2, 1.0, 2.0)
        x = _load(s_ptr + row.to(tl.int64) * stride_s_row + cols, mask, 0.0, EVEN_K).to(tl.float32)
        softmax = tl.exp(x * inv_student_temp - tl.load(lse_ptr + row))
        grad = ((w_total * softmax - w) * g).to(grad_ptr.dtype.element_ty)
        _store(grad_ptr + row.to(tl.int64) * stride_grad_row + cols, grad, mask, EVEN_K)


@functools.lru_cache(maxsize=64)
def _launch_settings(n_cols: int, max_block_k: int, max_block_t: int) -> dict:
    """Block sizes, grid extents and warps for K = n_cols, computed once per shape (the host path stays short)."""
    block_k, num_warps = _launch.row_settings(n_cols, max_block_k)
    block_t = min(triton.next_power_of_2(n_cols), max_block_t)
    n_chunks, n_blocks = triton.cdiv(n_cols, block_k), triton.cdiv(n_cols, block_t)
    return dict(block_k=block_k, num_warps=num_warps, block_t=block_t, n_chunks=n_chunks, n_blocks=n_blocks,
                even_k=n_cols % block_k == 0, block_chunks=triton.next_power_of_2(n_chunks),
                block_blocks=triton.next_power_of_2(n_blocks))


def _dino_loss_fwd(student_logits, teacher, center, student_temp, teacher_temp, ncrops, teacher_is_probs):
    """Validate, allocate and launch the forward kernels. Returns (loss, colsum, entropy, saved), where saved is
    what `_dino_loss_bwd` needs besides the inputs: (center snapshot, lse, t_shift, t_scale)."""
    batch, n_cols = _launch.check_dino_loss_args(student_logits, teacher, center, student_temp, teacher_temp, ncrops)
    student_logits = _launch.last_dim_contiguous(student_logits)
    teacher = _launch.last_dim_contiguous(teacher)
    device = student_logits.device
    cfg = _launch_settings(n_cols, MAX_BLOCK_K["cuda" if device.type == "cuda" else "cpu"], MAX_BLOCK_T)
    n_rows_s, n_rows_t, n_chunks, n_blocks = ncrops * batch, 2 * batch, cfg["n_chunks"], cfg["n_blocks"]
    has_center = center is not None and not teacher_is_probs
    center = center.reshape(-1).contiguous() if has_center else None
    n_groups = triton.cdiv(n_rows_t, TEACHER_ROWS_PER_PROGRAM)

    # One fp32 workspace for every small buffer: one allocation instead of fourteen.
    sizes = [n_cols, n_groups * n_cols, n_cols, *[n_rows_t * n_blocks] * 3, *[n_rows_s * n_chunks] * 3, *[n_rows_t] * 3, n_rows_s, 1, 1]
    workspace = _launch.empty((sum(sizes),), torch.float32, device)
    (colsum, colsum_part, center_copy, part_a, part_b, part_c, part_max, part_sumexp, part_wx, t_shift, t_scale, t_entropy, lse,
     loss, entropy) = workspace.split(sizes)
    _teacher_stats_kernel[(n_blocks, n_groups)](
        teacher, center if has_center else center_copy, colsum_part, center_copy, part_a, part_b, part_c,
        n_rows_t, n_cols, teacher.stride(0), 1.0 / teacher_temp, n_blocks, TEACHER_ROWS_PER_PROGRAM,
        HAS_CENTER=has_center, IS_PROBS=teacher_is_probs, BLOCK_R=TEACHER_BLOCK_R, BLOCK_T=cfg["block_t"],
        num_warps=TEACHER_NUM_WARPS,
    )
    _dino_loss_fwd_kernel[(batch, n_chunks)](
        student_logits, teacher, center_copy, part_max, part_sumexp, part_wx, t_shift, t_scale, t_entropy,
        part_a, part_b, part_c, colsum_part, colsum,
        batch, ncrops, n_cols, n_chunks, n_blocks, n_groups, student_logits.stride(0), teacher.stride(0),
        1.0 / student_temp, 1.0 / teacher_temp,
        HAS_CENTER=has_center, IS_PROBS=teacher_is_probs, EVEN_K=cfg["even_k"], BLOCK_K=cfg["block_k"],
        BLOCK_P=cfg["block_blocks"], num_warps=cfg["num_warps"],
    )
    _dino_loss_finish_kernel[(1,)](
        part_max, part_sumexp, part_wx, t_scale, t_entropy, lse, loss, entropy,
        batch, n_rows_s, n_chunks, 1.0 / (batch * 2 * (ncrops - 1)),
        IS_PROBS=teacher_is_probs, BLOCK_R=FINISH_BLOCK_R, BLOCK_P=cfg["block_chunks"],
    )
    saved = (student_logits, teacher, center_copy, lse, t_shift, t_scale)
    return loss.view(()), colsum, entropy.view(()), saved


def _dino_loss_bwd(grad_loss, saved, student_temp, teacher_temp, ncrops, has_center, teacher_is_probs):
    """dS = grad_loss * d loss / d S, from the forward's saved tensors, in one launch."""
    student_logits, teacher, center_copy, lse, t_shift, t_scale = saved
    n_rows_s, n_cols = student_logits.shape
    batch = n_rows_s // ncrops
    device = student_logits.device
    cfg = _launch_settings(n_cols, MAX_BLOCK_K["cuda" if device.type == "cuda" else "cpu"], MAX_BLOCK_T)
    grad = _launch.empty((n_rows_s, n_cols), student_logits.dtype, device)
    _dino_loss_bwd_kernel[(batch, cfg["n_chunks"])](
        student_logits, teacher, center_copy, grad, lse, t_shift, t_scale, grad_loss,
        batch, ncrops, n_cols, student_logits.stride(0), teacher.stride(0), grad.stride(0),
        1.0 / student_temp, 1.0 / teacher_temp, 1.0 / (student_temp * batch * 2 * (ncrops - 1)),
        HAS_CENTER=has_center, IS_PROBS=teacher_is_probs, EVEN_K=cfg["even_k"], BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"],
    )
    return grad


def dino_loss_launch_bytes(batch: int, ncrops: int, n_cols: int, student_bytes: int, teacher_bytes: int) -> dict[str, int]:
    """Minimal HBM traffic of each launch of one forward and backward at these shapes, {kernel name: bytes}:
    every input read once and every output written once as the launchers above size them (fp32 workspaces);
    re-reads that the launch order keeps in L2 (the teacher rows and the center, read by every crop of an
    image) are not counted. S is (ncrops*batch, n_cols) of `student_bytes` per element, T (2*batch, n_cols)."""
    cfg = _launch_settings(n_cols, MAX_BLOCK_K["cuda"], MAX_BLOCK_T)
    s, t, f32 = ncrops * batch * n_cols * student_bytes, 2 * batch * n_cols * teacher_bytes, 4
    n_groups = triton.cdiv(2 * batch, TEACHER_ROWS_PER_PROGRAM)
    colsum_parts = n_groups * n_cols * f32
    chunk_partials = 3 * ncrops * batch * cfg["n_chunks"] * f32
    return {
        # read T, C; write per-group column sums, the C snapshot, 3 partials per (teacher row, column block)
        _teacher_stats_kernel.fn.__name__: t + 2 * n_cols * f32 + colsum_parts + 3 * 2 * batch * cfg["n_blocks"] * f32,
        # read S, T, C, the column sum parts; write the column sums, 3 partials per (row, chunk)
        _dino_loss_fwd_kernel.fn.__name__: s + t + n_cols * f32 + colsum_parts + n_cols * f32 + chunk_partials,
        # read the partials; write the per-row LSE
        _dino_loss_finish_kernel.fn.__name__: chunk_partials + ncrops * batch * f32,
        # read S, T, C, LSE; write dS
        _dino_loss_bwd_kernel.fn.__name__: 2 * s + t + n_cols * f32,
    }


class DINOLossFunction(torch.autograd.Function):
    """Fused DINO loss; forward saves per-row statistics, backward computes dS from them in one pass."""

    @staticmethod
    def forward(ctx, student_logits, teacher, center, student_temp, teacher_temp, ncrops, teacher_is_probs):
        loss, colsum, entropy, saved = _dino_loss_fwd(
            student_logits, teacher, center, student_temp, teacher_temp, ncrops, teacher_is_probs
        )
        ctx.mark_non_differentiable(colsum, entropy)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for colsum and entropy in backward
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(*saved)
            ctx.args = (student_temp, teacher_temp, ncrops, center is not None and not teacher_is_probs,
                        teacher_is_probs)
        return loss, colsum, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_colsum, _grad_entropy):
        if grad_loss is None:  # grads are not materialized: the loss did not reach the output
            return None, None, None, None, None, None, None
        grad = _dino_loss_bwd(grad_loss, ctx.saved_tensors, *ctx.args)
        return grad, None, None, None, None, None, None


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
    chosen = _launch.select_impl("dino_loss", impl, student_logits.device, "torch", _dino_loss_fwd_kernel)
    if chosen == "torch":
        return dino_loss_ref(student_logits, teacher, center, student_temp, teacher_temp, ncrops,
                             teacher_is_probs=teacher_is_probs, return_entropy=return_entropy)
    loss, colsum, entropy = DINOLossFunction.apply(
        student_logits, teacher.detach(), None if center is None else center.detach(), student_temp, teacher_temp,
        ncrops, teacher_is_probs,
    )
    return (loss, colsum, entropy) if return_entropy else (loss, colsum)
