"""Fused head + loss: the weight-normalised last layer and the DINO / iBOT cross-entropy in Triton, no logits in memory.

Math (the spec is `kernels/reference.py: fused_head_loss_ref`). Student features H_s (V*N, D), crop-major, teacher
features H_t (P*N, D), last-layer weights v (K, D) and optional per-prototype gains g (K,) (DINOv2 trains
`weight_g`; DINO's `norm_last_layer=True` fixes it at 1): logits S = H_s W_s^T, T = H_t W_t^T with
W_k = g_k v_k / ||v_k||. Teacher probabilities q = softmax((T - C) / tau_t) (centering; Sinkhorn-Knopp is the same
softmax with the center `sinkhorn_center` returns). Pairings, with per-row weights r:
- "crops" (DINO, as `dino_loss`): V = ncrops, N = B images, P = 2 global teacher crops; student crop v of image n
  is paired with teacher crop p != v; r = 1 / (B * 2 (V - 1)).
- "rows" (iBOT): V = P = 1, student row i with teacher row i, r = row_weights (e.g. masks_weight / n_images).
loss = sum_rows r * sum_{p paired} -q_p . log_softmax(S_row / tau_s) = sum_rows r (w_tot LSE - sum_p q_p . x),
x = S_row / tau_s, w_tot = number of paired teacher rows. The pairing term is linear in x, so per image it is
sum_p q_p . A_p with A_p = sum_{v paired with p} r x_v, and q_p . A_p = (1/L_p) sum_k e^(z_pk - M_p) A_pk is built
online over the prototype chunks (running max, rescaled sums, as FlashAttention's softmax), so one sweep of the
logits gives the teacher's row max, sum and entropy, the student's LSE and the pairing term together.

Kernels (fp32 accumulation; tl.dot on the tensor cores in the features' dtype, v cast to it as it is loaded, the
column scale g / ||v|| applied to the fp32 product):
1. `_fused_head_loss_fwd_kernel`, one program per (BLOCK_M images, split of the K chunks): per chunk of BLOCK_N
   prototypes the P teacher tiles, then for each crop the student tile; writes per (row, split) partials that a few
   torch ops on (rows, splits) tensors combine. FLOPs: one sweep of teacher and student logits (2 (P + V) N K D).
2. `_fused_head_loss_bwd_kernel`, one program per (BLOCK_M images, BLOCK_N prototypes) of a chunk of prototypes:
   recomputes both tiles and writes dS = g r (w_tot softmax(x) - sum_p q_p) / tau_s for that chunk only
   ((V*N, chunk), at most BACKWARD_CHUNK_BYTES), from which cuBLAS forms the chunk's share of dH = dS W (added up
   in fp32, (V*N, D)) and its rows of U = dS^T H; then `_weight_norm_bwd_kernel` gives dg = U . v_hat and
   dv = (g / ||v||) (U - (U . v_hat) v_hat) for those prototypes in one pass. FLOPs: a second sweep of both logits
   plus the two gradient products.
Exact without a (rows, K) tensor this is the floor: 6 products of N_rows x K x D (3 forward-equivalent sweeps), where
the unfused path does 4 and keeps (rows, K) logits alive through backward. Teacher column sums (center update) are
linear in H_t: colsum = (g / ||v||) * (v_t @ sum_rows H_t), one matrix-vector product. Saved for backward: the
inputs, the scales (K,), the center snapshot (K,), per-row LSE and teacher max and sum.
"""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _launch
from .reference import fused_head_loss_ref

PAIRINGS = ("crops", "rows")
# Tiles: BLOCK_M images x BLOCK_N prototypes, D walked BLOCK_D at a time. "crops" keeps 2 teacher tiles, 2 running
# sums and a student tile live (BLOCK_M = 16, tl.dot's minimum); "rows" keeps one of each, so it takes 64 rows.
BLOCKS = {"crops": dict(BLOCK_M=16, BLOCK_N=128, BLOCK_D=64, num_warps=8),
          "rows": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=8)}
# The Sinkhorn steps keep one tile and two vectors: 4 warps (with 8 the row step spills on sm_80), D walked 32 at a
# time and one stage: the one setting tried (D 16/32/64, 1-3 stages) with no spill on sm_90 and sm_80 under both
# triton 3.6 and 3.8 (benchmarks/aot_report.py --only sinkhorn); D=16 with 2 stages is the other; the GPU check
# times them.
SINKHORN_WARPS = 4
SINKHORN_BLOCK_D = 32
SINKHORN_STAGES = 1
# Forward programs the K splits aim at (about four per SM on an H100/H200).
TARGET_PROGRAMS = 512
# Most bytes of dS (V*N, chunk) alive at once in backward; prototypes are processed in chunks that fit.
BACKWARD_CHUNK_BYTES = 128 * 2**20
# Prototypes per program of the weight-norm backward (a BLOCK_K x D tile).
WEIGHT_NORM_BLOCK_K = 16


