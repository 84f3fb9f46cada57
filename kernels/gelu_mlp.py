"""A transformer block's MLP branch with its residual add, whose backward keeps no GELU output and no scaled copy
of the gradient.

    out = x + s * (gelu(normed W1ᵀ + b1) W2ᵀ + b2)        s: (T, 1) per-row scale (stochastic depth), or none

Forward is cuBLAS's two matmuls, aten's exact (erf) GELU and one addcmul, as the plain composition computes it; what
it saves for backward is `normed` and the fc1 output h, not the GELU output a = gelu(h) (T x hidden, as large as h):
autograd's composition keeps both. Backward, with g the gradient of `out`:

    dx = g                       the residual path, the same tensor
    da = (g W2) * s              one mm; the row scale is applied in the kernel below, not by a (T, D) multiply
    dh = da * gelu'(h)           } one Triton pass over h and da: dh (in place over da), s * a recomputed from h
    s * a                        } (in place over h) for fc2's weight gradient, and fc1's bias gradient as
                                   per-program column sums
    dW2 = gᵀ (s a), db2 = gᵀ s,  dW1 = dhᵀ normed,  dnormed = dh W1,  db1 = sum of the column sums

Against autograd's composition (mul g * s, gelu_backward, the sum of dh for db1) this reads and writes
2 T*D + T*hidden fewer elements per block and keeps T*hidden fewer at the memory peak (ViT-S/16 at batch 128, 12 crops:
0.28 GiB per block, 3.4 GiB per step). The rounding differs from the composition's only in where s is applied
(before vs after the bf16 matmul output) and in db1 summing dh before its rounding to the gradient dtype.

`gelu_mlp_residual(..., impl="auto")` takes the Triton backward on CUDA tensors when autograd records, and the plain
composition (`reference.gelu_mlp_residual_ref`) otherwise; impl="triton" also runs in the CPU interpreter (tests).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _launch
from .reference import gelu_mlp_residual_ref

BLOCK_ROWS, BLOCK_COLS = 32, 128
# Programs along the rows: each walks its share of the rows in BLOCK_ROWS steps and writes one row of column sums,
# so the bias gradient's partial sums are (ROW_PROGRAMS, hidden) fp32, not (T / BLOCK_ROWS, hidden).
ROW_PROGRAMS = 64
NUM_WARPS = 4
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _gelu_mlp_bwd_kernel(
    h_ptr, da_ptr, s_ptr, sa_ptr, db_ptr, n_rows, n_cols, rows_per_program,
    HAS_SCALE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """For rows [pid_m * rows_per_program, ...) and columns block pid_n of h, da (n_rows, n_cols), contiguous:
    da <- da * s * gelu'(h) (dh, in place), sa <- s * gelu(h) (sa_ptr may be h_ptr: each element is read before it
    is written), db[pid_m, cols] <- the column sums of dh (fp32). s_ptr: (n_rows,) per-row scale, read when
    HAS_SCALE."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    row_start = pid_m * rows_per_program
    row_stop = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_stop, BLOCK_ROWS):
        rows = start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < row_stop
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))  # Φ(h): aten's exact GELU is h Φ(h)
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # φ(h)
        a = h * cdf
        if HAS_SCALE:
            s = tl.load(s_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            da = da * s
            a = a * s
        dh = da * (cdf + h * pdf)
        tl.store(da_ptr + offsets, dh.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(sa_ptr + offsets, a.to(sa_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(tl.where(mask, dh, 0.0), axis=0)
    tl.store(db_ptr + pid_m * n_cols + cols, acc, mask=col_ok)


def _row_split(n_rows: int) -> tuple[int, int]:
    """(rows per program, a multiple of BLOCK_ROWS; programs along the rows, at most ROW_PROGRAMS)."""
    per_program = -(-n_rows // min(ROW_PROGRAMS, max(1, n_rows)))
    per_program = -(-per_program // BLOCK_ROWS) * BLOCK_ROWS
    return per_program, -(-n_rows // per_program)


def gelu_mlp_launch_bytes(n_rows: int, n_cols: int, elem_bytes: int, has_scale: bool) -> int:
    """HBM bytes of one `_gelu_mlp_bwd_kernel` launch: h and da read, dh and s*a written (n_rows x n_cols each), the
    row scale read, the column sums written (fp32)."""
    programs = _row_split(n_rows)[1]
    return 4 * n_rows * n_cols * elem_bytes + has_scale * n_rows * elem_bytes + 4 * programs * n_cols


def _gelu_mlp_backward(h: torch.Tensor, da: torch.Tensor, scale: torch.Tensor | None):
    """(dh written over da, s * gelu(h) written over h, db1 in h's dtype) by one launch: backward allocates no
    (T, hidden) buffer beyond da, the matmul's output."""
    n_rows, n_cols = h.shape
    rows_per_program, programs = _row_split(n_rows)
    col_sums = _launch.empty((programs, n_cols), torch.float32, h.device)
    grid = (triton.cdiv(n_cols, BLOCK_COLS), programs)
    _gelu_mlp_bwd_kernel[grid](
        h, da, scale if scale is not None else h, h, col_sums, n_rows, n_cols, rows_per_program,
        HAS_SCALE=scale is not None, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLS=BLOCK_COLS, num_warps=NUM_WARPS,
    )
    return da, h, col_sums.sum(0, dtype=h.dtype)  # accumulated in fp32, rounded once


class GeluMlpResidual(torch.autograd.Function):
    """out = x + s * fc2(gelu(fc1(normed))); saves normed, h = fc1(normed), the weights and s (see the module
    docstring for the backward)."""

    @staticmethod
    def forward(ctx, x, normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale):
        with torch.autocast(x.device.type, enabled=False):
            h = F.linear(normed, fc1_weight, fc1_bias)
            branch = F.linear(F.gelu(h), fc2_weight, fc2_bias)  # gelu(h) is freed here: backward recomputes it
            out = x + branch if scale is None else torch.addcmul(x, branch, scale)
        ctx.has_bias = fc1_bias is not None, fc2_bias is not None
        ctx.h_consumed = False
        ctx.save_for_backward(normed, h, fc1_weight, fc2_weight, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.h_consumed:
            raise RuntimeError("gelu_mlp_residual: a second backward through the same forward (retain_graph=True) "
                               "is not supported: the first one wrote s * gelu(h) over the saved fc1 output h")
        ctx.h_consumed = True
        normed, h, fc1_weight, fc2_weight, scale = ctx.saved_tensors
        grad = grad.contiguous()
        flat_scale = scale.reshape(-1) if scale is not None else None
        dh, scaled_act, fc1_bias_grad = _gelu_mlp_backward(h, grad @ fc2_weight, flat_scale)
        fc2_weight_grad = grad.t() @ scaled_act
        fc2_bias_grad = (grad.sum(0) if scale is None else grad.t() @ flat_scale) if ctx.has_bias[1] else None
        normed_grad = dh @ fc1_weight
        fc1_weight_grad = dh.t() @ normed
        fc1_bias_grad = fc1_bias_grad if ctx.has_bias[0] else None
        return grad, normed_grad, fc1_weight_grad, fc1_bias_grad, fc2_weight_grad, fc2_bias_grad, None


def _check_args(x, normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale) -> None:
    """ValueError naming the argument for a shape, dtype or device that the op cannot take."""
    named = dict(x=x, normed=normed, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight,
                 fc2_bias=fc2_bias, scale=scale)
    for name, t in named.items():
        _launch.check_is_tensor(name, t, optional=name in ("fc1_bias", "fc2_bias", "scale"))
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a 2-D floating-point tensor (tokens, dim), got {x.dtype} {tuple(x.shape)}")
    rows, dim = x.shape
    hidden = fc1_weight.shape[0] if fc1_weight.dim() == 2 else -1
    shapes = dict(normed=(rows, dim), fc1_weight=(hidden, dim), fc1_bias=(hidden,), fc2_weight=(dim, hidden),
                  fc2_bias=(dim,))
    for name, shape in shapes.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for x {tuple(x.shape)} and fc1_weight "
                             f"{tuple(fc1_weight.shape)}, got {tuple(t.shape)}")
    if scale is not None and (scale.numel() != rows or scale.dim() > 2 or scale.shape[0] != rows):
        raise ValueError(f"scale must have shape ({rows}, 1) or ({rows},) for x {tuple(x.shape)}, got "
                         f"{tuple(scale.shape)}")
    present = {name: t for name, t in named.items() if t is not None}
    for name, t in present.items():
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype} (cast the weights as autocast would), got "
                             f"{t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device {x.device}, got {t.device}")


def gelu_mlp_residual(x: torch.Tensor, normed: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                      fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None, scale: torch.Tensor | None = None, *,
                      impl: str = "auto") -> torch.Tensor:
    """x + scale * (gelu(normed fc1_weightᵀ + fc1_bias) fc2_weightᵀ + fc2_bias), differentiable in every tensor but
    `scale` (module docstring). x, normed (T, D); fc1_weight (H, D), fc1_bias (H,); fc2_weight (D, H), fc2_bias (D,);
    scale (T, 1) or (T,) or None; all one dtype and device. impl: auto (Triton backward on CUDA when autograd
    records), triton, or torch (`gelu_mlp_residual_ref`)."""
    _check_args(x, normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale)
    chosen = _launch.select_impl("gelu_mlp_residual", impl, x.device, "torch", _gelu_mlp_bwd_kernel)
    if chosen == "torch" or not torch.is_grad_enabled():
        return gelu_mlp_residual_ref(x, normed, fc1_weight, fc1_bias, fc2_weight, fc2_bias, scale)
    if scale is not None:
        scale = scale.reshape(-1, 1).contiguous()
    return GeluMlpResidual.apply(x, normed.contiguous(), fc1_weight.contiguous(), fc1_bias, fc2_weight.contiguous(),
                                 fc2_bias, scale)

