"""Fused DINO loss: teacher centering + sharpening, multi-crop cross-entropy, its gradient, and the center statistics.

Math (DINO, Caron et al. 2021, Sec. 3.1, Eq. 1 and Eq. 4; `kernels/reference.py: dino_loss_ref` is the spec).
Shapes: student S (V*B, K) crop-major (row v*B + b is crop v of image b), teacher T (2*B, K), center C (K,).
- Teacher (Sec. 3.1 "Avoiding collapse", centering and sharpening): q_i = softmax((T_i - C) / tau_t) for teacher
  row i = iq*B + b (global crop iq of image b); or q_i = T_i as given when `teacher_is_probs` (Sinkhorn-Knopp).
- Student crop v of image b is paired with every teacher crop iq != v (Eq. 4 skips the same view). With x = S_row /
  tau_s and w = sum_{iq != v} q_{iq*B+b} (one or two teacher rows), the row's summed loss terms are
      sum_{iq != v} -q_iq . log_softmax(x) = (sum_k w_k) * LSE(x) - sum_k w_k x_k,
  so log_softmax is never built per pair. loss = sum over rows / (B * n_terms) with n_terms = 2*(V-1) pairs.
- The pairing term is linear in x, so per image it is sum_iq q_iq . A_iq with A_iq = sum_{v != iq} x_v: each crop
  only adds its x into two running sums, and q needs only the teacher row's own chunk statistics while it is built:
  with z = (T - C) / tau_t, chunk max m_c, row max M and row sum L = sum_c e^(m_c - M) l_c,
      q . A = (1 / L) sum_c e^(m_c - M) P_c,   P_c = sum_{k in c} e^(z_k - m_c) A_k,
  so S and T are read once, in one launch, before the row statistics exist.
- Gradient, computed in backward from S, the saved per-row LSE and grad_output g:
      d (g * loss) / d S_row = g * ((sum_k w_k) * softmax(x) - w) / (tau_s * B * n_terms),
  in fp32 and only then cast to the storage dtype, so that a loss scale in g (fp16 GradScaler, 2^16) lifts small
  entries into range before the cast instead of after it (stored unscaled, they flush to zero in fp16).
  sum_k w_k is the number of paired teacher crops (1 for v < 2, else 2) when q is a softmax; for given probabilities
  it is the sum of the paired rows, so the result matches the official formula even for unnormalised rows.
- Teacher entropy (logged, not differentiated): H_i = -sum_k q_ik log q_ik = log L - (sum_k e^(z_k - M) (z_k - M)) / L
  for z = (T_i - C) / tau_t with row max M and L = sum_k e^(z_k - M) (no large terms cancel).

Forward, two launches and one small sum; fp32 math, loads in the storage dtype:
1. `_dino_loss_fwd_kernel`, one program per (group of IMAGES_PER_PROGRAM images, chunk of BLOCK_K columns): per
   image the chunk of its two teacher rows (max, sum of exp, entropy term and P_c against the crops' running sums,
   the teacher statistics folded in) and, crop by crop, the student chunk's max and sum of exp; the next crop's
   chunk is loaded before the current one's reductions, so a load is in flight across every barrier. The group's
   teacher column sums (center update) go to one row of partials. Reads S, T and C once.
2. `_dino_loss_combine_kernel`, B + K / BLOCK_C programs in parallel: per image, the row LSEs, the teacher shift,
   scale and entropy, and the image's share of the loss and of the mean entropy; the others add up the column sum
   partials. A (2, B) sum then gives the loss and the entropy.
Backward, one launch: `_dino_loss_bwd_kernel` on an (image, chunk) grid reads S, T and C once and writes dS once,
also with the next crop's load in flight. Saved for backward: S and T (inputs), C's snapshot (K,), per-row LSE
(V*B,) and per-teacher-row softmax shift and scale (2B,) each: no (V*B, K) tensor beyond the input itself.
"""
import functools

import torch
import triton
import triton.language as tl

from . import _launch
from .reference import dino_loss_ref