@triton.jit
def _logits_tile(h_ptr, rows, row_mask, stride_h, v_ptr, cols, col_mask, stride_v, scale, n_dim,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 logits H[rows] . v[cols] * scale[cols]: tl.dot in H's dtype (v cast to it), rows and
    columns off their masks read as 0."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, n_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < n_dim
        h = tl.load(h_ptr + rows[:, None] * stride_h + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * stride_v + d[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(v.to(h.dtype)), acc, input_precision=PRECISION)
    return acc * scale[None, :]


@triton.jit
def _teacher_z(ht_ptr, rows, row_mask, stride_ht, vt_ptr, cols, col_mask, stride_vt, t_scale, center, n_dim,
               inv_teacher_temp, HAS_CENTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """z = (T - C) / tau_t for one teacher tile."""
    t = _logits_tile(ht_ptr, rows, row_mask, stride_ht, vt_ptr, cols, col_mask, stride_vt, t_scale, n_dim,
                     BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    if HAS_CENTER:
        t = t - center[None, :]
    return t * inv_teacher_temp


@triton.jit
def _online_teacher(z, col_mask, m, l, c, dot):
    """One chunk into a teacher row's running max m, sum l = sum e^(z - m), entropy term c = sum e^(z - m) (z - m)
    and pairing term dot (rescaled here, added to by the caller with the returned weights e = e^(z - m_new))."""
    new_m = tl.maximum(m, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
    alpha = tl.exp(m - new_m)  # 0 on the first chunk (m = -inf)
    shift = tl.where(m > float("-inf"), m - new_m, 0.0)
    e = tl.where(col_mask[None, :], tl.exp(z - new_m[:, None]), 0.0)
    c = alpha * (c + shift * l) + tl.sum(tl.where(col_mask[None, :], e * (z - new_m[:, None]), 0.0), axis=1)
    return e, new_m, alpha * l + tl.sum(e, axis=1), c, alpha * dot


@triton.jit
def _store_teacher(t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr, rows, row_mask, n_splits, split, m, l, c, dot):
    offs = rows * n_splits + split
    tl.store(t_max_ptr + offs, m, mask=row_mask)
    tl.store(t_sum_ptr + offs, l, mask=row_mask)
    tl.store(t_ent_ptr + offs, c, mask=row_mask)
    tl.store(t_dot_ptr + offs, dot, mask=row_mask)


# Row counts, splits and chunk offsets are not specialised (divisible by 16, equal to 1): one compile serves them all
# (the GPU check's tests run many sizes); strides, K and D keep theirs (the loads at the step's shapes).
@triton.jit(do_not_specialize=["n_images", "n_crops", "n_splits", "chunks_per_split"])
def _fused_head_loss_fwd_kernel(
    hs_ptr, vs_ptr, ht_ptr, vt_ptr, s_scale_ptr, t_scale_ptr, c_ptr, rw_ptr,
    s_max_ptr, s_sum_ptr, t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr,
    n_images, n_crops, n_cols, n_dim, n_splits, chunks_per_split, stride_hs, stride_vs, stride_ht, stride_vt,
    inv_student_temp, inv_teacher_temp,
    CROPS: tl.constexpr, HAS_CENTER: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Partials of images program_id(0) * BLOCK_M + [0, BLOCK_M) over the K chunks of split program_id(1).

    hs_ptr (V*N, D), ht_ptr (P*N, D) features (rows `stride_h*` apart); vs/vt_ptr (K, D) last-layer weights;
    s/t_scale_ptr (K,) fp32 g / ||v||; c_ptr (K,) fp32 center (unused without HAS_CENTER); rw_ptr (V*N,) fp32 row
    weights. CROPS: P = 2 teacher rows per image, crop v paired with p != v; else V = P = 1. Out, (rows, n_splits)
    fp32 each: s_max/s_sum_ptr the student's running max and sum of exp of x = S / tau_s; t_max/t_sum/t_ent/t_dot_ptr
    the teacher's max, sum, entropy term and pairing term sum_k e^(z - max) A_k (see `_online_teacher`).
    """
    split = tl.program_id(1)
    images = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = images < n_images
    images = images.to(tl.int64)
    crops = tl.arange(0, BLOCK_V)
    s_max = tl.full([BLOCK_V, BLOCK_M], float("-inf"), dtype=tl.float32)
    s_sum = tl.zeros([BLOCK_V, BLOCK_M], dtype=tl.float32)
    m0 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    c0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    dot0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    m1, l1, c1, dot1 = m0, l0, c0, dot0
    first = split * chunks_per_split
    for chunk in range(first, tl.minimum(first + chunks_per_split, tl.cdiv(n_cols, BLOCK_N))):
        cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        t_scale = tl.load(t_scale_ptr + cols, mask=col_mask, other=0.0)
        s_scale = tl.load(s_scale_ptr + cols, mask=col_mask, other=0.0)
        center = t_scale  # unused without a center
        if HAS_CENTER:
            center = tl.load(c_ptr + cols, mask=col_mask, other=0.0)
        z0 = _teacher_z(ht_ptr, images, row_mask, stride_ht, vt_ptr, cols, col_mask, stride_vt, t_scale, center,
                        n_dim, inv_teacher_temp, HAS_CENTER, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        e0, m0, l0, c0, dot0 = _online_teacher(z0, col_mask, m0, l0, c0, dot0)
        acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if CROPS:
            z1 = _teacher_z(ht_ptr, n_images + images, row_mask, stride_ht, vt_ptr, cols, col_mask, stride_vt,
                            t_scale, center, n_dim, inv_teacher_temp, HAS_CENTER, BLOCK_M, BLOCK_N, BLOCK_D,
                            PRECISION)
            e1, m1, l1, c1, dot1 = _online_teacher(z1, col_mask, m1, l1, c1, dot1)
            acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for v in range(0, n_crops):
            rows = v * n_images + images
            x = _logits_tile(hs_ptr, rows, row_mask, stride_hs, vs_ptr, cols, col_mask, stride_vs, s_scale, n_dim,
                             BLOCK_M, BLOCK_N, BLOCK_D, PRECISION) * inv_student_temp
            x_max = tl.max(tl.where(col_mask[None, :], x, float("-inf")), axis=1)
            this = (crops == v)[:, None]
            old_max = tl.max(tl.where(this, s_max, float("-inf")), axis=0)
            old_sum = tl.sum(tl.where(this, s_sum, 0.0), axis=0)
            new_max = tl.maximum(old_max, x_max)
            new_sum = old_sum * tl.exp(old_max - new_max) + tl.sum(
                tl.where(col_mask[None, :], tl.exp(x - new_max[:, None]), 0.0), axis=1)
            s_max = tl.where(this, new_max[None, :], s_max)
            s_sum = tl.where(this, new_sum[None, :], s_sum)
            weight = tl.load(rw_ptr + rows, mask=row_mask, other=0.0)
            x = tl.where(col_mask[None, :], x, 0.0) * weight[:, None]  # masked lanes 0: no 0 * -inf
            if CROPS:
                acc0 += tl.where(v != 0, x, 0.0)
                acc1 += tl.where(v != 1, x, 0.0)
            else:
                acc0 += x
        dot0 += tl.sum(e0 * acc0, axis=1)
        if CROPS:
            dot1 += tl.sum(e1 * acc1, axis=1)
    _store_teacher(t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr, images, row_mask, n_splits, split, m0, l0, c0, dot0)
    if CROPS:
        _store_teacher(t_max_ptr, t_sum_ptr, t_ent_ptr, t_dot_ptr, n_images + images, row_mask, n_splits, split,
                       m1, l1, c1, dot1)
    offs = (crops[:, None] * n_images + images[None, :]) * n_splits + split
    mask = (crops < n_crops)[:, None] & row_mask[None, :]
    tl.store(s_max_ptr + offs, s_max, mask=mask)
    tl.store(s_sum_ptr + offs, s_sum, mask=mask)


@triton.jit
def _teacher_probs_tile(ht_ptr, rows, row_mask, stride_ht, vt_ptr, cols, col_mask, stride_vt, t_scale, center,
                        shift_ptr, sum_ptr, n_dim, inv_teacher_temp, HAS_CENTER: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    z = _teacher_z(ht_ptr, rows, row_mask, stride_ht, vt_ptr, cols, col_mask, stride_vt, t_scale, center, n_dim,
                   inv_teacher_temp, HAS_CENTER, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    shift = tl.load(shift_ptr + rows, mask=row_mask, other=0.0)
    total = tl.load(sum_ptr + rows, mask=row_mask, other=1.0)
    return tl.exp(z - shift[:, None]) / total[:, None]


@triton.jit(do_not_specialize=["n_images", "n_crops", "col_start", "col_stop"])
def _fused_head_loss_bwd_kernel(
    hs_ptr, vs_ptr, ht_ptr, vt_ptr, s_scale_ptr, t_scale_ptr, c_ptr, rw_ptr, lse_ptr, t_shift_ptr, t_sum_ptr,
    grad_loss_ptr, grad_ptr, n_images, n_crops, n_cols, col_start, col_stop, n_dim,
    stride_hs, stride_vs, stride_ht, stride_vt, stride_grad, inv_student_temp, inv_teacher_temp,
    CROPS: tl.constexpr, HAS_CENTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dS of images program_id(0) * BLOCK_M + [0, BLOCK_M), every crop, over prototypes col_start +
    program_id(1) * BLOCK_N + [0, BLOCK_N) (up to col_stop), into grad_ptr (V*N, col_stop - col_start) in its dtype
    after the fp32 math. lse_ptr (V*N,), t_shift/t_sum_ptr (P*N,): the forward's statistics; grad_loss_ptr: the 0-d
    grad_output, read on device. Others as in `_fused_head_loss_fwd_kernel`."""
    images = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = images < n_images
    images = images.to(tl.int64)
    cols = col_start + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < col_stop
    g = tl.load(grad_loss_ptr).to(tl.float32) * inv_student_temp
    t_scale = tl.load(t_scale_ptr + cols, mask=col_mask, other=0.0)
    s_scale = tl.load(s_scale_ptr + cols, mask=col_mask, other=0.0)
    center = t_scale  # unused without a center
    if HAS_CENTER:
        center = tl.load(c_ptr + cols, mask=col_mask, other=0.0)
    q0 = _teacher_probs_tile(ht_ptr, images, row_mask, stride_ht, vt_ptr, cols, col_mask, stride_vt, t_scale,
                             center, t_shift_ptr, t_sum_ptr, n_dim, inv_teacher_temp, HAS_CENTER, BLOCK_M, BLOCK_N,
                             BLOCK_D, PRECISION)
    q1 = q0
    if CROPS:
        q1 = _teacher_probs_tile(ht_ptr, n_images + images, row_mask, stride_ht, vt_ptr, cols, col_mask, stride_vt,
                                 t_scale, center, t_shift_ptr, t_sum_ptr, n_dim, inv_teacher_temp, HAS_CENTER,
                                 BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    for v in range(0, n_crops):
        rows = v * n_images + images
        x = _logits_tile(hs_ptr, rows, row_mask, stride_hs, vs_ptr, cols, col_mask, stride_vs, s_scale, n_dim,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        softmax = tl.exp(x * inv_student_temp - lse[:, None])
        if CROPS:
            w = tl.where(v != 0, q0, 0.0) + tl.where(v != 1, q1, 0.0)
            w_total = tl.where(v < 2, 1.0, 2.0)
        else:
            w = q0
            w_total = 1.0
        weight = tl.load(rw_ptr + rows, mask=row_mask, other=0.0) * g
        grad = (w_total * softmax - w) * weight[:, None]
        out = rows[:, None] * stride_grad + (cols - col_start)[None, :]
        tl.store(grad_ptr + out, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def _weight_norm_bwd_kernel(u_ptr, v_ptr, inv_norm_ptr, scale_ptr, grad_v_ptr, grad_g_ptr, n_rows, n_dim,
                            stride_u, stride_v, stride_grad_v, HAS_GAIN: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_D: tl.constexpr):
    """Backward of W = g v / ||v|| for prototypes program_id(0) * BLOCK_K + [0, BLOCK_K) given U = dL/dW / g (the
    gradient of the unit rows' product, (n_rows, n_dim) any float dtype): dg = U . v_hat into grad_g_ptr (fp32, with
    HAS_GAIN) and dv = (g / ||v||) (U - (U . v_hat) v_hat) into grad_v_ptr (its dtype)."""
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (d < n_dim)[None, :]
    u = tl.load(u_ptr + rows[:, None] * stride_u + d[None, :], mask=mask, other=0.0).to(tl.float32)
    v_hat = tl.load(v_ptr + rows[:, None] * stride_v + d[None, :], mask=mask, other=0.0).to(tl.float32) * tl.load(
        inv_norm_ptr + rows, mask=row_mask, other=0.0)[:, None]
    radial = tl.sum(u * v_hat, axis=1)
    grad = (u - radial[:, None] * v_hat) * tl.load(scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
    tl.store(grad_v_ptr + rows[:, None] * stride_grad_v + d[None, :], grad.to(grad_v_ptr.dtype.element_ty),
             mask=mask)
    if HAS_GAIN:
        tl.store(grad_g_ptr + rows, radial, mask=row_mask)


@functools.lru_cache(maxsize=64)
def _launch_settings(pairing: str, n_images: int, n_cols: int, target_programs: int) -> dict:
    """Tiles, K splits and grid for one shape, computed once (the host path stays short)."""
    blocks = BLOCKS[pairing]
    n_row_blocks = triton.cdiv(n_images, blocks["BLOCK_M"])
    n_chunks = triton.cdiv(n_cols, blocks["BLOCK_N"])
    splits = min(n_chunks, max(1, triton.cdiv(target_programs, n_row_blocks)))
    chunks_per_split = triton.cdiv(n_chunks, splits)
    return dict(blocks, n_row_blocks=n_row_blocks, n_chunks=n_chunks, chunks_per_split=chunks_per_split,
                n_splits=triton.cdiv(n_chunks, chunks_per_split))


def _kernel_blocks(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps")}


def _column_scale(weight_v: torch.Tensor, gain: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(g / ||v||, 1 / ||v||), fp32 (K,) each, with F.normalize's eps."""
    inv_norm = 1.0 / weight_v.float().norm(dim=1).clamp_min(1e-12)
    return (inv_norm if gain is None else gain.float().reshape(-1) * inv_norm), inv_norm


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 features: fp32 products, as torch's default


def fused_head_loss_launch_cost(pairing: str, n_images: int, n_crops: int, n_cols: int, dim: int,
                                feature_bytes: int, weight_bytes: int, chunk_cols: int | None = None
                                ) -> dict[str, tuple[int, int]]:
    """{kernel name: (HBM bytes, matrix-product FLOPs)} of one forward launch over all K prototypes and of one
    backward launch over `chunk_cols` of them (default all), as the launchers above size them. Bytes: features and
    weights read once per launch (the programs of one K range run side by side, so a weight chunk comes from HBM
    once and then from L2), the fp32 partials, dS written; FLOPs: 2 D per logit of every tile, teacher and student."""
    teachers = 2 if pairing == "crops" else 1
    cfg = _launch_settings(pairing, n_images, n_cols, TARGET_PROGRAMS)
    cols = n_cols if chunk_cols is None else chunk_cols
    features = (n_crops + teachers) * n_images * dim * feature_bytes
    partials = (2 * n_crops + 4 * teachers) * n_images * cfg["n_splits"] * 4
    return {
        _fused_head_loss_fwd_kernel.fn.__name__: (
            features + 2 * n_cols * (dim * weight_bytes + 4) + partials,
            2 * dim * n_cols * (n_crops + teachers) * n_images),
        _fused_head_loss_bwd_kernel.fn.__name__: (
            features + 2 * cols * (dim * weight_bytes + 4) + n_crops * n_images * cols * feature_bytes,
            2 * dim * cols * (n_crops + teachers) * n_images),
    }


def weight_norm_bwd_bytes(n_rows: int, dim: int, grad_bytes: int, weight_bytes: int) -> int:
    """HBM bytes of one `_weight_norm_bwd_kernel` launch over n_rows prototypes: read U and v, write dv; 3 fp32
    vectors."""
    return n_rows * (dim * (grad_bytes + 2 * weight_bytes) + 3 * 4)


class FusedHeadLossFunction(torch.autograd.Function):
    """Weight-normalised last layer + cross-entropy (see the module docstring)."""

    @staticmethod
    def forward(ctx, h_s, v_s, g_s, h_t, v_t, g_t, center, row_weights, student_temp, teacher_temp, pairing,
                n_crops, compute_dtype):
        device, n_cols = h_s.device, v_s.shape[0]
        crops = pairing == "crops"
        n_images = h_t.shape[0] // (2 if crops else 1)
        cfg = _launch_settings(pairing, n_images, n_cols, TARGET_PROGRAMS)
        hs, ht = h_s.detach().to(compute_dtype).contiguous(), h_t.detach().to(compute_dtype).contiguous()
        v_s, v_t = v_s.detach().contiguous(), v_t.detach().contiguous()
        # The small torch ops here in fp32 whatever the caller's autocast (the column sums feed the center).
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            s_scale, s_inv_norm = _column_scale(v_s, g_s)
            t_scale, _ = _column_scale(v_t, g_t)
            has_center = center is not None
            center = center.detach().reshape(-1).float().clone() if has_center else t_scale  # snapshot
            colsum = (v_t.float() @ ht.float().sum(dim=0)) * t_scale
        n_s, n_t, splits = h_s.shape[0], h_t.shape[0], cfg["n_splits"]
        sizes = [n_s * splits] * 2 + [n_t * splits] * 4
        s_max, s_sum, t_max, t_sum, t_ent, t_dot = (
            p.view(-1, splits) for p in _launch.empty((sum(sizes),), torch.float32, device).split(sizes))
        _fused_head_loss_fwd_kernel[(cfg["n_row_blocks"], splits)](
            hs, v_s, ht, v_t, s_scale, t_scale, center, row_weights, s_max, s_sum, t_max, t_sum, t_ent, t_dot,
            n_images, n_crops, n_cols, hs.shape[1], splits, cfg["chunks_per_split"], hs.stride(0), v_s.stride(0),
            ht.stride(0), v_t.stride(0), 1.0 / student_temp, 1.0 / teacher_temp,
            CROPS=crops, HAS_CENTER=has_center, BLOCK_V=triton.next_power_of_2(n_crops),
            PRECISION=_precision(compute_dtype), **_kernel_blocks(cfg),
        )
        with torch.no_grad(), torch.autocast(device.type, enabled=False):  # combine the splits (rows, splits)
            row_max = s_max.amax(dim=1, keepdim=True)
            lse = (row_max + torch.log((s_sum * torch.exp(s_max - row_max)).sum(dim=1, keepdim=True))).squeeze(1)
            t_row_max = t_max.amax(dim=1, keepdim=True)
            rescale = torch.exp(t_max - t_row_max)
            t_total = (t_sum * rescale).sum(dim=1)
            entropy_term = (rescale * (t_ent + (t_max - t_row_max) * t_sum)).sum(dim=1)
            entropy = (torch.log(t_total) - entropy_term / t_total).mean()
            weighted = row_weights * lse
            # sum_rows r w_tot LSE: local crops (rows from 2N on) pair with both teacher crops, so count twice.
            paired = weighted.sum() + (weighted[2 * n_images:].sum() if crops else 0.0)
            loss = paired - ((t_dot * rescale).sum(dim=1) / t_total).sum()
        ctx.mark_non_differentiable(colsum, entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hs, v_s, g_s, ht, v_t, s_scale, s_inv_norm, t_scale, center, row_weights, lse,
                              t_row_max.squeeze(1), t_total)
        ctx.args = (student_temp, teacher_temp, pairing, n_crops, n_images, has_center, h_s.dtype)
        return loss, colsum, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_colsum, _grad_entropy):
        if grad_loss is None:
            return (None,) * 13
        (hs, v_s, g_s, ht, v_t, s_scale, s_inv_norm, t_scale, center, row_weights, lse, t_shift,
         t_total) = ctx.saved_tensors
        student_temp, teacher_temp, pairing, n_crops, n_images, has_center, features_dtype = ctx.args
        crops = pairing == "crops"
        n_cols, dim, device = v_s.shape[0], hs.shape[1], hs.device
        cfg = _launch_settings(pairing, n_images, n_cols, TARGET_PROGRAMS)
        block_n = cfg["BLOCK_N"]
        grad_loss = grad_loss.float().reshape(())
        # Prototype chunks of dS (V*N, chunk) within BACKWARD_CHUNK_BYTES, whole tiles: each gives its rows of dv and
        # dg at once, and adds its share of dH ((V*N, D), small) in fp32.
        chunk = BACKWARD_CHUNK_BYTES // (hs.shape[0] * hs.element_size()) // block_n * block_n
        chunk = min(max(block_n, chunk), triton.cdiv(n_cols, block_n) * block_n)
        grad_h = None
        grad_v = torch.empty_like(v_s)
        want_g = g_s is not None and ctx.needs_input_grad[2]
        grad_g = _launch.empty((n_cols,), torch.float32, device) if want_g else None
        weight = (v_s.float() * s_scale[:, None]).to(hs.dtype)  # W (K, D) for dH = dS W
        for start in range(0, n_cols, chunk):
            stop = min(start + chunk, n_cols)
            grad_s = _launch.empty((hs.shape[0], stop - start), hs.dtype, device)
            _fused_head_loss_bwd_kernel[(cfg["n_row_blocks"], triton.cdiv(stop - start, block_n))](
                hs, v_s, ht, v_t, s_scale, t_scale, center, row_weights, lse, t_shift, t_total, grad_loss, grad_s,
                n_images, n_crops, n_cols, start, stop, dim, hs.stride(0), v_s.stride(0), ht.stride(0),
                v_t.stride(0), grad_s.stride(0), 1.0 / student_temp, 1.0 / teacher_temp,
                CROPS=crops, HAS_CENTER=has_center, PRECISION=_precision(hs.dtype), **_kernel_blocks(cfg),
            )
            part = grad_s @ weight[start:stop]  # dS W for this chunk's prototypes
            grad_h = part.float() if grad_h is None else grad_h.add_(part)
            grad_w = grad_s.T @ hs  # U = dS^T H, (chunk, D)
            _weight_norm_bwd_kernel[(triton.cdiv(stop - start, WEIGHT_NORM_BLOCK_K),)](
                grad_w, v_s[start:stop], s_inv_norm[start:stop], s_scale[start:stop], grad_v[start:stop],
                grad_g[start:stop] if want_g else s_scale, stop - start, dim, grad_w.stride(0), v_s.stride(0),
                grad_v.stride(0), HAS_GAIN=want_g, BLOCK_K=WEIGHT_NORM_BLOCK_K,
                BLOCK_D=triton.next_power_of_2(dim))
        grad_g = None if grad_g is None else grad_g.reshape(g_s.shape).to(g_s.dtype)
        return (grad_h.to(features_dtype), grad_v, grad_g) + (None,) * 10


def _check_matrix(name: str, value, dim: int | None = None) -> None:
    _launch.check_is_tensor(name, value)
    if value.dim() != 2 or not value.is_floating_point() or (dim is not None and value.shape[1] != dim):
        want = "(rows, D)" if dim is None else f"(., D) with D={dim}"
        raise ValueError(f"{name} must be a 2-D floating-point tensor {want}, got {tuple(value.shape)} {value.dtype}")


def _check_vector(name: str, value, n: int) -> None:
    _launch.check_is_tensor(name, value, optional=True)
    if value is not None and (value.numel() != n or not value.is_floating_point()):
        raise ValueError(f"{name} must be a floating-point tensor of {n} elements, got {tuple(value.shape)} "
                         f"{value.dtype}")


def check_fused_head_loss_args(student_features, student_weight_v, teacher_features, teacher_weight_v, center,
                               student_temp, teacher_temp, pairing, ncrops, row_weights, student_gain,
                               teacher_gain) -> tuple[int, int]:
    """Validate the `fused_head_loss` inputs (shapes only, no host sync); returns (V, N)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
    _check_matrix("student_features", student_features)
    dim = student_features.shape[1]
    for name, value in (("student_weight_v", student_weight_v), ("teacher_features", teacher_features),
                        ("teacher_weight_v", teacher_weight_v)):
        _check_matrix(name, value, dim)
    n_cols = student_weight_v.shape[0]
    if teacher_weight_v.shape[0] != n_cols:
        raise ValueError(f"teacher_weight_v has {teacher_weight_v.shape[0]} rows, student_weight_v {n_cols}")
    rows_s, rows_t = student_features.shape[0], teacher_features.shape[0]
    if pairing == "crops":
        if isinstance(ncrops, bool) or not isinstance(ncrops, int) or ncrops < 2:
            raise ValueError(f"ncrops must be an int >= 2 (2 global crops + local crops), got {ncrops!r}")
        if rows_s == 0 or rows_s % ncrops:
            raise ValueError(f"student_features has {rows_s} rows, not a positive multiple of ncrops={ncrops}")
        if rows_t != 2 * (rows_s // ncrops):
            raise ValueError(f"teacher_features must have 2*B = {2 * (rows_s // ncrops)} rows for ncrops={ncrops}, "
                             f"got {rows_t}")
        if row_weights is not None:
            raise ValueError('row_weights is for pairing="rows"; "crops" weighs rows as the DINO loss does')
        n_crops, n_images = ncrops, rows_s // ncrops
    else:
        if rows_s == 0 or rows_t != rows_s:
            raise ValueError(f'pairing="rows" needs as many teacher_features rows as student_features rows (> 0), '
                             f"got {rows_t} and {rows_s}")
        _check_vector("row_weights", row_weights, rows_s)
        n_crops, n_images = 1, rows_s
    for name, value in (("center", center), ("student_gain", student_gain), ("teacher_gain", teacher_gain)):
        _check_vector(name, value, n_cols)
    tensors = (student_features, student_weight_v, teacher_features, teacher_weight_v, center, row_weights,
               student_gain, teacher_gain)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"the fused head + loss inputs must be on one device, got {sorted(map(str, devices))}")
    _launch.check_positive("student_temp", student_temp)
    _launch.check_positive("teacher_temp", teacher_temp)
    return n_crops, n_images


def fused_head_loss(
    student_features: torch.Tensor,
    student_weight_v: torch.Tensor,
    teacher_features: torch.Tensor,
    teacher_weight_v: torch.Tensor,
    center: torch.Tensor | None,
    student_temp: float,
    teacher_temp: float,
    *,
    pairing: str = "crops",
    ncrops: int | None = None,
    row_weights: torch.Tensor | None = None,
    student_gain: torch.Tensor | None = None,
    teacher_gain: torch.Tensor | None = None,
    impl: str = "auto",
):
    """Cross-entropy of the weight-normalised last layer's logits without building them (module docstring).

    student_features (V*N, D) crop-major and teacher_features (P*N, D): the heads' bottleneck outputs;
    *_weight_v (K, D) the last layers' un-normalised weights, *_gain (K,) or (K, 1) their gains (None: 1);
    center (K,), (1, K), (1, 1, K) or None (the teacher softmax's center: `sinkhorn_center` for Sinkhorn-Knopp).
    pairing "crops" (DINO: ncrops = V, P = 2) or "rows" (iBOT: V = P = 1, row_weights (N,) per row, default 1/N).
    impl: "auto" (Triton on CUDA tensors, the reference elsewhere), "triton", "torch" (`fused_head_loss_ref`).
    Returns (loss, teacher_colsum, teacher_entropy): the 0-d fp32 loss, differentiable w.r.t. student_features,
    student_weight_v and student_gain; the fp32 (K,) column sum of the teacher logits (center update); the 0-d mean
    entropy of the teacher probability rows. Features and weights are multiplied in the autocast dtype when autocast
    is on, else in the features' dtype.
    """
    n_crops, n_images = check_fused_head_loss_args(
        student_features, student_weight_v, teacher_features, teacher_weight_v, center, student_temp, teacher_temp,
        pairing, ncrops, row_weights, student_gain, teacher_gain)
    chosen = _launch.select_impl("fused_head_loss", impl, student_features.device, "torch",
                                 _fused_head_loss_fwd_kernel)
    device = student_features.device
    if row_weights is None:
        scale = 1.0 / (n_images * 2 * (n_crops - 1)) if pairing == "crops" else 1.0 / n_images
        row_weights = torch.full((student_features.shape[0],), scale, device=device)
    if chosen == "torch":
        return fused_head_loss_ref(student_features, student_weight_v, teacher_features, teacher_weight_v, center,
                                   student_temp, teacher_temp, pairing=pairing, ncrops=n_crops,
                                   row_weights=row_weights, student_gain=student_gain, teacher_gain=teacher_gain)
    autocast = torch.is_autocast_enabled(device.type)
    compute_dtype = torch.get_autocast_dtype(device.type) if autocast else student_features.dtype
    return FusedHeadLossFunction.apply(
        student_features, student_weight_v, student_gain, teacher_features, teacher_weight_v,
        None if teacher_gain is None else teacher_gain.detach(), center, row_weights.detach().float().contiguous(),
        student_temp, teacher_temp, pairing, n_crops, compute_dtype)


@triton.jit(do_not_specialize=["n_rows"])
def _sinkhorn_col_kernel(h_ptr, v_ptr, scale_ptr, log_a_ptr, col_max_ptr, col_sum_ptr, n_rows, n_cols, n_dim,
                         stride_h, stride_v, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Column step of Sinkhorn-Knopp for prototypes program_id(0) * BLOCK_N + [0, BLOCK_N): over all rows i, the
    max and the sum of exp(z_ik + log a_i - max) with z = H v^T * scale (scale = g / (||v|| tau)), into
    col_max/col_sum_ptr (n_cols,) fp32. log_a_ptr (n_rows,) fp32: the row scales' logs."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    col_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    col_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < n_rows
        z = _logits_tile(h_ptr, rows.to(tl.int64), row_mask, stride_h, v_ptr, cols, col_mask, stride_v, scale, n_dim,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        z = tl.where(row_mask[:, None], z + tl.load(log_a_ptr + rows, mask=row_mask, other=0.0)[:, None],
                     float("-inf"))
        new_max = tl.maximum(col_max, tl.max(z, axis=0))
        col_sum = col_sum * tl.exp(col_max - new_max) + tl.sum(tl.exp(z - new_max[None, :]), axis=0)
        col_max = new_max
    tl.store(col_max_ptr + cols, col_max, mask=col_mask)
    tl.store(col_sum_ptr + cols, col_sum, mask=col_mask)


@triton.jit(do_not_specialize=["n_rows", "n_splits", "chunks_per_split"])
def _sinkhorn_row_kernel(h_ptr, v_ptr, scale_ptr, log_b_ptr, row_max_ptr, row_sum_ptr, n_rows, n_cols, n_dim,
                         n_splits, chunks_per_split, stride_h, stride_v, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Row step of Sinkhorn-Knopp for rows program_id(0) * BLOCK_M + [0, BLOCK_M) over the prototype chunks of
    split program_id(1): the max and sum of exp(z_ik + log b_k - max), into row_max/row_sum_ptr (n_rows, n_splits)
    fp32. log_b_ptr (n_cols,) fp32: the column scales' logs; others as in `_sinkhorn_col_kernel`."""
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    rows = rows.to(tl.int64)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    first = split * chunks_per_split
    for chunk in range(first, tl.minimum(first + chunks_per_split, tl.cdiv(n_cols, BLOCK_N))):
        cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
        z = _logits_tile(h_ptr, rows, row_mask, stride_h, v_ptr, cols, col_mask, stride_v, scale, n_dim,
                         BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        z = tl.where(col_mask[None, :], z + tl.load(log_b_ptr + cols, mask=col_mask, other=0.0)[None, :],
                     float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        row_max = new_max
    offs = rows * n_splits + split
    tl.store(row_max_ptr + offs, row_max, mask=row_mask)
    tl.store(row_sum_ptr + offs, row_sum, mask=row_mask)


@torch.no_grad()
def sinkhorn_center(teacher_features: torch.Tensor, teacher_weight_v: torch.Tensor, teacher_temp: float, *,
                    teacher_gain: torch.Tensor | None = None, n_iterations: int = 3, all_reduce=None,
                    valid: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """The center C (K,) fp32 for which softmax((T - C) / teacher_temp) is DINOv2's Sinkhorn-Knopp teacher of the
    logits T = teacher_features @ W^T (W as in `fused_head_loss`), so `fused_head_loss(..., center=C)` trains on it.

    Sinkhorn-Knopp only rescales rows and columns: Q = diag(a) exp(T / tau) diag(b). DINOv2's loop ends with the
    per-sample normalisation, so each row of Q is a softmax of T / tau + log b, and C = -tau log b; its uniform
    factors (the global sum, 1/K, 1/B) cancel. Iteration by iteration, log b = -LSE_i(T_i / tau + log a_i) (column
    step) and log a = -LSE_k(T_k / tau + log b_k) (row step, not needed after the last column step): each step is
    one sweep of the logits, recomputed tile by tile with tl.dot as in `fused_head_loss` (`_sinkhorn_col_kernel`,
    `_sinkhorn_row_kernel`), 2 n_iterations - 1 sweeps in all; no (rows, K) tensor. A column step needs every row,
    a row step every column, so no two steps share a sweep: this is the cheapest exact form without the logits in
    memory (with them, (rows, K) fp32 would be read and written at every step instead).
    all_reduce(tensor, op) with op "max" or "sum" combines the column statistics (K,) across ranks in place
    (DINOv2 all-reduces the per-prototype sums); None on one process. valid (rows,) bool: the rows that are samples
    (iBOT's padded masked patches); the others get row scale 0 and leave the center alone. impl as
    `fused_head_loss` ("torch": `sinkhorn_center_ref` of the logits).
    """
    _check_matrix("teacher_features", teacher_features)
    _check_matrix("teacher_weight_v", teacher_weight_v, teacher_features.shape[1])
    _check_vector("teacher_gain", teacher_gain, teacher_weight_v.shape[0])
    _launch.check_positive("teacher_temp", teacher_temp)
    _launch.check_is_tensor("valid", valid, optional=True)
    if valid is not None and (valid.shape != teacher_features.shape[:1] or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor of {teacher_features.shape[0]} elements, got "
                         f"{tuple(valid.shape)} {valid.dtype}")
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an int >= 1, got {n_iterations!r}")
    device = teacher_features.device
    chosen = _launch.select_impl("sinkhorn_center", impl, device, "torch", _sinkhorn_col_kernel)
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else teacher_features.dtype
    h = teacher_features.to(dtype).contiguous()
    v = teacher_weight_v.contiguous()
    if chosen == "torch":
        weight = F.normalize(v.float(), dim=1) * (1.0 if teacher_gain is None else teacher_gain.float().reshape(-1, 1))
        return sinkhorn_center_ref(h @ weight.to(dtype).T, teacher_temp, n_iterations, all_reduce, valid=valid)
    n_rows, n_cols = h.shape[0], v.shape[0]
    scale = _column_scale(v, teacher_gain)[0] / teacher_temp
    cfg = _launch_settings("rows", n_rows, n_cols, TARGET_PROGRAMS)
    blocks = _kernel_blocks(cfg) | dict(BLOCK_D=SINKHORN_BLOCK_D, PRECISION=_precision(dtype), num_warps=SINKHORN_WARPS,
                                        num_stages=SINKHORN_STAGES)
    splits = cfg["n_splits"]
    sizes = [n_rows, n_cols, n_cols, n_rows * splits, n_rows * splits]
    log_a, col_max, col_sum, row_max, row_sum = _launch.empty((sum(sizes),), torch.float32, device).split(sizes)
    log_a.copy_(_initial_log_row_scale(n_rows, valid, device))
    row_max, row_sum = row_max.view(n_rows, splits), row_sum.view(n_rows, splits)
    for iteration in range(n_iterations):
        _sinkhorn_col_kernel[(triton.cdiv(n_cols, cfg["BLOCK_N"]),)](
            h, v, scale, log_a, col_max, col_sum, n_rows, n_cols, h.shape[1], h.stride(0), v.stride(0), **blocks)
        log_b = _log_column_scale(col_max, col_sum, all_reduce)
        if iteration == n_iterations - 1:
            return -teacher_temp * log_b
        _sinkhorn_row_kernel[(cfg["n_row_blocks"], splits)](
            h, v, scale, log_b, row_max, row_sum, n_rows, n_cols, h.shape[1], splits, cfg["chunks_per_split"],
            h.stride(0), v.stride(0), **blocks)
        top = row_max.amax(dim=1, keepdim=True)
        log_a = _mask_rows(-(top + torch.log((row_sum * torch.exp(row_max - top)).sum(dim=1, keepdim=True)))
                           .squeeze(1), valid)


def sinkhorn_launch_cost(n_rows: int, n_cols: int, dim: int, feature_bytes: int, weight_bytes: int
                         ) -> dict[str, tuple[int, int]]:
    """{kernel name: (HBM bytes, matrix-product FLOPs)} of one column step and one row step of `sinkhorn_center`:
    H and v read once (re-reads from L2 not counted, as in `fused_head_loss_launch_cost`), fp32 statistics."""
    cfg = _launch_settings("rows", n_rows, n_cols, TARGET_PROGRAMS)
    reads, flops = n_rows * dim * feature_bytes + n_cols * (dim * weight_bytes + 4), 2 * n_rows * n_cols * dim
    return {_sinkhorn_col_kernel.fn.__name__: (reads + n_rows * 4 + 2 * n_cols * 4, flops),
            _sinkhorn_row_kernel.fn.__name__: (reads + n_cols * 4 + 2 * n_rows * cfg["n_splits"] * 4, flops)}


def _log_column_scale(col_max, col_sum, all_reduce):
    """log b = -log(sum over all ranks' rows), from this rank's column max and sum of exp(. - max)."""
    if all_reduce is not None:
        top = col_max.clone()
        all_reduce(top, "max")
        col_sum = col_sum * torch.exp(col_max - top)
        all_reduce(col_sum, "sum")
        col_max = top
    return -(col_max + torch.log(col_sum))


# log a of a row that is not a sample (`valid`): finite, so that a column of such rows only is not -inf - -inf = NaN
# (its sum is then a count and its center finite; no loss row reads it), and far below any real row's.
PADDING_LOG_ROW_SCALE = -1e30


def _mask_rows(log_a: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return log_a if valid is None else log_a.masked_fill(~valid, PADDING_LOG_ROW_SCALE)


def _initial_log_row_scale(n_rows: int, valid: torch.Tensor | None, device) -> torch.Tensor:
    return _mask_rows(torch.zeros(n_rows, device=device), valid)


def sinkhorn_center_ref(teacher_logits, teacher_temp, n_iterations=3, all_reduce=None, *, valid=None):
    """`sinkhorn_center` of given logits (rows, K), in log space on the whole tensor (the CPU path)."""
    z = teacher_logits.float() / teacher_temp
    log_a = _initial_log_row_scale(z.shape[0], valid, z.device)[:, None]
    for iteration in range(n_iterations):
        shifted = z + log_a
        col_max = shifted.amax(dim=0)
        log_b = _log_column_scale(col_max, torch.exp(shifted - col_max).sum(dim=0), all_reduce)
        log_a = _mask_rows(-torch.logsumexp(z + log_b, dim=1), valid)[:, None]
    return -teacher_temp * log_b
