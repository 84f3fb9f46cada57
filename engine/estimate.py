"""The step model (`fastdino estimate`): peak GPU memory, FLOPs, bytes moved and a roofline time of one training
step, without a GPU, for fastdino's Trainer and for the official DINO step (fastdino/official_dino.py) side by side.

    from fastdino.engine.estimate import estimate_step
    result = estimate_step(cfg, "h100")   # {"fastdino": {...}, "official": {...}}

Method. Two REAL steps run, the Trainer's own `train_step` and official_dino's `train_step`, with every tensor a
fake CUDA tensor (torch's FakeTensorMode: shapes, dtypes and strides, no data), so CUDA autocast applies its own cast
rules (the AutocastCUDA kernels of the installed torch: matmuls and SDPA to bf16/fp16, softmax, layer norm and
reductions to fp32, promotion for cat and friends), the CUDA code paths of the engine run (Triton loss and EMA,
fused AdamW) and the second step is measured (optimizer state exists, as in a run). Around them:
- Every aten op that touches a CUDA tensor is costed at max(bytes / (HBM x HBM_EFFICIENCY), FLOPs / (peak x
  FLOP_EFFICIENCY)): bytes = its CUDA inputs (unique elements: a broadcast is read once) + outputs; FLOPs from
  `torch.utils.flop_counter`'s formulas, the ones FlopCounterMode counts (matmuls, convolutions, attention); peak by
  the op's dtype. View ops cost nothing and are not counted; `aten_ops` counts the others.
- SDPA is called as the GPU would run it: flash attention for bf16/fp16 (memory-efficient for fp32), costed by its
  FLOPs and by reading q, k, v and writing the output (no N x N tensor). Fake tensors have no device to choose a
  backend from, and SDPA's CPU-side choice would take the math path.
- Triton launches do not run: each is recorded as one launch costed from the HBM bytes the kernel reports for its
  shapes (kernels: `dino_loss_launch_bytes`, `ema_launch_bytes`), and from their FLOPs too where they multiply
  matrices (`fused_head_loss_launch_cost`, `sinkhorn_launch_cost`).
- Memory: every CUDA storage is counted from allocation to release, rounded up to the caching allocator's 512-byte
  blocks, plus the cuBLAS workspace; the peak is what `torch.cuda.max_memory_allocated` would report, and what held
  memory at that moment is split into weights, gradients, optimizer state, activations (kept from forward), logits
  and loss (allocated in a head's last layer or the loss), inputs and temporaries.
- Backward runs through a small Python autograd engine (`_backward`), not torch's: on a machine without a CUDA
  driver torch's engine refuses CUDA tensors (fake or not) when it collects their streams. It visits the nodes in
  the order of torch's engine (ready nodes by decreasing sequence number), feeds each gradient through the same
  shape and dtype checks, and releases each node's saved tensors right after it ran, as torch's does. That is also
  why `torch.distributed._tools.mem_tracker.MemTracker` is not used: it learns forward from backward through
  module backward hooks, which only torch's engine calls; the allocation tracker here (`_StepTrace`, a
  TorchDispatchMode) follows the same storages.
- Activation checkpointing (model.activation_checkpointing) is torch's own: a checkpointed block's recompute runs
  inside backward under the tracker, so its ops are costed there, while the outputs a selective policy kept are
  answered from the checkpoint's cache (not costed again) and, like the recomputed tensors, freed as torch frees
  them (after the block's backward nodes ran).

What the model ignores: kernel launch latency and host time (see `aten_ops`), caches (every op goes to HBM), kernel
fusion (the step is eager: model.compile and optim.cuda_graph are set off), communication and FSDP2 sharding (one
rank at batch data.batch_size / world_size, all weights on it), the allocator's fragmentation (reserved memory) and
its unsplit block remainders, and the CUDA context (outside the allocator). The official step is modelled as it
was measured on the H100 (shared/gpu/README.md): main_dino.py's defaults, fp16 autocast with GradScaler
(`--use_fp16 True`) unless the config says fp32, its foreach AdamW, explicit attention and per-tensor clipping; its
host reads (`.item()`) are answered with 0 / False: a finite loss, no skipped step, and no tensor clipped (the real
run clips some: at most one small `mul_` each is left out).
"""
import contextlib
import heapq
import itertools
import math
import warnings
import weakref
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from fastdino.engine.config import TrainConfig, apply_overrides
from fastdino.engine.gpus import ALLOCATION_BYTES, FLOP_EFFICIENCY, GPU, GPUS, HBM_EFFICIENCY

