"""optim.cuda_graph: the step's part after backward (`true`, PostBackwardGraphs) or the whole step (`step`,
StepGraph) replayed as CUDA graphs; `auto` is `true` on CUDA outside FSDP2.

What a capture freezes, and how this module keeps it live:
- Addresses: the gradients stay allocated (zeroed in place instead of freed), the crops (step) or the loss, the
  teacher entropy and the center snapshot (true) are copied into static tensors before each replay.
- Per-step values: the learning rate, weight decay and teacher momentum live in the trainer's `schedule_values`,
  a (3,) device tensor the host fills before each replay. The Triton update (update.py) reads them there; torch's
  fused AdamW takes its lr as that tensor, but its weight decay is a float baked into the launch, so on that path
  AdamW runs without it and the decay p <- p * (1 - lr * wd), which AdamW applies before its update, is done first
  by `Trainer.after_backward`, masked off on skipped steps as AdamW's found_inf masks its own.
- Which parameters update: while the head's last layer is frozen its gradients are None and AdamW leaves it
  alone, so there is one graph per state of the freeze (the freeze ends once per run). The whole step also bakes
  in the teacher temperature (a float of the loss kernels): StepGraph keys its graph on (freeze, temperature),
  runs eagerly while the key changes every step (the per-step temperature warmup) and captures once a key repeats.
The first step of each kind runs eagerly on a side stream (AdamW and the norm allocate their workspaces, the
Triton launch plans are built), the second captures and replays; later ones replay. Captured collectives (the
global gradient norm under FSDP2) need NCCL; that path is measured on a GPU (benchmarks/bench_train_step.py
--cuda-graph).
"""
import torch

from fastdino.engine.config import CUDA_GRAPH_MODES


def resolve_cuda_graph(setting: str, device: torch.device, mode: str, plain: bool = True) -> str:
    """optim.cuda_graph as the trainer runs it: "false", "true" or "step"; ValueError for graphs off CUDA. "auto"
    is true on CUDA outside FSDP2 for DINO's step with one lr (`plain`, config.plain_update)."""
    if setting not in CUDA_GRAPH_MODES:
        raise ValueError(f"optim.cuda_graph must be one of {CUDA_GRAPH_MODES}, got {setting!r}")
    if setting == "auto":
        return "true" if device.type == "cuda" and mode != "fsdp" and plain else "false"
    if setting != "false" and device.type != "cuda":
        raise ValueError(f"optim.cuda_graph={setting} needs a CUDA device, this run is on {device.type}; "
                         f"set optim.cuda_graph=false")
    return setting


class _Graphs:
    """Warm-up, capture and replay of one function per key, and the schedule the graphs read."""

    def __init__(self, trainer, capture: bool):
        self.trainer, self.capture = trainer, capture
        self.lr, self.weight_decay, self.momentum = trainer.schedule_values.unbind()  # views: what the graphs read
        self.graphs: dict = {}  # key -> graph; None: warmed up only
        self.pool = None

    def reset(self) -> None:
        """Forget the graphs (after a checkpoint load): the next steps warm up and capture again."""
        self.graphs.clear()

    def set_schedule(self) -> None:
        """Point torch's AdamW at the schedule tensor (again each step: loading a checkpoint replaces the groups)."""
        for group in self.trainer.optimizer.param_groups:
            group["lr"], group["weight_decay"], group["capturable"] = self.lr, 0.0, True

    def _replay(self, key, function) -> None:
        if not self.capture:
            function()
        elif key not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                function()
            torch.cuda.current_stream().wait_stream(stream)
            self.graphs[key] = None
        elif self.graphs[key] is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                function()
            self.pool = graph.pool()
            self.graphs[key] = graph
            graph.replay()
        else:
            self.graphs[key].replay()

    def update(self, loss, entropy, center) -> None:
        """`Trainer.after_backward` reading the schedule from the device."""
        self.trainer.after_backward(loss, entropy, center, self.momentum, lr=self.lr, weight_decay=self.weight_decay)


class PostBackwardGraphs(_Graphs):
    """optim.cuda_graph=true: static inputs and the captured graphs of `trainer.after_backward`, one per last-layer
    freeze state."""

    def __init__(self, trainer, *, capture: bool = True):
        """capture=False runs the same update eagerly from the same static tensors (tests of it on the CPU)."""
        super().__init__(trainer, capture)
        device = trainer.device
        self.loss, self.entropy = torch.zeros(2, device=device).unbind()
        self.center = trainer.loss_fn.center.clone()

    def run(self, loss: torch.Tensor, center: torch.Tensor, frozen: bool) -> None:
        """After backward: copy the step's inputs into place, then warm up, capture or replay."""
        self.loss.copy_(loss.detach())
        self.entropy.copy_(self.trainer.loss_fn.last_teacher_entropy)
        self.center.copy_(center)
        self._replay(frozen, lambda: self.update(self.loss, self.entropy, self.center))


class StepGraph(_Graphs):
    """optim.cuda_graph=step: the whole step (forward, loss, backward, update) as one graph per (last-layer freeze,
    teacher temperature), replayed from static crops."""

    def __init__(self, trainer, *, capture: bool = True):
        """capture=False runs the same step eagerly from the same static tensors (tests of it on the CPU)."""
        super().__init__(trainer, capture)
        self.crops: list[torch.Tensor] | None = None
        self.last_key = None

    def run(self, crops: list[torch.Tensor], values) -> None:
        """Copy the crops into the static ones, then run, capture or replay the step for `values` (schedules.py)."""
        if self.crops is None or [c.shape for c in crops] != [c.shape for c in self.crops]:
            self.crops = [c.to(self.trainer.device, copy=True) for c in crops]  # new shapes: new graphs
            self.graphs.clear()
        else:
            for static, crop in zip(self.crops, crops):
                static.copy_(crop, non_blocking=True)
        key = (values.freeze_last_layer, values.teacher_temp)
        if key != self.last_key and self.last_key is not None and key not in self.graphs:
            self.graphs.clear()  # a schedule moved on: the old graph will not come back (its memory is freed)
        self.last_key = key
        self._replay(key, lambda: self.trainer.device_step(self.crops, values))