# Column-chunk caps of the student kernels (one chunk per program, so also the grid's second extent). On the GPU
# 2048 columns with 8 warps keep the two teacher rows, the two running sums and two crops' chunks in registers
# without spills (benchmarks/aot_report.py) and give 32 chunks at K = 65536. The interpreter runs one numpy op per
# block, so there bigger blocks mean fewer Python steps.
MAX_BLOCK_K = {"cuda": 2048, "cpu": 16384}
# Forward programs in flight the image grouping aims at (about four per SM on an H100/H200): at B = 64 and
# K = 65536 that is 4 images per program; at most MAX_IMAGES_PER_PROGRAM, each group writes one row of column sums.
TARGET_PROGRAMS = 512
MAX_IMAGES_PER_PROGRAM = 8
# Columns per program of the combine kernel's column-sum part.
COMBINE_BLOCK_C = 1024


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
def _teacher_chunk(t, center, mask, inv_teacher_temp, HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr):
    """Chunk statistics of one fp32 teacher row chunk `t`: (e, m, l, c) with e the chunk's unnormalised weights,
    q = e * e^(m - M) / L once the row max M and sum L are known. Logits: z = (t - C) / tau_t, m = max z,
    e = e^(z - m), l = sum e, c = sum e (z - m). Probabilities: e = t, m = 0, l = sum q, c = -sum q log q.
    Lanes off `mask` weigh 0."""
    if IS_PROBS:
        # torch.special.entr: 0 at q = 0, -inf below, NaN stays NaN.
        not_positive = tl.where(t == 0, 0.0, tl.where(t < 0, float("-inf"), t))
        neg_q_log_q = tl.where(t > 0, -t * tl.log(tl.where(t > 0, t, 1.0)), not_positive)
        return t, 0.0, tl.sum(t, axis=0), tl.sum(neg_q_log_q, axis=0)
    if HAS_CENTER:
        t = t - center
    z = t * inv_teacher_temp
    m = tl.max(tl.where(mask, z, float("-inf")), axis=0)
    e = tl.where(mask, tl.exp(z - m), 0.0)
    return e, m, tl.sum(e, axis=0), tl.sum(tl.where(mask, e * (z - m), 0.0), axis=0)


@triton.jit
def _store_teacher_chunk(t, acc, row, chunk, n_chunks, center, mask, t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr,
                         inv_teacher_temp, HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr):
    """Stores teacher row `row`'s chunk partials: m, l, c of `_teacher_chunk` and P = sum e * acc."""
    e, m, l, c = _teacher_chunk(t, center, mask, inv_teacher_temp, HAS_CENTER, IS_PROBS)
    part = tl.cast(row, tl.int64) * n_chunks + chunk
    tl.store(t_max_ptr + part, m)
    tl.store(t_sum_ptr + part, l)
    tl.store(t_ent_ptr + part, c)
    tl.store(t_dot_ptr + part, tl.sum(e * acc, axis=0))


