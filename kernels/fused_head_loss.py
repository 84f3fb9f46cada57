"""DINO loss with the head's weight-normalised last layer folded in: the logits are built chunk by chunk of prototypes.

Math: the same loss as `dino_loss` (see kernels/dino_loss.py) on student logits S = H_s W_s^T and teacher logits
T = H_t W_t^T, where H (rows, D) are the L2-normalised bottleneck features and W_k = v_k / ||v_k|| the rows of the
un-normalised last-layer weight v (K, D) (DINO head, `norm_last_layer=True`: gain 1). Instead of materialising S
(V*B, K), T (2B, K) or W (K, D), every pass walks the K prototypes in chunks of `chunk_size` columns, as Liger's
fused linear cross-entropy walks rows, and keeps only per-row statistics (FlashAttention-style recompute):
1. teacher pass (no grad): T_c = (H_t v_c^T) / ||v_c||, column sums of T (the center update), online row max and
   sum of exp of z = (T - C) / tau_t, and the entropy term; T_c is dropped after use.
2. student pass: S_c likewise, the teacher chunk recomputed and turned into q_c with the saved row statistics; online
   LSE of x = S / tau_s and sum w*x per row.
3. backward: recompute S_c and q_c, dS_c = g ((sum w) softmax(x) - w) / (tau_s B n_terms) in fp32, then
   dH_s += dS_c W_c and, through the row normalisation, dv_c = (dW_c - (dW_c . W_c) W_c) / ||v_c|| with
   dW_c = dS_c^T H_s.
Saved for backward: H_s, v_s, H_t, v_t (inputs), the center snapshot (K,), the teacher's row max and sum (2B,) and
the student's row LSE (V*B,). Peak extra memory: a few (V*B, chunk_size) fp32 tensors.

This is the plain-PyTorch implementation of the fused path (matmuls by cuBLAS, the elementwise work by torch ops per
chunk); its spec is `kernels/reference.py: dino_loss_fused_head_ref`. A Triton kernel for the per-chunk elementwise
part (one pass instead of a dozen torch ops per chunk) is issue 16's remaining work.
"""
import torch

from . import _launch

DEFAULT_CHUNK = 8192


def _chunk_logits(features, weight_v, start, stop):
    """(rows, stop - start) fp32 logits features @ W[start:stop]^T with W = v / ||v|| (F.normalize's eps), and the
    chunk's 1 / ||v_k|| (stop - start,) and un-normalised rows."""
    v = weight_v[start:stop]
    inv_norm = 1.0 / v.float().norm(dim=1).clamp_min(1e-12)
    # fp32 master weights with low-precision features (mixed precision): the matmul in the features' dtype.
    return (features @ v.to(features.dtype).T).float() * inv_norm, inv_norm, v


def _teacher_stats(h_t, v_t, center, teacher_temp, chunk):
    """Teacher pass: column sums (K,), row max and sum of exp of z (2B,) each, mean row entropy (0-d)."""
    rows, n_cols = h_t.shape[0], v_t.shape[0]
    colsum = torch.empty(n_cols, dtype=torch.float32, device=h_t.device)
    row_max = torch.full((rows,), float("-inf"), device=h_t.device)
    row_sum = torch.zeros(rows, device=h_t.device)
    row_ez = torch.zeros(rows, device=h_t.device)  # sum_k e^(z_k - max) (z_k - max), re-based on each new max
    for start in range(0, n_cols, chunk):
        stop = min(start + chunk, n_cols)
        t = _chunk_logits(h_t, v_t, start, stop)[0]  # (2B, c)
        colsum[start:stop] = t.sum(dim=0)
        z = (t if center is None else t - center[start:stop]) / teacher_temp
        new_max = torch.maximum(row_max, z.amax(dim=1))
        rescale = torch.exp(row_max - new_max)
        e = torch.exp(z - new_max[:, None])
        row_ez = rescale * (row_ez + (row_max - new_max).nan_to_num(neginf=0.0) * row_sum) + (
            e * (z - new_max[:, None])).sum(dim=1)
        row_sum = row_sum * rescale + e.sum(dim=1)
        row_max = new_max
    entropy = (torch.log(row_sum) - row_ez / row_sum).mean()
    return colsum, row_max, row_sum, entropy


def _teacher_weights(h_t, v_t, center, teacher_temp, t_max, t_sum, start, stop, ncrops):
    """(V, B, c) fp32 weights w of every student crop on chunk [start, stop): the sum of the paired teacher rows'
    probabilities (crop 0 pairs with teacher crop 1, crop 1 with 0, local crops with both)."""
    t = _chunk_logits(h_t, v_t, start, stop)[0]
    z = (t if center is None else t - center[start:stop]) / teacher_temp
    q = (torch.exp(z - t_max[:, None]) / t_sum[:, None]).unflatten(0, (2, -1))  # (2, B, c)
    local = (q[0] + q[1]).expand(ncrops - 2, *q.shape[1:])
    return torch.cat([q[1:2], q[0:1], local], dim=0)


