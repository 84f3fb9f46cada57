"""The step's part after backward (unscale, clip, AdamW, EMA, center, counters) replayed as CUDA graphs.

That part is ~a dozen foreach/fused launches over every parameter plus a few dozen tiny ones, and no host
decision: `Trainer.after_backward` is written so that it can be captured (device-only, every state tensor
updated in place). What a capture freezes, and how this module keeps it live:
- Addresses: the gradients stay allocated (zeroed in place instead of freed), and the loss, the teacher entropy
  and the center snapshot are copied into static tensors before each replay.
- Per-step values: the learning rate, weight decay and teacher momentum live in 0-d device tensors that the host
  fills before each replay. AdamW takes its lr as that tensor (fused AdamW reads a tensor lr on the device);
  its weight decay is a float baked into the launch, so AdamW runs without it and the decay
  p <- p * (1 - lr * wd), which AdamW applies before its update, is done first by `after_backward`, masked off
  on skipped steps as AdamW's found_inf masks its own.
- Which parameters update: while the head's last layer is frozen its gradients are None and AdamW leaves it
  alone, so there is one graph per state of the freeze (the freeze ends once per run).
The first step of each kind runs eagerly on a side stream (AdamW and the norm allocate their workspaces), the
second captures and replays; later ones replay. Captured collectives (the global gradient norm under FSDP2)
need NCCL; that path is measured on a GPU (benchmarks/bench_train_step.py --cuda-graph).
"""
import torch


class PostBackwardGraphs:
    """Static inputs and the captured graphs of `trainer.after_backward`, one per last-layer freeze state."""

    def __init__(self, trainer, *, capture: bool = True):
        """capture=False runs the same update eagerly from the same static tensors (tests of it on the CPU)."""
        if capture and trainer.device.type != "cuda":
            raise ValueError(f"optim.cuda_graph=true needs a CUDA device, this run is on {trainer.device.type}; "
                             f"set optim.cuda_graph=false")
        self.trainer, self.capture = trainer, capture
        device = trainer.device
        self.lr, self.weight_decay, self.momentum, self.loss, self.entropy = torch.zeros(5, device=device).unbind()
        self.center = trainer.loss_fn.center.clone()
        self.graphs: dict[bool, torch.cuda.CUDAGraph | None] = {}  # freeze state -> graph; None: warmed up only
        self.pool = None

    def reset(self) -> None:
        """Forget the graphs (after a checkpoint load): the next steps warm up and capture again."""
        self.graphs.clear()

    def set_schedule(self, values) -> None:
        """The step's lr, weight decay and momentum into the static tensors the graphs read."""
        self.lr.fill_(values.lr)
        self.weight_decay.fill_(values.weight_decay)
        self.momentum.fill_(values.teacher_momentum)
        for group in self.trainer.optimizer.param_groups:  # again each step: loading a checkpoint replaces them
            group["lr"], group["weight_decay"], group["capturable"] = self.lr, 0.0, True

    def run(self, loss: torch.Tensor, center: torch.Tensor, frozen: bool) -> None:
        """After backward: copy the step's inputs into place, then warm up, capture or replay."""
        self.loss.copy_(loss.detach())
        self.entropy.copy_(self.trainer.loss_fn.last_teacher_entropy)
        self.center.copy_(center)
        update = self._update
        if not self.capture:
            update()
        elif frozen not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                update()
            torch.cuda.current_stream().wait_stream(stream)
            self.graphs[frozen] = None
        elif self.graphs[frozen] is None:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                update()
            self.pool = graph.pool()
            self.graphs[frozen] = graph
            graph.replay()
        else:
            self.graphs[frozen].replay()

    def _update(self) -> None:
        self.trainer.after_backward(self.loss, self.entropy, self.center, self.momentum, lr=self.lr,
                                    weight_decay=self.weight_decay)