@triton.jit
def _dino_loss_fwd_kernel(
    s_ptr, t_ptr, c_ptr, c_copy_ptr, s_max_ptr, s_sumexp_ptr, t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr,
    colsum_part_ptr, n_batch, n_crops, n_cols, n_chunks, images_per_program, stride_s_row, stride_t_row,
    inv_student_temp, inv_teacher_temp,
    HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Chunk partials of the images of group program_id(0), over columns program_id(1) * BLOCK_K + [0, BLOCK_K).

    s_ptr: S (V*B, n_cols), rows `stride_s_row` apart. t_ptr: T (2B, n_cols) logits or probabilities (IS_PROBS).
    c_ptr: C (n_cols,) (unused without HAS_CENTER); c_copy_ptr: its fp32 snapshot out (for backward, written by the
    group-0 programs). s_max/s_sumexp_ptr: (V*B, n_chunks) fp32 out, max x and sum exp(x - max x) over the chunk,
    x = S / tau_s. t_max/t_sum/t_ent/t_dot_ptr: (2B, n_chunks) fp32 out, m, l, c of `_teacher_chunk` and
    P = sum e * A with A = sum over the crops paired with the row of x. colsum_part_ptr: (n_groups, n_cols) fp32
    out, the sum of the group's teacher rows.
    """
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < n_cols
    center = 0.0
    if HAS_CENTER:
        center = _load(c_ptr + cols, mask, 0.0, EVEN_K).to(tl.float32)
        if group == 0:
            _store(c_copy_ptr + cols, center, mask, EVEN_K)
    colsum = tl.zeros([BLOCK_K], dtype=tl.float32)
    first = group * images_per_program
    for b in range(first, tl.minimum(first + images_per_program, n_batch)):
        t0 = _load(t_ptr + tl.cast(b, tl.int64) * stride_t_row + cols, mask, 0.0, EVEN_K).to(tl.float32)
        t1 = _load(t_ptr + tl.cast(n_batch + b, tl.int64) * stride_t_row + cols, mask, 0.0, EVEN_K).to(tl.float32)
        colsum += t0 + t1
        # A_iq = sum of x over the crops v != iq (masked lanes 0, so that 0 * -inf never appears).
        acc0 = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_K], dtype=tl.float32)
        x = _load(s_ptr + tl.cast(b, tl.int64) * stride_s_row + cols, mask, float("-inf"), EVEN_K)
        for v in range(0, n_crops):
            # The next crop's chunk (the last one re-reads itself, from L2) is issued before this one's reductions.
            next_row = tl.minimum(v + 1, n_crops - 1) * n_batch + b
            x_next = _load(s_ptr + tl.cast(next_row, tl.int64) * stride_s_row + cols, mask, float("-inf"), EVEN_K)
            xs = x.to(tl.float32) * inv_student_temp
            x_max = tl.max(xs, axis=0)
            part = tl.cast(v * n_batch + b, tl.int64) * n_chunks + chunk
            tl.store(s_max_ptr + part, x_max)
            tl.store(s_sumexp_ptr + part, tl.sum(tl.exp(xs - x_max), axis=0))
            x_zero = xs if EVEN_K else tl.where(mask, xs, 0.0)
            acc0 += tl.where(v != 0, x_zero, 0.0)
            acc1 += tl.where(v != 1, x_zero, 0.0)
            x = x_next
        _store_teacher_chunk(t0, acc0, b, chunk, n_chunks, center, mask, t_max_ptr, t_sum_ptr, t_ent_ptr,
                             t_dot_ptr, inv_teacher_temp, HAS_CENTER, IS_PROBS)
        _store_teacher_chunk(t1, acc1, n_batch + b, chunk, n_chunks, center, mask, t_max_ptr, t_sum_ptr,
                             t_ent_ptr, t_dot_ptr, inv_teacher_temp, HAS_CENTER, IS_PROBS)
    _store(colsum_part_ptr + tl.cast(group, tl.int64) * n_cols + cols, colsum, mask, EVEN_K)


@triton.jit
def _combine_teacher_row(t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr, row, n_chunks, IS_PROBS: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """(shift, scale, entropy, q . A) of teacher row `row` from its chunk partials: q = exp(z - shift) / scale for
    logits; for probabilities shift = 0 and scale = sum q (unused for q itself)."""
    offs = tl.arange(0, BLOCK_P)
    mask = offs < n_chunks
    base = tl.cast(row, tl.int64) * n_chunks
    if IS_PROBS:
        row_sum = tl.sum(tl.load(t_sum_ptr + base + offs, mask=mask, other=0.0), axis=0)
        entropy = tl.sum(tl.load(t_ent_ptr + base + offs, mask=mask, other=0.0), axis=0)
        return 0.0, row_sum, entropy, tl.sum(tl.load(t_dot_ptr + base + offs, mask=mask, other=0.0), axis=0)
    chunk_max = tl.load(t_max_ptr + base + offs, mask=mask, other=float("-inf"))
    row_max = tl.max(chunk_max, axis=0)
    rescale = tl.exp(chunk_max - row_max)  # 0 for the padding chunks
    chunk_sum = tl.load(t_sum_ptr + base + offs, mask=mask, other=0.0)
    row_sum = tl.sum(chunk_sum * rescale, axis=0)
    # sum_k e^(z_k - M) (z_k - M), re-based from each chunk's max: every term is <= 0, so nothing cancels.
    chunk_ent = tl.load(t_ent_ptr + base + offs, mask=mask, other=0.0)
    chunk_shift = tl.where(mask, chunk_max - row_max, 0.0)
    entropy = tl.log(row_sum) - tl.sum(rescale * (chunk_ent + chunk_shift * chunk_sum), axis=0) / row_sum
    dot = tl.sum(rescale * tl.load(t_dot_ptr + base + offs, mask=mask, other=0.0), axis=0) / row_sum
    return row_max, row_sum, entropy, dot


@triton.jit
def _dino_loss_combine_kernel(
    s_max_ptr, s_sumexp_ptr, t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr, colsum_part_ptr, colsum_ptr, lse_ptr,
    t_shift_ptr, t_scale_ptr, image_terms_ptr, n_batch, n_crops, n_cols, n_chunks, n_groups, loss_scale,
    IS_PROBS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Programs 0 .. B-1: image b's per-row LSE (lse_ptr, (V*B,) fp32 out), its teacher rows' shift and scale
    (t_shift/t_scale_ptr, (2B,) out) and its terms (image_terms_ptr, (2, B) out): loss_scale * (sum over its rows of
    (sum w) * LSE - q . A) and the mean entropy's share (entropy of both rows / 2B). Programs B ..: the column sums
    (colsum_ptr, (n_cols,) out) of BLOCK_C columns each, from the (n_groups, n_cols) partials."""
    pid = tl.program_id(0)
    if pid >= n_batch:
        cols = (pid - n_batch) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < n_cols
        colsum = tl.zeros([BLOCK_C], dtype=tl.float32)
        for group in range(0, n_groups):
            colsum += tl.load(colsum_part_ptr + tl.cast(group, tl.int64) * n_cols + cols, mask=col_mask, other=0.0)
        tl.store(colsum_ptr + cols, colsum, mask=col_mask)
    else:
        b = pid
        shift0, scale0, entropy0, dot0 = _combine_teacher_row(t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr, b,
                                                              n_chunks, IS_PROBS, BLOCK_P)
        shift1, scale1, entropy1, dot1 = _combine_teacher_row(t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr,
                                                              n_batch + b, n_chunks, IS_PROBS, BLOCK_P)
        tl.store(t_shift_ptr + b, shift0)
        tl.store(t_shift_ptr + n_batch + b, shift1)
        tl.store(t_scale_ptr + b, scale0)
        tl.store(t_scale_ptr + n_batch + b, scale1)
        crops = tl.arange(0, BLOCK_V)
        chunks = tl.arange(0, BLOCK_P)
        crop_mask = crops < n_crops
        mask = crop_mask[:, None] & (chunks < n_chunks)[None, :]
        rows = crops * n_batch + b
        offs = rows[:, None].to(tl.int64) * n_chunks + chunks[None, :]
        part_max = tl.load(s_max_ptr + offs, mask=mask, other=float("-inf"))
        row_max = tl.where(crop_mask, tl.max(part_max, axis=1), 0.0)
        sumexp = tl.sum(tl.load(s_sumexp_ptr + offs, mask=mask, other=0.0) * tl.exp(part_max - row_max[:, None]),
                        axis=1)
        lse = row_max + tl.log(tl.where(crop_mask, sumexp, 1.0))  # padding crops: no log(0)
        tl.store(lse_ptr + rows, lse, mask=crop_mask)
        if IS_PROBS:
            w_total = tl.where(crops != 0, scale0, 0.0) + tl.where(crops != 1, scale1, 0.0)
        else:
            w_total = tl.where(crops < 2, 1.0, 2.0)
        loss = tl.sum(tl.where(crop_mask, w_total * lse, 0.0), axis=0) - dot0 - dot1
        tl.store(image_terms_ptr + b, loss * loss_scale)
        tl.store(image_terms_ptr + n_batch + b, (entropy0 + entropy1) / (2 * n_batch))


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
def _dino_loss_bwd_kernel(
    s_ptr, t_ptr, c_ptr, grad_ptr, lse_ptr, t_shift_ptr, t_scale_ptr, grad_loss_ptr,
    n_batch, n_crops, n_cols, stride_s_row, stride_t_row, stride_grad_row,
    inv_student_temp, inv_teacher_temp, grad_scale,
    HAS_CENTER: tl.constexpr, IS_PROBS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dS for every crop of image b = program_id(0) over one chunk of BLOCK_K columns.

    grad_ptr: dS out, like S, rows `stride_grad_row` apart. lse_ptr: (V*B,) per-row LSE of the forward.
    t_shift/scale_ptr: (2B,) teacher softmax statistics of the forward. grad_loss_ptr: the 0-d grad_output, read on
    device (no host sync) and applied in fp32 with grad_scale = 1 / (tau_s * B * n_terms) before the cast to dS's
    dtype. c_ptr: the forward's fp32 center snapshot. Other arguments as in `_dino_loss_fwd_kernel`.
    """
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    g = tl.load(grad_loss_ptr).to(tl.float32) * grad_scale
    shift0, scale0 = tl.load(t_shift_ptr + b), tl.load(t_scale_ptr + b)
    shift1, scale1 = tl.load(t_shift_ptr + n_batch + b), tl.load(t_scale_ptr + n_batch + b)
    cols = chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < n_cols
    q0 = _teacher_probs(t_ptr + tl.cast(b, tl.int64) * stride_t_row, c_ptr, cols, mask, shift0, scale0,
                        inv_teacher_temp, HAS_CENTER, IS_PROBS, EVEN_K)
    q1 = _teacher_probs(t_ptr + tl.cast(n_batch + b, tl.int64) * stride_t_row, c_ptr, cols, mask, shift1, scale1,
                        inv_teacher_temp, HAS_CENTER, IS_PROBS, EVEN_K)
    x = _load(s_ptr + tl.cast(b, tl.int64) * stride_s_row + cols, mask, 0.0, EVEN_K)
    lse = tl.load(lse_ptr + b)
    for v in range(0, n_crops):
        row = v * n_batch + b
        next_row = tl.minimum(v + 1, n_crops - 1) * n_batch + b  # loaded before this crop's math, as in forward
        x_next = _load(s_ptr + tl.cast(next_row, tl.int64) * stride_s_row + cols, mask, 0.0, EVEN_K)
        lse_next = tl.load(lse_ptr + next_row)
        w = tl.where(v != 0, q0, 0.0) + tl.where(v != 1, q1, 0.0)
        if IS_PROBS:
            w_total = tl.where(v != 0, scale0, 0.0) + tl.where(v != 1, scale1, 0.0)
        else:
            w_total = tl.where(v < 2, 1.0, 2.0)
        softmax = tl.exp(x.to(tl.float32) * inv_student_temp - lse)
        grad = ((w_total * softmax - w) * g).to(grad_ptr.dtype.element_ty)
        _store(grad_ptr + tl.cast(row, tl.int64) * stride_grad_row + cols, grad, mask, EVEN_K)
        x, lse = x_next, lse_next


@functools.lru_cache(maxsize=64)
def _launch_settings(batch: int, n_cols: int, max_block_k: int, target_programs: int, max_images: int,
                     combine_block_c: int) -> dict:
    """Block sizes, grid extents and warps for B = batch and K = n_cols, computed once per shape (the host path
    stays short)."""
    block_k, num_warps = _launch.row_settings(n_cols, max_block_k)
    n_chunks = triton.cdiv(n_cols, block_k)
    images = max(1, min(max_images, batch * n_chunks // target_programs))
    return dict(block_k=block_k, num_warps=num_warps, n_chunks=n_chunks, even_k=n_cols % block_k == 0,
                block_chunks=triton.next_power_of_2(n_chunks), images_per_program=images,
                n_groups=triton.cdiv(batch, images), block_c=combine_block_c,
                n_col_blocks=triton.cdiv(n_cols, combine_block_c))


def _settings(batch: int, n_cols: int, device_type: str) -> dict:
    """`_launch_settings` with this module's caps (read per call: the tests shrink them)."""
    return _launch_settings(batch, n_cols, MAX_BLOCK_K["cuda" if device_type == "cuda" else "cpu"], TARGET_PROGRAMS,
                            MAX_IMAGES_PER_PROGRAM, COMBINE_BLOCK_C)


def _dino_loss_fwd(student_logits, teacher, center, student_temp, teacher_temp, ncrops, teacher_is_probs):
    """Validate, allocate and launch the forward kernels. Returns (loss, colsum, entropy, saved), where saved is
    what `_dino_loss_bwd` needs besides the inputs: (center snapshot, lse, t_shift, t_scale)."""
    batch, n_cols = _launch.check_dino_loss_args(student_logits, teacher, center, student_temp, teacher_temp, ncrops)
    student_logits = _launch.last_dim_contiguous(student_logits)
    teacher = _launch.last_dim_contiguous(teacher)
    device = student_logits.device
    cfg = _settings(batch, n_cols, device.type)
    n_rows_s, n_rows_t, n_chunks, n_groups = ncrops * batch, 2 * batch, cfg["n_chunks"], cfg["n_groups"]
    has_center = center is not None and not teacher_is_probs
    center = center.reshape(-1).contiguous() if has_center else None

    # One fp32 workspace for every small buffer: one allocation instead of fourteen.
    sizes = [n_cols, n_groups * n_cols, n_cols, *[n_rows_s * n_chunks] * 2, *[n_rows_t * n_chunks] * 4,
             n_rows_s, n_rows_t, n_rows_t, 2 * batch]
    workspace = _launch.empty((sum(sizes),), torch.float32, device)
    (colsum, colsum_part, center_copy, s_max, s_sumexp, t_max, t_sum, t_ent, t_dot, lse, t_shift, t_scale,
     image_terms) = workspace.split(sizes)
    _dino_loss_fwd_kernel[(n_groups, n_chunks)](
        student_logits, teacher, center if has_center else center_copy, center_copy, s_max, s_sumexp,
        t_max, t_sum, t_ent, t_dot, colsum_part,
        batch, ncrops, n_cols, n_chunks, cfg["images_per_program"], student_logits.stride(0), teacher.stride(0),
        1.0 / student_temp, 1.0 / teacher_temp,
        HAS_CENTER=has_center, IS_PROBS=teacher_is_probs, EVEN_K=cfg["even_k"], BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"],
    )
    _dino_loss_combine_kernel[(batch + cfg["n_col_blocks"],)](
        s_max, s_sumexp, t_max, t_sum, t_ent, t_dot, colsum_part, colsum, lse, t_shift, t_scale, image_terms,
        batch, ncrops, n_cols, n_chunks, n_groups, 1.0 / (batch * 2 * (ncrops - 1)),
        IS_PROBS=teacher_is_probs, BLOCK_V=triton.next_power_of_2(ncrops), BLOCK_P=cfg["block_chunks"],
        BLOCK_C=cfg["block_c"],
    )
    loss, entropy = image_terms.view(2, batch).sum(dim=1).unbind()  # a parallel reduction of 2B numbers
    saved = (student_logits, teacher, center_copy, lse, t_shift, t_scale)
    return loss, colsum, entropy, saved


def _dino_loss_bwd(grad_loss, saved, student_temp, teacher_temp, ncrops, has_center, teacher_is_probs):
    """dS = grad_loss * d loss / d S, from the forward's saved tensors, in one launch."""
    student_logits, teacher, center_copy, lse, t_shift, t_scale = saved
    n_rows_s, n_cols = student_logits.shape
    batch = n_rows_s // ncrops
    cfg = _settings(batch, n_cols, student_logits.device.type)
    grad = _launch.empty((n_rows_s, n_cols), student_logits.dtype, student_logits.device)
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
    image; the last crop's chunk, which the prefetch reads twice) are not counted. S is (ncrops*batch, n_cols) of
    `student_bytes` per element, T (2*batch, n_cols)."""
    cfg = _settings(batch, n_cols, "cuda")
    s, t, f32 = ncrops * batch * n_cols * student_bytes, 2 * batch * n_cols * teacher_bytes, 4
    colsum_parts = cfg["n_groups"] * n_cols * f32
    student_partials = 2 * ncrops * batch * cfg["n_chunks"] * f32
    teacher_partials = 4 * 2 * batch * cfg["n_chunks"] * f32
    return {
        # read S, T, C; write the C snapshot, per-group column sums, 2 partials per (row, chunk), 4 per teacher row
        _dino_loss_fwd_kernel.fn.__name__: s + t + 2 * n_cols * f32 + colsum_parts + student_partials
        + teacher_partials,
        # read the partials; write the column sums, LSE, teacher shift and scale, 2 terms per image
        _dino_loss_combine_kernel.fn.__name__: colsum_parts + student_partials + teacher_partials + n_cols * f32
        + (ncrops * batch + 6 * batch) * f32,
        # read S, T, C, LSE; write dS
        _dino_loss_bwd_kernel.fn.__name__: 2 * s + t + n_cols * f32 + ncrops * batch * f32,
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
    for name, value in (("student_logits", student_logits), ("teacher", teacher)):
        _launch.check_is_tensor(name, value)
    chosen = _launch.select_impl("dino_loss", impl, student_logits.device, "torch", _dino_loss_fwd_kernel)
    if chosen == "torch":
        return dino_loss_ref(student_logits, teacher, center, student_temp, teacher_temp, ncrops,
                             teacher_is_probs=teacher_is_probs, return_entropy=return_entropy)
    loss, colsum, entropy = DINOLossFunction.apply(
        student_logits, teacher.detach(), None if center is None else center.detach(), student_temp, teacher_temp,
        ncrops, teacher_is_probs,
    )
    return (loss, colsum, entropy) if return_entropy else (loss, colsum)
