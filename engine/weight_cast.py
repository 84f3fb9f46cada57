"""One cast of the weights per model and step under autocast, instead of one per weight and use.

Under autocast every matmul, convolution and (here) LayerNorm casts its fp32 weight to the compute dtype on each
call, and autograd casts each weight's gradient back: at ViT-S/16 about 470 `_to_copy` ops a step, a third of the
step's aten ops (the host's work, not the GPU's: they move little). `WeightCasts` casts the weights of a model in one
`torch._foreach_copy_` and runs the model on the casts (`torch.func.functional_call`): the student's through an
autograd function whose backward casts all their gradients back in one more (the gradients are then views of one
buffer), the teacher's into copies it keeps. The numbers are the same: autocast would compute these very casts
(round to nearest) and the same gradient casts.

Which weights: all floating-point parameters but those of the head's weight-normalised last layer, whose
normalisation runs in fp32 from the fp32 weight. When: autocast on, one process (`parallel.mode=single`), the model
neither compiled (the compiler fuses the casts itself) nor checkpointed (a block recomputed in backward would run
outside the call and cast again).
"""
import math

import torch
from torch.func import functional_call

from fastdino.engine.head import WeightNormLinear


def _buffers_like(shapes, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Tensors of `shapes` as views of one new buffer of `dtype` (one allocation)."""
    numels = [math.prod(s) for s in shapes]
    flat = torch.empty(sum(numels), dtype=dtype, device=device)
    return [part.view(shape) for part, shape in zip(flat.split(numels), shapes)]


class _CastWeights(torch.autograd.Function):
    """(tag, weights...) -> the weights cast to the empty tensor `tag`'s dtype (a tensor, not a dtype: every input a
    tensor, as the step model's backward engine expects); backward casts the gradients back to the weights'."""

    @staticmethod
    def forward(ctx, tag, *weights):
        ctx.set_materialize_grads(False)  # a weight unused by this forward gets no gradient, as without the cast
        ctx.shapes, ctx.dtype, ctx.device = [w.shape for w in weights], weights[0].dtype, weights[0].device
        casts = _buffers_like(ctx.shapes, tag.dtype, ctx.device)
        torch._foreach_copy_(casts, weights)
        return tuple(casts)

    @staticmethod
    def backward(ctx, *grads):
        present = [i for i, g in enumerate(grads) if g is not None]
        result = [None] * len(grads)
        if present:
            masters = _buffers_like([ctx.shapes[i] for i in present], ctx.dtype, ctx.device)
            torch._foreach_copy_(masters, [grads[i] for i in present])
            for i, master in zip(present, masters):
                result[i] = master
        return (None, *result)


def cast_weight_names(model: torch.nn.Module) -> list[str]:
    """The parameters `WeightCasts` casts: floating point, outside weight-normalised linear layers."""
    skip = {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, WeightNormLinear)
            for name, _ in module.named_parameters(recurse=False)}
    return [name for name, p in model.named_parameters() if p.is_floating_point() and name not in skip]


class WeightCasts:
    """Runs `model(...)` on casts of its weights to `dtype` (see the module docstring). `trains`: the student (casts
    through autograd, made each call), else the teacher (casts kept, refreshed each call under no_grad)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, *, trains: bool):
        self.model, self.trains = model, trains
        self.tag = torch.empty(0, dtype=dtype)
        self.names = cast_weight_names(model)
        parameters = dict(model.named_parameters())
        self.weights = [parameters[name] for name in self.names]
        self.kept = None if trains else _buffers_like([w.shape for w in self.weights], dtype, self.weights[0].device)

    def __call__(self, *args, **kwargs):
        if self.trains:
            casts = _CastWeights.apply(self.tag, *self.weights)
        else:
            with torch.no_grad():
                torch._foreach_copy_(self.kept, self.weights)
            casts = self.kept
        return functional_call(self.model, dict(zip(self.names, casts)), args, kwargs)