GIB = 2**30

_FLOP_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}  # no bytes moved
_PHASE_COUNTS = ("aten_ops", "triton_launches", "launches")
_ROLES = ("weights", "gradients", "optimizer state", "activations", "logits/loss", "inputs", "temporaries", "other")


@dataclass
class _Launch:
    """One op or kernel launch class in the step: counts and totals."""
    count: int = 0
    bytes: int = 0
    flops: int = 0
    ms: float = 0.0


class _StepTrace(TorchDispatchMode):
    """Above FakeTensorMode: costs every aten op on CUDA tensors and follows every CUDA storage (see the module
    docstring). CPU work with no fake tensor in it runs for real (the official MultiCropWrapper computes its crop
    groups with CPU tensors); a host read of a fake value (`.item()`) gets a finite stand-in."""

    def __init__(self, gpu: GPU):
        super().__init__()
        self.gpu = gpu
        self.measuring = False
        self.phase = "build"
        self.in_logits = 0  # depth of modules whose allocations are logits/loss (head last layer, loss)
        self.by_op: dict[str, _Launch] = defaultdict(_Launch)
        # phase -> aten ops, Triton launches and GPU launches (kernels) in it: forward, backward, update (after it)
        self.by_phase: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(_PHASE_COUNTS, 0))
        self.live: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, role)
        self.storages: dict[int, weakref.ref] = {}
        self.totals = dict.fromkeys(_ROLES, 0)
        self.peak, self.peak_roles, self.peak_phase = 0, dict(self.totals), ""
        self.host_reads = 0

    # ------------------------------------------------------------------------------------------- memory
    def _track(self, storage: torch.UntypedStorage, role: str) -> None:
        key = id(storage)
        if key in self.live:
            return
        size = -(-storage.nbytes() // ALLOCATION_BYTES) * ALLOCATION_BYTES
        self.live[key] = (size, role)
        self.storages[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.totals[role] += size
        if self.measuring and sum(self.totals.values()) > self.peak:
            self.peak, self.peak_roles, self.peak_phase = sum(self.totals.values()), dict(self.totals), self.phase

    def _free(self, key: int) -> None:
        size, role = self.live.pop(key)
        self.storages.pop(key)
        self.totals[role] -= size

    def assign(self, tensors, role: str) -> None:
        """Give the storages of `tensors` (CUDA ones) the memory role `role`."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                self._track(t.untyped_storage(), role)
                key = id(t.untyped_storage())
                size, old = self.live[key]
                self.totals[old] -= size
                self.totals[role] += size
                self.live[key] = (size, role)

    def start_measuring(self) -> None:
        """Begin the measured step: the peak starts from what is live now (torch.cuda.reset_peak_memory_stats)."""
        self.measuring = True
        self.by_op.clear()
        self.by_phase.clear()
        self.host_reads = 0
        self.peak, self.peak_roles, self.peak_phase = sum(self.totals.values()), dict(self.totals), self.phase

    def _new_role(self) -> str:
        if self.phase == "forward":
            return "logits/loss" if self.in_logits else "activations"
        return "temporaries" if self.phase in ("backward", "update") else "other"

    # -------------------------------------------------------------------------------------------- ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        if _host_side(func, flat, kwargs):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
            return False if args[0].dtype == torch.bool else 0  # finite: no skipped step; no tensor clipped
        out = func(*args, **kwargs)
        if func.namespace != "aten":
            return out
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type == "cuda"]
        for t in outputs:
            self._track(t.untyped_storage(), self._new_role())
        if self.measuring and not func.is_view:
            self._cost(func, args, kwargs, out, flat, outputs)
        return out

    def _cost(self, func, args, kwargs, out, inputs, outputs) -> None:
        cuda_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.device.type == "cuda"]
        name = func.overloadpacket.__name__
        in_storages = {id(t.untyped_storage()) for t in cuda_inputs}
        aliased = outputs and all(id(t.untyped_storage()) in in_storages for t in outputs)
        if name in _ALLOCATIONS or (aliased and not func._schema.is_mutable):
            nbytes = 0  # an allocation, or a reshape that only relabels its input (_unsafe_view)
        else:
            nbytes = sum(map(_touched_bytes, cuda_inputs)) + sum(map(_touched_bytes, outputs))
        flops = 0
        packet = func.overloadpacket
        if packet not in flop_registry and name.endswith("_"):  # in place (addmm_): the FLOPs of its out-of-place op
            packet = getattr(torch.ops.aten, name[:-1], packet)
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        dtype = next((t.dtype for t in cuda_inputs if t.is_floating_point()), torch.float32)
        self.add(f"aten.{name}", nbytes, flops, dtype, kernels=_foreach_kernels(name, args))

    def add(self, name: str, nbytes: int, flops: int = 0, dtype: torch.dtype = torch.float32, *,
            phase: str | None = None, kernels: int = 1) -> None:
        """Count one launch of `name` moving `nbytes` and doing `flops` (matrix-product FLOPs at `dtype`'s peak), in
        `phase` (default: the current one); `kernels`: the GPU kernels it takes (a foreach op's per-tensor path)."""
        ms = max(nbytes / (self.gpu.hbm_tb_s * 1e12 * HBM_EFFICIENCY),
                 flops / (self.gpu.tflops[_FLOP_DTYPES.get(dtype, "fp32")] * 1e12 * FLOP_EFFICIENCY)) * 1e3
        entry = self.by_op[name]
        entry.count += 1
        entry.bytes += nbytes
        entry.flops += flops
        entry.ms += ms
        counts = self.by_phase[phase or self.phase]
        counts["aten_ops" if name.startswith("aten.") else "triton_launches"] += 1
        if nbytes or flops:
            counts["launches"] += kernels


def _foreach_kernels(name: str, args) -> int:
    """GPU kernels of one aten op: a foreach op over tensor pairs of different shapes (`_foreach_mul_(grads,
    list_of_0d_tensors)`: the per-tensor clip of torch's path) leaves torch's multi-tensor kernel for one kernel
    per tensor; every other op counts as one."""
    if not name.startswith("_foreach_") or len(args) < 2:
        return 1
    first, second = args[0], args[1]
    if (isinstance(second, (list, tuple)) and second and isinstance(second[0], torch.Tensor)
            and any(a.shape != b.shape for a, b in zip(first, second))):
        return len(first)
    return 1


HOST_NUMEL = 4096
"""CPU tensors up to this size are real: host-side bookkeeping (the official code's crop-size list, its drop-path
rates) runs as written; larger CPU tensors, weights being initialised before they move to the GPU, are fake."""


def _host_side(func, flat_args, kwargs) -> bool:
    """Whether an op is host-side work to run for real: no fake tensor in it, on the CPU, and small."""
    if any(isinstance(t, FakeTensor) for t in flat_args):
        return False
    device = kwargs.get("device")
    if device is not None and torch.device(device).type != "cpu":
        return False
    tensors = [t for t in flat_args if isinstance(t, torch.Tensor)]
    if tensors:
        return True  # real CPU inputs
    size = next((a for a in flat_args if isinstance(a, (list, tuple, torch.Size))), None)  # a factory's shape
    return size is None or math.prod(size) <= HOST_NUMEL


def _touched_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of `t` (a broadcast dimension, stride 0, is read once)."""
    return math.prod(n for n, s in zip(t.shape, t.stride()) if s != 0) * t.element_size()


def _gpu_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` as the GPU dispatches it for these inputs (the module docstring says why):
    flash attention for bf16/fp16, memory-efficient attention for fp32, after autocast's cast of q, k, v."""
    if attn_mask is not None or dropout_p or enable_gqa:
        raise NotImplementedError("the step model costs SDPA without mask, dropout or grouped queries only")
    if torch.is_autocast_enabled("cuda"):  # SDPA is on autocast's lower-precision list
        low = torch.get_autocast_dtype("cuda")
        q, k, v = (x.to(low) for x in (q, k, v))
    with torch.autocast("cuda", enabled=False):
        if q.dtype in _FLOP_DTYPES:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal,
                                                                       scale=scale)[0]


class _Backward:
    """`torch.autograd.backward` for the fake CUDA step (see the module docstring): torch's engine order, saved
    tensors released after their node ran. Saved tensors are packed into one-element lists by saved-tensor hooks
    that stay on for the whole step (`hooks`), so that a node's can be emptied once it has run."""

    def __init__(self, trace: _StepTrace):
        self.trace = trace
        self.unpacked: list[list] = []

    def _pack(self, t):
        return [t]

    def _unpack(self, box):
        if not torch.is_grad_enabled():  # else a checkpointed block's recompute reads the inputs it saved
            self.unpacked.append(box)
        return box[0]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __call__(self, tensors, grad_tensors, retain_graph=None, create_graph=False, inputs=None,
                 allow_unreachable=True, accumulate_grad=True):
        if create_graph or inputs or not accumulate_grad:
            raise NotImplementedError("the step model runs plain .backward() only")
        buffers: dict = {}
        roots = []
        for t, g in zip(tensors, grad_tensors):
            node = t.grad_fn
            buffers.setdefault(node, [None] * len(node._input_metadata))[t.output_nr] = g
            roots.append(node)
        dependencies = defaultdict(int)
        seen, stack = set(roots), list(roots)
        while stack:
            for following, _ in stack.pop().next_functions:
                if following is not None:
                    dependencies[following] += 1
                    if following not in seen:
                        seen.add(following)
                        stack.append(following)
        order = itertools.count()
        ready = [(-n._sequence_nr(), next(order), n) for n in set(roots) if not dependencies[n]]
        heapq.heapify(ready)
        previous, self.trace.phase = self.trace.phase, "backward"
        # One group: a checkpointed block is recomputed once per backward, as under torch's engine's graph task.
        group = getattr(torch.utils.checkpoint, "GraphExecGroup", contextlib.nullcontext)
        with torch.no_grad(), group():
            while ready:
                node = heapq.heappop(ready)[2]
                outputs = self._run(node, buffers.pop(node, None) or [])
                for (following, slot), grad in zip(node.next_functions, outputs):
                    if following is None:
                        continue
                    if grad is not None:
                        grad = _as_input(grad, following._input_metadata[slot])
                        buffer = buffers.setdefault(following, [None] * len(following._input_metadata))
                        buffer[slot] = grad if buffer[slot] is None else buffer[slot] + grad
                    dependencies[following] -= 1
                    if not dependencies[following]:
                        heapq.heappush(ready, (-following._sequence_nr(), next(order), following))
        self.trace.phase = "update" if previous == "forward" else previous

    def _run(self, node, grads: list) -> tuple:
        """Apply one node to its input gradients; its saved tensors are released afterwards."""
        if all(g is None for g in grads):
            return (None,) * len(node.next_functions)
        if type(node).__name__ == "AccumulateGrad":
            param = node.variable
            if param.grad is None:
                param.grad = grads[0]  # torch's engine steals the incoming gradient as well
            else:
                param.grad += grads[0]
            self.trace.assign([param.grad], "gradients")
            return ()
        self.unpacked = []
        if hasattr(node, "_forward_cls"):  # a custom autograd.Function: its backward, as PyNode::apply calls it
            grads = [torch.zeros(m.shape, dtype=m.dtype, device=m.device) if g is None and getattr(node, "materialize_grads", True)
                     else g for g, m in zip(grads, node._input_metadata)]
            outputs = node.apply(*grads)
            try:
                node.saved_tensors  # noqa: B018 (unpacked, so that they are released below, as torch's engine does)
            except torch.utils.checkpoint.CheckpointError:
                pass  # a checkpointed block's: read once, by the backward, and released by the checkpoint
        else:
            outputs = node(*grads)
        for box in self.unpacked:
            box[0] = None
        return outputs if isinstance(outputs, tuple) else (outputs,)


def _as_input(grad: torch.Tensor, meta) -> torch.Tensor:
    """What torch's engine does to a gradient before it reaches a node (validate_outputs): sum broadcast
    dimensions away and cast to the input's dtype."""
    if grad.shape != meta.shape:
        grad = grad.sum_to_size(meta.shape)
    return grad.to(meta.dtype) if grad.dtype != meta.dtype else grad


def _dtype_bytes(tl_dtype) -> int:
    return tl_dtype.primitive_bitwidth // 8


def _kernel_launches(trace: _StepTrace, launches: list[tuple[str, dict]]) -> None:
    """Cost the recorded Triton launches from the bytes the kernels report (kernels/*.py `*_launch_bytes`), each in
    the phase it was launched in. The loss's combine kernel takes the shapes of the forward kernel launched right
    before it."""
    from fastdino.kernels import (adamw, clip, dino_loss_launch_bytes, ema, ema_launch_bytes,
                                  fused_head_loss_launch_cost, gelu_mlp_launch_bytes, sinkhorn_launch_cost,
                                  weight_norm_bwd_bytes)

    loss_bytes = None
    for name, args in launches:
        phase = args["_phase"]
        if name == "_ema_update_kernel":  # whole blocks per program: the last block of each tensor is counted full
            numel = args["table_ptr"].shape[0] * ema.BLOCK
            trace.add(f"triton.{name}", ema_launch_bytes(numel, _dtype_bytes(args["T_DTYPE"]),
                                                         _dtype_bytes(args["S_DTYPE"]))[name], phase=phase)
        elif name == "_clip_coefficients_kernel":
            numel = args["table_ptr"].shape[0] * clip.BLOCK
            trace.add(f"triton.{name}", clip.clip_launch_bytes(numel, _dtype_bytes(args["G_DTYPE"]))[name],
                      phase=phase)
        elif name == "_adamw_kernel":
            numel = args["table_ptr"].shape[0] * adamw.BLOCK
            trace.add(f"triton.{name}", adamw.adamw_launch_bytes(numel)[name], phase=phase)
        elif name == "_step_stats_kernel":  # the center read and written (on a skipped step)
            trace.add(f"triton.{name}", 8 * args["n_center"] + 64, phase=phase)
        elif name in ("_dino_loss_fwd_kernel", "_dino_loss_bwd_kernel"):
            loss_bytes = dino_loss_launch_bytes(args["n_batch"], args["n_crops"], args["n_cols"],
                                                args["s_ptr"].element_size(), args["t_ptr"].element_size())
            trace.add(f"triton.{name}", loss_bytes[name], phase=phase)
        elif name == "_dino_loss_combine_kernel":  # launched right after the forward kernel
            trace.add(f"triton.{name}", loss_bytes[name], phase=phase)
        elif name in ("_fused_head_loss_fwd_kernel", "_fused_head_loss_bwd_kernel"):
            features = args["hs_ptr"]
            nbytes, flops = fused_head_loss_launch_cost(
                "crops" if args["CROPS"] else "rows", args["n_images"], args["n_crops"], args["n_cols"],
                args["n_dim"], features.element_size(), args["vs_ptr"].element_size(),
                args["col_stop"] - args["col_start"] if "col_stop" in args else None)[name]
            trace.add(f"triton.{name}", nbytes, flops, features.dtype, phase=phase)
        elif name == "_weight_norm_bwd_kernel":
            trace.add(f"triton.{name}", weight_norm_bwd_bytes(
                args["n_rows"], args["n_dim"], args["u_ptr"].element_size(), args["v_ptr"].element_size()),
                phase=phase)
        elif name in ("_sinkhorn_col_kernel", "_sinkhorn_row_kernel"):
            features = args["h_ptr"]
            nbytes, flops = sinkhorn_launch_cost(args["n_rows"], args["n_cols"], args["n_dim"],
                                                 features.element_size(), args["v_ptr"].element_size())[name]
            trace.add(f"triton.{name}", nbytes, flops, features.dtype, phase=phase)
        elif name == "_gelu_mlp_bwd_kernel":
            trace.add(f"triton.{name}", gelu_mlp_launch_bytes(args["n_rows"], args["n_cols"],
                                                              args["h_ptr"].element_size(), args["HAS_SCALE"]),
                      phase=phase)
        else:
            raise NotImplementedError(f"the step model has no byte count for the Triton kernel {name}")


@contextlib.contextmanager
def _patched(obj, name: str, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@dataclass(frozen=True)
class _TensorInfo:
    """What the launch costs read of a tensor argument of a recorded Triton launch."""
    shape: torch.Size
    dtype: torch.dtype

    def element_size(self) -> int:
        return self.dtype.itemsize


@contextlib.contextmanager
def _fake_cuda(gpu: GPU):
    """A context in which CUDA tensors are fake and every op and allocation lands in the yielded _StepTrace, every
    Triton launch in the yielded list of (kernel name, arguments by name). What it switches, and why, is in the module docstring; besides: CUDA
    autocast and GradScaler are told that CUDA exists, `torch.cuda.synchronize` returns at once, and fake tensors
    are not memoised (a memo's weak reference would stop `nn.Module.to_empty` from swapping a parameter)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches: list[tuple[str, dict]] = []

    def launch(kernel, *args, grid=None, warmup=False, **kwargs):
        names = kernel.arg_names if hasattr(kernel, "arg_names") else kernel.fn.__code__.co_varnames
        # Tensors as their shape and dtype only: a kept reference would keep the buffer alive in the memory model.
        described = {name: _TensorInfo(a.shape, a.dtype) if isinstance(a, torch.Tensor) else a
                     for name, a in zip(names, args)}
        launches.append((kernel.fn.__name__, described | kwargs | {"_phase": trace.phase}))

    trace = _StepTrace(gpu)
    backward = _Backward(trace)
    with contextlib.ExitStack() as stack:
        for obj, name, value in [
            (torch.cuda.amp.common, "amp_definitely_not_available", lambda: False),
            (torch.cuda, "is_bf16_supported", lambda *a, **k: True),
            (torch.cuda, "synchronize", lambda *a, **k: None),
            (JITFunction, "run", launch),
            (InterpretedFunction, "run", launch),
            (FakeTensorConverter, "set_tensor_memo", lambda *a: None),
            (torch.autograd, "_engine_run_backward", backward),
            (F, "scaled_dot_product_attention", _gpu_sdpa),
        ]:
            stack.enter_context(_patched(obj, name, value))
        stack.enter_context(warnings.catch_warnings())
        # The EMA's launch plan reads data pointers (0 for fake tensors; the launches are recorded, not run).
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        # torch >= 2.12: selective checkpointing's kept outputs bypass the saved-tensor hooks above (`_Backward`),
        # as wanted (the checkpoint releases them itself), and torch warns that a later release will not.
        warnings.filterwarnings("ignore", message="A saved_tensors_hooks context", category=FutureWarning)
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(trace)
        stack.enter_context(backward.hooks())
        yield trace, launches


def _logit_hooks(trace: _StepTrace, loss: torch.nn.Module, *models: torch.nn.Module) -> contextlib.ExitStack:
    """Forward hooks that mark what the heads' last layers and the loss allocate as logits/loss."""
    def enter(*_):
        trace.in_logits += 1

    def leave(*_):
        trace.in_logits -= 1

    stack = contextlib.ExitStack()
    for model in models:
        for name, module in model.named_modules():
            if name.endswith("last_layer"):
                stack.enter_context(module.register_forward_pre_hook(enter))
                stack.enter_context(module.register_forward_hook(leave))
    stack.enter_context(loss.register_forward_pre_hook(enter))
    stack.enter_context(loss.register_forward_hook(leave))
    return stack


def _in_phases(trace: _StepTrace, step):
    """`step` marking its phases for the tracker: forward until backward starts (`_Backward` sets backward, then
    update), other after it."""
    def run(*args):
        trace.phase = "forward"
        try:
            return step(*args)
        finally:
            trace.phase = "other"
    return run


def _crops(cfg: TrainConfig, trace: _StepTrace) -> list[torch.Tensor]:
    """This rank's batch of crops on the GPU (2 global, then the local ones), counted as inputs."""
    d = cfg.data
    sizes = [d.global_crops_size] * 2 + [d.local_crops_size] * d.local_crops_number
    crops = [torch.empty(d.batch_size, 3, s, s, device="cuda") for s in sizes]
    trace.assign(crops, "inputs")
    return crops


def _masks(cfg: TrainConfig, trace: _StepTrace):
    """With iBOT, the batch's masks at their static upper bound of masked patches (shapes are all the model reads),
    counted as inputs; else None."""
    from fastdino.engine.train import masking_config
    from fastdino.pipelines.masking import MaskBatch

    masking = masking_config(cfg)
    if masking is None:
        return None
    n_crops, bound = 2 * cfg.data.batch_size, masking.upper_bound(2 * cfg.data.batch_size)
    masks = MaskBatch(torch.zeros(n_crops, masking.n_tokens, dtype=torch.bool, device="cuda"),
                      torch.zeros(bound, dtype=torch.int64, device="cuda"), torch.zeros(bound, device="cuda"),
                      torch.full((1,), bound, device="cuda"), bound)
    trace.assign([masks.masks, masks.indices, masks.weights, masks.n_masked], "inputs")
    return masks


def _summary(trace: _StepTrace, batch: int, gpu: GPU, extra: dict) -> dict:
    ops = sorted(trace.by_op.items(), key=lambda item: -item[1].bytes)
    aten = {name: e for name, e in ops if name.startswith("aten.")}
    step_ms = sum(e.ms for _, e in ops)
    flops = sum(e.flops for _, e in ops)
    workspace = gpu.cublas_workspace_mib * 2**20 if any(e.flops for e in aten.values()) else 0
    roles = {role: size / GIB for role, size in trace.peak_roles.items() if size}
    roles["cublas workspace"] = workspace / GIB
    return {
        "peak_gib": (trace.peak + workspace) / GIB,
        "step_ms": step_ms,
        "img_per_s": batch / step_ms * 1e3,
        "gflop_per_image": flops / batch / 1e9,
        "aten_ops": sum(e.count for e in aten.values()),
        "launches": sum(counts["launches"] for counts in trace.by_phase.values()),
        "by_phase": {phase: dict(counts) for phase, counts in trace.by_phase.items()},
        "host_reads": trace.host_reads,
        "batch_per_rank": batch,
        "peak_phase": trace.peak_phase,
        "peak_by_role_gib": roles,
        "gbytes": sum(e.bytes for _, e in ops) / 1e9,
        "by_op": {name: {"count": e.count, "gbytes": e.bytes / 1e9, "gflop": e.flops / 1e9, "ms": e.ms}
                  for name, e in ops},
        **extra,
    }


def _model_facts(gpu_name: str) -> dict:
    gpu = GPUS[gpu_name]
    return {"gpu": {"name": gpu.name, "tflops": gpu.tflops, "hbm_tb_s": gpu.hbm_tb_s, "source": gpu.source},
            "flop_efficiency": FLOP_EFFICIENCY, "hbm_efficiency": HBM_EFFICIENCY,
            "allocation_bytes": ALLOCATION_BYTES}


def _second_step(trace: _StepTrace, launches: list, step, loss, student, teacher, optimizer) -> None:
    """Run `step(i)` twice and measure the second: optimizer state and caches exist, as in a run."""
    step = _in_phases(trace, step)
    with _logit_hooks(trace, loss, student, teacher):
        step(0)
        _retag(trace, list(student.parameters()), list(teacher.parameters()), optimizer)
        trace.start_measuring()
        launches.clear()
        step(1)
    _kernel_launches(trace, launches)


def _retag(trace: _StepTrace, student_params: list, teacher_params: list, optimizer) -> None:
    """Before the measured step, what is live is weights, gradients, optimizer state, inputs or other (the
    center, caches, ...)."""
    for key, (size, role) in list(trace.live.items()):
        if role != "inputs":
            trace.totals[role] -= size
            trace.totals["other"] += size
            trace.live[key] = (size, "other")
    trace.assign(student_params + teacher_params, "weights")
    trace.assign([p.grad for p in student_params if p.grad is not None], "gradients")
    trace.assign([t for state in optimizer.state.values() for t in state.values()], "optimizer state")


def _fastdino_step(cfg: TrainConfig, gpu: GPU) -> dict:
    from fastdino.engine.train import Trainer

    steps_per_epoch = 1000
    with _fake_cuda(gpu) as (trace, launches):
        trainer = Trainer(cfg, steps_per_epoch, device=torch.device("cuda"))
        trainer.step = math.ceil(cfg.optim.freeze_last_layer_epochs) * steps_per_epoch  # the full update
        crops, masks = _crops(cfg, trace), _masks(cfg, trace)
        _second_step(trace, launches, lambda i: trainer.train_step(crops, masks), trainer.loss_fn, trainer.student,
                     trainer.teacher, trainer.optimizer)
        return _summary(trace, cfg.data.batch_size, gpu, {"precision": trainer.precision.name})


def _official_step(cfg: TrainConfig, gpu: GPU) -> dict:
    from fastdino import official_dino

    use_fp16 = cfg.parallel.precision != "fp32"
    with _fake_cuda(gpu) as (trace, launches):
        run = official_dino.build(official_dino.args_from_config(cfg, use_fp16=use_fp16), 1000, "cuda")
        crops = _crops(cfg, trace)
        # Epoch 1: the last layer is trained (main_dino.py freezes it in epoch 0).
        _second_step(trace, launches, lambda i: official_dino.train_step(run, crops, 1000 + i, 1), run.dino_loss,
                     run.student, run.teacher, run.optimizer)
        return _summary(trace, cfg.data.batch_size, gpu, {"precision": "fp16" if use_fp16 else "fp32"})


FORMULATIONS = {"fastdino": _fastdino_step, "official": _official_step}


def estimate_ops(build, run, gpu: str = "h100") -> dict:
    """The same model for any CUDA computation, not only the training step (benchmarks/model_head_loss.py):
    `build()` returns its inputs (CUDA tensors, created inside the model's fake CUDA, counted as "inputs"), and
    `run(*inputs)` runs it, backward included (`.backward()` on its result). Returns what `estimate_step` returns
    per formulation (peak_gib with the inputs, step_ms, by_op, peak_by_role_gib, ...); "inputs_gib" is what the
    inputs hold, so peak_gib - inputs_gib is the computation's own memory (gradients of the inputs included)."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    with _fake_cuda(GPUS[gpu]) as (trace, launches):
        inputs = build()
        trace.assign(inputs, "inputs")
        inputs_gib = trace.totals["inputs"] / GIB
        trace.start_measuring()
        trace.phase = "forward"
        run(*inputs)
        trace.phase = "other"
        _kernel_launches(trace, launches)
        return _summary(trace, 1, GPUS[gpu], {"inputs_gib": inputs_gib})


def estimate_step(cfg: TrainConfig, gpu: str = "h100", *, world_size: int = 1,
                  which: tuple[str, ...] = ("fastdino", "official")) -> dict:
    """The step model for `cfg` on one of `world_size` ranks (per-rank batch data.batch_size / world_size) of GPU
    `gpu` (a key of GPUS): {"fastdino": {...}, "official": {...}} (the formulations named in `which`), each with
    peak_gib (what torch.cuda.max_memory_allocated would read), step_ms and img_per_s (roofline, per rank),
    gflop_per_image, aten_ops (non-view aten ops of one step), launches (GPU kernels: aten ops moving bytes, a
    foreach op off torch's multi-tensor path once per tensor, Triton launches), by_phase (aten_ops,
    triton_launches and launches of the forward, backward and update phases), host_reads, peak_by_role_gib (what holds
    the peak), by_op (count, GB, GFLOP and ms per aten op or Triton kernel, most bytes first) and the model's
    constants (gpu, efficiencies). The step is eager (model.compile and optim.cuda_graph set off) and
    single-rank. The module docstring has the method and what it ignores."""
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if cfg.data.batch_size % world_size:
        raise ValueError(f"world_size ({world_size}) must divide data.batch_size ({cfg.data.batch_size})")
    if not which or set(which) - set(FORMULATIONS):
        raise ValueError(f"which must name some of {sorted(FORMULATIONS)}, got {which!r}")
    cfg = apply_overrides(cfg, overrides=[f"data.batch_size={cfg.data.batch_size // world_size}",
                                          "model.compile=false", "optim.cuda_graph=false", "parallel.mode=single"])
    facts = _model_facts(gpu)
    return {name: FORMULATIONS[name](cfg, GPUS[gpu]) | facts for name in which}
