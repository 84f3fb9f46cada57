"""Ctrl-C (SIGINT) and SIGTERM stop a run cleanly: the current step finishes, a checkpoint is written, one line says
so, and the process exits with 128 + the signal number (130, 143), as shells and schedulers expect. A second
Ctrl-C aborts at once (the last checkpoint written stays the one to resume from).

The handler only records the signal while training steps run (`training_steps()`); the loop asks `agreed()`
between steps. Outside them (listing the data, building, the evaluation at the end) there is no step to finish
and nothing unsaved, so a signal ends the process at once with one line: a setup blocked on a hung filesystem
must not swallow SIGTERM. Under torchrun the ranks must stop
after the same step, since the checkpoint is collective, and the signal may reach only some of them (a scheduler
signals one node, a terminal's Ctrl-C reaches every process at slightly different times). So the ranks all-reduce
the flag, but only at log steps: a log step already waits for the device to read the step statistics, so one more
collective of one integer there costs nothing, while a flag combined every step would add a host-device round trip
and a collective to every step. The stop then waits at most `log_every` steps (a second or two at the usual
values), well within the ~30 s a scheduler or torchrun gives between SIGTERM and SIGKILL.
"""
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class StopRequest:
    """Records SIGINT / SIGTERM while `handling()` is active."""

    def __init__(self):
        self.signum: int | None = None
        self.training = False  # inside training_steps()

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @contextmanager
    def handling(self):
        """Install the handlers (main thread only: elsewhere Python cannot), and restore the previous ones."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def training_steps(self):
        """While inside, a signal is recorded for the loop to stop after the step (with a checkpoint)."""
        self.training = True
        try:
            yield self
        finally:
            self.training = False

    def _handle(self, signum, _frame) -> None:
        if not self.training and self.signum is None:
            sys.stderr.write(f"fastdino: stopped by {signal.Signals(signum).name} outside the training steps: "
                             f"nothing to checkpoint; rerun the same command to go on\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        if self.signum is not None:
            if signum == signal.SIGINT:  # the user insists: no step, no checkpoint
                sys.stderr.write("fastdino: aborted by a second Ctrl-C; rerun the same command to resume from the "
                                 "last checkpoint\n")
                sys.stderr.flush()
                os._exit(128 + signum)
            return
        self.signum = signum
        logger.warning("%s received: finishing this step and saving a checkpoint%s", signal.Signals(signum).name,
                       " (Ctrl-C again to abort at once)" if signum == signal.SIGINT else "")

    def agreed(self, group=None, device: torch.device | None = None) -> bool:
        """Whether any rank was signalled; collective under torch.distributed (every rank must call it at the same
        step). Takes the signal of the signalled rank, so every rank exits with the same code."""
        if group is None:
            return self.signum is not None
        flag = torch.tensor(self.signum or 0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        self.signum = int(flag) or None
        return self.signum is not None
