"""Shared pieces of the benchmark scripts: the header, the timer and the result table (saved row by row).

Every script prints the device, the library versions and the dtype first, then one row per measurement.
Timing uses triton.testing.do_bench on the GPU (median and 20/80 % quantiles over many runs); on the CPU a plain
wall-clock loop stands in so that the scripts can be smoke-tested anywhere.
"""
import argparse
import contextlib
import csv
import os
import platform
import statistics
import time
from typing import Callable

import torch


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    return parser


def start(args) -> tuple[torch.device, torch.dtype]:
    """Device and dtype from the arguments, after printing the header. On the CPU the Triton kernels must run in the
    interpreter, which is chosen when they are defined: import fastdino.kernels after this call."""
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = getattr(torch, args.dtype)
    print_header(str(device), dtype)
    return device, dtype


def print_header(device: str, dtype: torch.dtype) -> None:
    import triton

    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else platform.processor() or "cpu"
    print(f"# device: {name} | torch {torch.__version__} | triton {triton.__version__} | dtype {dtype}")


def measure_ms(fn: Callable[[], object], device: str, grad_to_none=None, warmup: int = 3, reps: int = 10):
    """(p50, p20, p80) milliseconds of `fn`."""
    if str(device).startswith("cuda"):
        from triton.testing import do_bench

        return tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none))
    return _time_calls(fn, reps, warmup, scale=1e3)


@contextlib.contextmanager
def launches_mocked():
    """Every Triton kernel launch (`kernel[grid](...)`) returns at once without running: what remains of a launcher
    call is its host side (checks, plans, allocations, the autograd node), which is what `host_us` times."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
    for cls in saved:
        cls.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        for cls, run in saved.items():
            cls.run = run


def host_us(fn: Callable[[], object], reps: int = 2000, warmup: int = 50) -> tuple[float, float, float]:
    """(p50, p20, p80) microseconds of host time per call of `fn` with kernel launches mocked (CPU tensors work)."""
    with launches_mocked():
        return _time_calls(fn, reps, warmup, scale=1e6)


def _time_calls(fn: Callable[[], object], reps: int, warmup: int, scale: float) -> tuple[float, float, float]:
    """(p50, p20, p80) of `reps` timed calls of `fn` after `warmup` untimed ones, in seconds times `scale`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * scale)
    q = statistics.quantiles(times, n=10, method="inclusive")  # no extrapolation past the samples
    return statistics.median(times), q[1], q[7]


def peak_memory_gib(fn: Callable[[], object], device: str) -> float:
    """Peak memory allocated while running `fn` once, in GiB (NaN off the GPU)."""
    if not str(device).startswith("cuda"):
        fn()
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


class Table:
    """Rows printed as they come, in aligned columns, and written to `csv_path` (when given) after each one, so that
    a run stopped part-way keeps every row it finished."""

    def __init__(self, columns: list[str], csv_path: str | None = None):
        self.columns, self.csv_path = columns, csv_path
        self.rows: list[dict] = []
        print(" | ".join(f"{c:>12}" for c in columns))

    def add(self, **row) -> None:
        self.rows.append(row)
        cells = [f"{row[c]:>12.4g}" if isinstance(row[c], float) else f"{str(row[c]):>12}" for c in self.columns]
        print(" | ".join(cells), flush=True)
        if self.csv_path:
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(self.rows)