class FusedHeadDINOLossFunction(torch.autograd.Function):
    """Weight-normalised last layer + DINO loss, chunked over prototypes (see the module docstring)."""

    @staticmethod
    def forward(ctx, h_s, v_s, h_t, v_t, center, student_temp, teacher_temp, ncrops, chunk):
        batch, n_cols = h_t.shape[0] // 2, v_s.shape[0]
        center = None if center is None else center.detach().reshape(-1).float().clone()  # snapshot: updated later
        h_t, v_t = h_t.detach(), v_t.detach()
        colsum, t_max, t_sum, entropy = _teacher_stats(h_t, v_t, center, teacher_temp, chunk)
        s_max = torch.full((h_s.shape[0],), float("-inf"), device=h_s.device)
        s_sum = torch.zeros_like(s_max)
        wx = torch.zeros_like(s_max)
        for start in range(0, n_cols, chunk):
            stop = min(start + chunk, n_cols)
            x = _chunk_logits(h_s, v_s, start, stop)[0] / student_temp  # (V*B, c)
            w = _teacher_weights(h_t, v_t, center, teacher_temp, t_max, t_sum, start, stop, ncrops).flatten(0, 1)
            wx += (w * x).sum(dim=1)
            new_max = torch.maximum(s_max, x.amax(dim=1))
            s_sum = s_sum * torch.exp(s_max - new_max) + torch.exp(x - new_max[:, None]).sum(dim=1)
            s_max = new_max
        lse = s_max + torch.log(s_sum)
        w_total = torch.full_like(lse, 2.0)
        w_total[: 2 * batch] = 1.0  # global crops pair with one teacher crop, local crops with both
        n_terms = 2 * (ncrops - 1)
        loss = (w_total * lse - wx).sum() / (batch * n_terms)
        ctx.mark_non_differentiable(colsum, entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h_s, v_s, h_t, v_t, center, t_max, t_sum, lse, w_total)
        ctx.args = (student_temp, teacher_temp, ncrops, chunk, batch * n_terms)
        device = h_s.device.type  # backward recomputes the logits as forward did: under the same autocast
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return loss, colsum, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_colsum, _grad_entropy):
        if grad_loss is None:
            return (None,) * 9
        device, autocast, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            return FusedHeadDINOLossFunction._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss):
        h_s, v_s, h_t, v_t, center, t_max, t_sum, lse, w_total = ctx.saved_tensors
        student_temp, teacher_temp, ncrops, chunk, n_norm = ctx.args
        scale = grad_loss.float() / (student_temp * n_norm)  # 0-d on device: no host sync
        h32 = h_s.float()
        grad_h = torch.zeros_like(h32)
        grad_v = torch.empty_like(v_s)
        for start in range(0, v_s.shape[0], chunk):
            stop = min(start + chunk, v_s.shape[0])
            logits, inv_norm, v = _chunk_logits(h_s, v_s, start, stop)
            w = _teacher_weights(h_t, v_t, center, teacher_temp, t_max, t_sum, start, stop, ncrops).flatten(0, 1)
            grad_logits = (w_total[:, None] * torch.exp(logits / student_temp - lse[:, None]) - w) * scale
            weight = v.float() * inv_norm[:, None]  # (c, D) W rows of this chunk only
            grad_h += grad_logits @ weight
            grad_weight = grad_logits.T @ h32  # (c, D)
            radial = (grad_weight * weight).sum(dim=1, keepdim=True)
            grad_v[start:stop] = ((grad_weight - radial * weight) * inv_norm[:, None]).to(v_s.dtype)
        return grad_h.to(h_s.dtype), grad_v, None, None, None, None, None, None, None


def dino_loss_fused_head(
    student_features: torch.Tensor,
    student_weight_v: torch.Tensor,
    teacher_features: torch.Tensor,
    teacher_weight_v: torch.Tensor,
    center: torch.Tensor | None,
    student_temp: float,
    teacher_temp: float,
    ncrops: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
):
    """DINO loss of the logits features @ normalize(weight_v)^T without building them (see the module docstring).

    student_features (V*B, D) and teacher_features (2*B, D): L2-normalised bottleneck features, crop-major;
    *_weight_v (K, D): the last layers' un-normalised weights (gain 1); center (K,), (1, K) or None; temperatures
    positive numbers. Returns (loss, teacher_colsum, teacher_entropy) as `dino_loss(..., return_entropy=True)`;
    the loss is differentiable w.r.t. student_features and student_weight_v, teacher_colsum is the (K,) column sum of
    the teacher logits (for the center update).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    for name, value in (("student_features", student_features), ("student_weight_v", student_weight_v),
                        ("teacher_features", teacher_features), ("teacher_weight_v", teacher_weight_v)):
        _launch.check_is_tensor(name, value)
    for name, t in (("student_weight_v", student_weight_v), ("teacher_weight_v", teacher_weight_v)):
        if t.dim() != 2 or t.shape[1] != student_features.shape[-1]:
            raise ValueError(f"{name} must be (K, D) with D={student_features.shape[-1]}, got {tuple(t.shape)}")
    n_cols = student_weight_v.shape[0]
    if teacher_weight_v.shape[0] != n_cols:
        raise ValueError(f"teacher_weight_v has {teacher_weight_v.shape[0]} rows, student_weight_v {n_cols}")
    # Shapes as `dino_loss` sees them, on (rows, K) stand-ins that allocate nothing.
    _launch.check_dino_loss_args(student_features.new_empty(()).expand(student_features.shape[0], n_cols),
                                 teacher_features.new_empty(()).expand(teacher_features.shape[0], n_cols),
                                 center, student_temp, teacher_temp, ncrops)
    return FusedHeadDINOLossFunction.apply(student_features, student_weight_v, teacher_features, teacher_weight_v,
                                           center, student_temp, teacher_temp, ncrops, chunk_size)
