"""The attention's two projections over packed multi-crop tokens (vit.py's `Attention`), as autograd Functions whose
backward keeps the resolution groups apart where autograd's would copy them together.

`group_qkv(x, weight, bias, layout, num_heads)`: one addmm of the packed tokens x (T, D) by weight (3D, D) gives
(T, 3D); each group's rows are viewed as (B, N, 3, H, hd) and its q, k, v returned as (B, N, H, hd) views, as
split + view + unbind give them. Autograd would then stack each group's dq, dk, dv (unbind's backward) and
concatenate the groups' (B*N, 3D) gradients (split's backward): 12 T*D element moves per block. This backward
takes the 3 x G gradients as attention returns them and writes, for Wq, Wk, Wv (bq, bk, bv) the row blocks of the
weight (bias) and group g's rows x_g of x:
    dx_g = dq_g Wq + dk_g Wk + dv_g Wv               one mm and two accumulating ones into dx's rows of group g
    dWj  = sum_g dj_gᵀ x_g,  dbj = sum_g dj_gᵀ 1      into the row blocks of one (3D, D) and one (3D,) result
so nothing is copied. `k_bias=False`: bias's k third is a constant zero (DINOv3's masked k bias; the caller builds
it), whose gradient is left zero rather than computed.

`concat_linear(parts, weight, bias)`: cat(parts) Wᵀ + b for the groups' attention outputs parts (B*N, D).
F.linear on the concatenation would save it for its weight gradient: a second copy, one T*D per block held until
backward, of what attention saves of its own output. This saves the parts and frees the concatenation after
forward; backward: dpart_g = dy_g W (one mm per group, dy_g the group's rows of dy), dW = sum_g dy_gᵀ part_g,
db = dy.sum(0).

Both run their matmuls in their inputs' dtype, which must be one: the caller casts them (as autocast would cast a
linear layer's) and runs them with autocast off. Each sum over groups starts with beta=0 (`addmm_(..., beta=0)`
ignores the uninitialised memory it writes, NaNs included) so that every product lands in place.
"""
import torch


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, out_features: int) -> None:
    if x.ndim != 2 or x.shape[0] != rows:
        raise ValueError(f"x must be ({rows}, D) for its layout, got {tuple(x.shape)}")
    if weight.shape != (out_features, x.shape[1]) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be ({out_features}, {x.shape[1]}) {x.dtype} on {x.device}, got "
                         f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be ({out_features},) {x.dtype} on {x.device}, got {tuple(bias.shape)} "
                         f"{bias.dtype} on {bias.device}")


class _GroupQKV(torch.autograd.Function):
    """(x, weight, bias, layout, num_heads, k_bias) -> q, k, v of group 0, then of group 1, ... (module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layout, num_heads, k_bias):
        qkv = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()  # (T, 3D)
        ctx.save_for_backward(x, weight)
        ctx.sizes, ctx.has_bias, ctx.k_bias = [b * n for b, n in layout], bias is not None, k_bias
        d = x.shape[1]
        groups = qkv.split(ctx.sizes)
        return tuple(t for (b, n), g in zip(layout, groups)
                     for t in g.view(b, n, 3, num_heads, d // num_heads).unbind(2))  # 3G x (B, N, H, hd)

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        t, d = x.shape
        w = weight.view(3, d, d)  # Wq, Wk, Wv
        # per group, dq, dk, dv as (B*N, D) matrices: views when attention returns them in (B, N, H, hd) order
        per_group = [[g.reshape(-1, d) for g in grads[i:i + 3]] for i in range(0, len(grads), 3)]
        xs = x.split(ctx.sizes)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = x.new_empty(t, d)
            for rows, parts in zip(dx.split(ctx.sizes), per_group):
                for j, dj in enumerate(parts):
                    rows.addmm_(dj, w[j], beta=int(j > 0))
        if ctx.needs_input_grad[1]:
            dweight = weight.new_empty(3, d, d)
            for g, (x_g, parts) in enumerate(zip(xs, per_group)):
                for j, dj in enumerate(parts):
                    dweight[j].addmm_(dj.t(), x_g, beta=int(g > 0))
            dweight = dweight.view(3 * d, d)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = x.new_empty(3, d)
            if not ctx.k_bias:
                dbias[1].zero_()
            ones = torch.ones(max(ctx.sizes), dtype=x.dtype, device=x.device)
            for g, (n, parts) in enumerate(zip(ctx.sizes, per_group)):
                for j, dj in enumerate(parts):
                    if j != 1 or ctx.k_bias:
                        dbias[j].addmv_(dj.t(), ones[:n], beta=int(g > 0))
            dbias = dbias.view(3 * d)
        return dx, dweight, dbias, None, None, None


def group_qkv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: tuple[tuple[int, int], ...],
              num_heads: int, k_bias: bool = True) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per group of `layout` ((B, N) per group: vit.Layout), (q, k, v) each (B, N, H, hd) of x (T, D) @ weight
    (3D, D)ᵀ + bias (3D,) (module docstring); `k_bias=False`: bias's middle third is zero and gets no gradient."""
    _check(x, weight, bias, sum(b * n for b, n in layout), weight.shape[0])
    if weight.shape[0] % 3 or weight.shape[0] // 3 % num_heads:
        raise ValueError(f"weight must be (3D, D) with D divisible by num_heads={num_heads}, got {tuple(weight.shape)}")
    flat = _GroupQKV.apply(x, weight, bias, tuple(layout), num_heads, k_bias)
    return [tuple(flat[i:i + 3]) for i in range(0, len(flat), 3)]


class _ConcatLinear(torch.autograd.Function):
    """(weight, bias, *parts) -> cat(parts) @ weightᵀ + bias, saving the parts (module docstring)."""

    @staticmethod
    def forward(ctx, weight, bias, *parts):
        x = torch.cat(parts) if len(parts) > 1 else parts[0]  # (T, D), freed after forward
        ctx.save_for_backward(weight, *parts)
        ctx.has_bias = bias is not None
        return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()

    @staticmethod
    def backward(ctx, dy):
        weight, *parts = ctx.saved_tensors
        dys = dy.split([p.shape[0] for p in parts])
        dparts = [dy_g @ weight if needs else None for dy_g, needs in zip(dys, ctx.needs_input_grad[2:])]
        dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dweight = weight.new_empty(weight.shape)
            for g, (dy_g, part) in enumerate(zip(dys, parts)):
                dweight.addmm_(dy_g.t(), part, beta=int(g > 0))
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dbias = dy.sum(0)
        return dweight, dbias, *dparts


def concat_linear(parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """cat(parts) @ weightᵀ + bias, (sum of the parts' rows, out), for parts (rows_g, in), weight (out, in)."""
    if not parts:
        raise ValueError("parts must hold at least one tensor")
    for part in parts:
        _check(part, weight, bias, part.shape[0], weight.shape[0])
    return _ConcatLinear.apply(weight, bias, *parts)
