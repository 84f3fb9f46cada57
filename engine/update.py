"""The step after backward on the Triton path (optim.impl=triton, the default on CUDA outside FSDP2): four
launches, each over every parameter or none at all, and no host decision:

1. `clip_coefficients` (kernels/clip.py): every gradient's norm, the total norm, a coefficient per tensor
   (optim.clip_grad_mode) and the skip flag (a non-finite norm);
2. `adamw_step_` (kernels/adamw.py): AdamW with each gradient multiplied by its coefficient as it is read (the
   clip itself, no extra pass), per-group lr and weight decay read on the device from the trainer's schedule
   tensor, the step counts, nothing on a skipped step;
3. `step_stats_update_` (kernels/step_stats.py): StepStats' accumulators, this step's teacher momentum (1 when
   skipped) and, when skipped, the loss center put back;
4. the EMA (kernels/ema.py) with that momentum.

torch's path (optim.impl=torch: clipping.py, torch's fused AdamW, StepStats.update) is the same math; under
FSDP2 it stays, since the per-tensor norms of sharded gradients need an all-reduce between 1 and 2. fp16 loss
scaling adds its unscale and its update (torch ops) around them.
"""
import torch

from fastdino.kernels.adamw import adamw_step_
from fastdino.kernels.clip import clip_coefficients
from fastdino.kernels.step_stats import step_stats_update_


def resolve_update_impl(setting: str, device: torch.device, mode: str, plain: bool = True) -> str:
    """optim.impl: "auto" is triton on CUDA outside FSDP2 for DINO's step with one lr (`plain`, config.plain_update);
    "triton" elsewhere runs the kernels in the Triton interpreter (tests) and is refused under FSDP2."""
    if setting == "triton" and mode == "fsdp":
        raise ValueError("optim.impl=triton does not take FSDP2's sharded gradients (the per-tensor norms need an "
                         "all-reduce); set optim.impl=torch or auto")
    if setting == "auto":
        return "triton" if device.type == "cuda" and mode != "fsdp" and plain else "torch"
    return setting


class TritonUpdate:
    """The four launches over the trainer's parameters and optimizer state (see the module docstring).

    `schedule` is the trainer's (3,) device tensor of this step's lr, weight decay and teacher momentum. AdamW's
    group 0 decays with the scheduled weight decay (the trainer's schedule sets group 0), the other groups with
    their own fixed value; every group takes the scheduled lr."""

    def __init__(self, trainer, schedule: torch.Tensor):
        self.trainer, self.schedule = trainer, schedule
        optimizer = trainer.optimizer
        group_hyper = {(g["betas"], g["eps"]) for g in optimizer.param_groups}
        if len(group_hyper) != 1 or any(g["amsgrad"] or g["maximize"] for g in optimizer.param_groups):
            raise ValueError("optim.impl=triton needs one (betas, eps) for every AdamW group and no amsgrad/maximize")
        (self.betas, self.eps), = group_hyper
        lr, decay = schedule[0], schedule[1]
        self.momentum = torch.ones((), device=schedule.device)  # this step's, written by step_stats_update_
        fixed = {}  # the other groups' weight decay as device tensors, one per value
        self.hyper = {}  # param -> (lr, weight decay) 0-d device tensors
        self._key, self._cached = None, None  # see _columns
        for i, group in enumerate(optimizer.param_groups):
            if i:
                value = float(group["weight_decay"])
                wd = fixed.setdefault(value, torch.full((), value, device=schedule.device))
            for p in group["params"]:
                self.hyper[p] = (lr, decay if i == 0 else wd)

    def _columns(self, params: list) -> list[list[torch.Tensor]]:
        """AdamW's moments, step counts, lr and weight decay of `params`, kept while the parameter set and the
        optimizer's state stays (a checkpoint load replaces it; the key holds the one it was built from, so
        that no later object takes its id)."""
        state = self.trainer.optimizer.state
        key = (tuple(map(id, params)), state)
        if self._key is None or key[0] != self._key[0] or key[1] is not self._key[1]:
            states = [state[p] for p in params]
            self._key, self._cached = key, [
                [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                [self.hyper[p][0] for p in params], [self.hyper[p][1] for p in params]]
        return self._cached

    def __call__(self, loss: torch.Tensor, entropy: torch.Tensor, center: torch.Tensor, *,
                 keep_grads: bool) -> None:
        """After backward: the update from the gradients present (a frozen last layer has none). `center` is the
        loss center before this step (restored on a skipped step); `keep_grads` zeroes the gradients in place
        instead of freeing them (CUDA graphs read them where they are)."""
        t, cfg = self.trainer, self.trainer.cfg.optim
        params = [p for p in t.params if p.grad is not None]
        grads = [p.grad for p in params]
        if t.loss_scale:
            t.loss_scale.unscale_(grads)
        coefficients, norm, skip = clip_coefficients(grads, cfg.clip_grad, cfg.clip_grad_mode, impl="triton")
        adamw_step_(params, grads, *self._columns(params), betas=self.betas, eps=self.eps,
                    grad_coefficients=coefficients, skip=skip, zero_grads=keep_grads, impl="triton")
        if not keep_grads:
            t.optimizer.zero_grad(set_to_none=True)
        step_stats_update_(t.stats.fields, loss, entropy, norm, skip, self.schedule[2], self.momentum,
                           t.loss_fn.center, center, skip_is_nonfinite=t.loss_scale is None, impl="triton")
        t.ema(self.momentum)
        if t.loss_scale:
            t.loss_scale.update(skip != 0)
