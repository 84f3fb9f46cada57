"""One prepared GPU check: every GPU-only test and every GPU figure of fastdino, as steps in priority order that each
save their results as they go, ending in one markdown table and one JSON file.

A GPU is lent to some sessions only, for 15 minutes in all, the machine's start included (DEVELOPERS.md says when
and how to run this). Two self-contained plans, each one stage of steps within one budget:
- stage 1, the first call of a loan (`gpu_check.sh 1`, 540 s): first, in this order, the kernels' correctness on CUDA
  (compiled Triton against the torch references, fp32/fp16/bf16, the step's shapes), the train-step table at batch
  128 (the official formulation, fastdino eager, with selective activation checkpointing, compiled: img/s, MFU, peak
  GiB), the same at batch 64 (not selective), the
  DINO loss, fused-head and EMA benchmarks; then, with what is left: the GPU-only tests at large, a short quality
  run on the CIFAR-10 subset carried in .gpu_data/ (k-NN before and after), the ViT-S/8 and ViT-B/16 rows;
- stage 2, DALI, on a loan of its own (its wheels come in 60 MiB parts, one call each, then `gpu_check.sh 2 K`,
  200 s): the DALI tests, the multi-crop pipeline from JPEG and the end-to-end step from JPEG.
Budget rule: each step has a slot (seconds reserved for it) and a limit (the most it may run). It may use its slot
plus whatever the earlier steps left, up to its limit, but never the slots of the steps after it; steps with no
slot (the "fill" steps) run only on what is left. The slots add up to at most the stage budget (`--plan` prints the
table). Every step is a subprocess stopped at its deadline, and saves as it goes (pytest through the pytest_results
plugin, one JSON line per test; the benchmarks row by row), so a stopped step still returns what it finished; the
table marks what it did not (the train-step table keeps a row for every (model, batch, provider) slot). All steps
share one compile cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR in /tmp), so no step compiles twice. After every
step the table and the JSON are rewritten under --out; the table is printed last.

    python benchmarks/gpu_check.py prepare [--dali]    # here, before the device calls: .gpu_data/ (DEVELOPERS.md)
    bash benchmarks/gpu_check.sh 1                     # on the GPU machine: stage 1 into $OUT
    python benchmarks/gpu_check.py --plan              # the budget table of both stages
    python benchmarks/gpu_check.py --smoke             # CPU, tiny shapes, the real plan (tests/test_gpu_check.py)
"""
import argparse
import csv
import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".gpu_data"  # git-ignored; what the device calls carry
CIFAR = DATA / "cifar10"
DALI = DATA / "dali"
SOURCE = DATA / "source.json"  # the commit the tree was prepared at; carried by every call
DALI_VERSION = "2.4.0"
PART_MIB = 60  # + the tree (< 1 MiB) and source.json stays under a call's 64 MiB
IMAGE_HAS = ("numpy", "six", "packaging", "typing_extensions", "wheel", "PyYAML", "pyyaml")  # the GPU image's
COMPILE_CACHE = Path("/tmp/fastdino_compile_cache")  # on the GPU machine; lasts while it stays warm

# Every test marked `gpu`, by function (all its parametrizations), and the step that runs it. The check fails when
# a gpu-marked test is missing here or a name here matches no test, so a new GPU test cannot be forgotten.
GPU_TESTS = {
    "tests/test_kernels_at_step_shapes.py::test_dino_loss_at_the_step_shapes": "kernels",
    "tests/test_kernels_at_step_shapes.py::test_ema_at_the_step_shapes": "kernels",
    "tests/test_host.py::test_update_kernels_at_the_step_shapes": "kernels",
    "tests/test_dino_loss.py::test_matches_reference": "kernels",
    "tests/test_dino_loss.py::test_full_size_k_default_blocks": "kernels",
    "tests/test_dino_loss.py::test_teacher_probabilities": "kernels",
    "tests/test_gelu_mlp.py::test_bf16_on_cuda_is_as_close_to_fp64_as_the_composition": "kernels",
    "tests/test_cuda.py::test_bf16_step_on_cuda_follows_fp32": "gpu_tests",
    "tests/test_cuda.py::test_fsdp2_on_one_rank_matches_one_process": "gpu_tests",
    "tests/test_cuda.py::test_compiled_blocks_match_eager_on_cuda": "gpu_tests",
    "tests/test_cuda.py::test_each_fused_sdpa_backend_runs_vit_s16_attention": "gpu_tests",
    "tests/test_cuda.py::test_model_attention_never_takes_the_math_path_on_cuda": "gpu_tests",
    "tests/test_cuda.py::test_vit_s16_attention_runs_cudnn_on_hopper": "gpu_tests",
    "tests/test_cuda.py::test_varlen_attention_runs_one_call_and_matches_sdpa": "gpu_tests",
    "tests/test_cuda.py::test_residual_stream_is_bf16_under_cuda_autocast": "gpu_tests",
    "tests/test_cuda.py::test_selective_checkpointing_on_cuda_recomputes_no_attention_and_keeps_less": "gpu_tests",
    "tests/test_cuda_graph.py::test_captured_graphs_equal_the_default_step_on_gpu": "gpu_tests",
    "tests/test_dinov2_objective.py::test_dinov2_step_on_cuda_bf16_compiled_follows_fp32_eager": "gpu_tests",
    "tests/test_cuda_graph.py::test_captured_step_graph_equals_the_eager_step_on_gpu": "gpu_tests",
    "tests/test_pipelines.py::test_dali_on_the_gpu_agrees_with_the_reference": "dali_tests",
}
# The kernel test files, run whole on CUDA by the first step (their fp32/fp16 cases then run compiled kernels,
# which CI runs in the interpreter only); the step-shape tests first.
KERNEL_TEST_FILES = ["tests/test_kernels_at_step_shapes.py",
                     "tests/test_host.py::test_update_kernels_at_the_step_shapes",
                     "tests/test_dino_loss.py", "tests/test_ema.py",
                     "tests/test_clip_kernel.py", "tests/test_adamw_kernel.py", "tests/test_step_stats.py",
                     "tests/test_gelu_mlp.py"]
# The fused head + loss tests compile some 30 tl.dot kernel variants (both pairings, fp32 / fp16, odd sizes): a step
# of their own with what is left, so that the kernels step keeps its slot.
HEAD_TEST_FILES = ["tests/test_fused_head_loss.py"]
# The short quality run: the paper's ViT-S/16 recipe on the CIFAR-10 subset (32-px images, upscaled by the crops).
QUALITY_SUBSET = dict(train=1000, val=200)  # images per class
TARGETS = {"loss": "<= 0.15 ms (fwd+bwd, B=64)",
           "head": "fused <= unfused time, >= 400 MB less peak (fwd+bwd, B=128)", "ema": "<= 0.2 ms, one launch",
           "train_step_b128": ">= 2,500 img/s, <= 12 GiB (ViT-S/16, batch 128)", "pipeline": ">= 3,000 img/s (DALI)",
           "e2e_jpeg": ">= 2,000 img/s", "kernels": "all pass", "gpu_tests": "all pass, none skipped",
           "dali_tests": "all pass, none skipped"}
STAGE_BUDGET_S = {1: 540, 2: 200}  # each within its device call's timeout_s (DEVELOPERS.md)
POLL_S = 0.25


@dataclass
class Context:
    smoke: bool
    work: Path
    """Scratch folder for the steps' CSV / JSONL files (not returned: $OUT takes 8 files at most)."""
    env: dict
    rehearse: dict[str, int] = field(default_factory=dict)
    """step name -> saved rows after which that step is stopped as at its limit (a dress rehearsal of a kill)."""


@dataclass
class Step:
    name: str
    stage: int
    what: str
    command: Callable[[Context, float], list[str] | None]
    """argv of the step given its time limit in seconds; None: not run in this mode (the reason is `skip_reason`)."""
    slot_s: float
    """Seconds reserved for it in the stage budget (0: a fill step, run on what the others leave)."""
    limit_s: float
    """The most it may run."""
    min_s: float
    """Least time worth starting it with."""
    summarize: Callable[[Context, dict], None] = lambda ctx, record: None
    """Reads the step's output files into record["summary"] / ["figures"] / ["markdown"]; may set status failed."""
    saved: Callable[[Context], int] = lambda ctx: 0
    """Rows (tests, table rows) it has saved so far."""
    skip_reason: str = ""


def python(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def bench(script: str, *args) -> list[str]:
    return python(ROOT / "benchmarks" / script, *args)


def cpu_args(ctx: Context) -> list[str]:
    return ["--device", "cpu", "--dtype", "float32"] if ctx.smoke else []


def lines_in(path: Path) -> int:
    return sum(1 for _ in open(path)) if path.exists() else 0


# ------------------------------------------------------------------------------------------------------- tests

def pytest_step(name: str, selection: list[str], smoke_selection: list[str] | None):
    """(command, summarize, saved) of a pytest step (results one JSON line per test, benchmarks/pytest_results.py):
    on the GPU the tests `selection` picks less those GPU_TESTS names for other steps; in a smoke run
    `smoke_selection` (None: not run; gpu-marked tests skip on the CPU, and the CPU suite runs the rest)."""
    results = lambda ctx: ctx.work / f"{name}.jsonl"  # noqa: E731

    def command(ctx: Context, limit_s: float) -> list[str] | None:
        if ctx.smoke and smoke_selection is None:
            return None
        others = [] if ctx.smoke else [f"--deselect={n}" for n, step in GPU_TESTS.items() if step != name]
        return python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_results",
                      "--results-jsonl", results(ctx), *(smoke_selection if ctx.smoke else selection), *others)

    def summarize(ctx: Context, record: dict) -> None:
        summarize_tests(ctx, record, results(ctx), name)

    return command, summarize, lambda ctx: max(lines_in(results(ctx)) - 1, 0)


def read_results(path: Path) -> tuple[list[str], list[str], dict[str, dict]]:
    """(collected node ids, gpu-marked node ids, results by node id) of a pytest_results file."""
    collected, gpu, results = [], [], {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if "collected" in record:
            collected, gpu = record["collected"], record["gpu"]
        else:
            results[record["node"]] = record
    return collected, gpu, results


def summarize_tests(ctx: Context, record: dict, path: Path, step: str) -> None:
    """Counts, problems and status of a pytest step. On the GPU a failure, a skipped gpu-marked test or a test never
    run (the step stopped first) fails it. The gpu-marked tests it collected must be named in GPU_TESTS for it;
    gpu_tests collects every gpu-marked test of tests/ (before deselecting other steps'): each must be named there,
    and each name must be a test."""
    collected, gpu, results = read_results(path)
    if not collected and not results:
        fail(record, "no results (pytest did not get past collection)")
        return
    functions = {node.split("[")[0] for node in gpu}
    sees_all = step == "gpu_tests"
    problems = [f"gpu-marked but not named in gpu_check.GPU_TESTS: {f}" for f in sorted(functions - set(GPU_TESTS))]
    problems += [f"gpu-marked test of this step named for step {GPU_TESTS[f]} in GPU_TESTS: {f}"
                 for f in sorted(functions & set(GPU_TESTS)) if not sees_all and GPU_TESTS[f] != step]
    problems += [f"named in gpu_check.GPU_TESTS but no such test: {n}" for n, s in GPU_TESTS.items()
                 if (sees_all or s == step) and n not in functions]
    gpu_nodes = set(gpu)
    not_run = [n for n in collected if n not in results]
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("passed", "failed", "skipped")}
    for r in results.values():
        if r["status"] == "failed" or (r["status"] == "skipped" and r["node"] in gpu_nodes and not ctx.smoke):
            problems.append(f"{r['status']}: {r['node']} ({r['message']})")
    if not_run and not ctx.smoke:
        problems.append(f"{len(not_run)} tests not run (the step stopped first), e.g. {not_run[0]}")
    record["figures"] = {"tests": list(results.values()), "not_run": not_run, **counts}
    record["summary"] = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
                         + (f", {len(not_run)} not run" if not_run else "")
                         + (" (no GPU: skips expected)" if ctx.smoke else ""))
    if problems:
        fail(record)
        record["problems"] = problems


def fail(record: dict, summary: str | None = None) -> None:
    """Marks a step's record failed, unless it already says why it did not finish (timeout)."""
    if record["status"] == "ok":
        record["status"] = "failed"
    if summary is not None:
        record["summary"] = summary


# The AOT report's test compiles on the CPU for both targets: CI runs it under both triton versions, the GPU has
# better things to do with its seconds.
KERNELS = pytest_step("kernels", [*KERNEL_TEST_FILES, "--deselect=tests/test_dino_loss.py::"
                                                     "test_kernels_compile_for_h100"],
                      smoke_selection=["-m", "gpu", *KERNEL_TEST_FILES])
HEAD_KERNELS = pytest_step("head_kernels", HEAD_TEST_FILES,  # smoke: the argument checks (the CPU suite runs the rest)
                           smoke_selection=["tests/test_fused_head_loss.py::test_bad_arguments"])
GPU_TEST_STEP = pytest_step("gpu_tests", ["-m", "gpu", "tests"], smoke_selection=["-m", "gpu", "tests"])
DALI_TESTS = pytest_step("dali_tests", ["-m", "gpu", "tests/test_pipelines.py"], smoke_selection=None)


# -------------------------------------------------------------------------------------------------- benchmarks

def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def csv_markdown(title: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = [f"#### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{number(v):.4g}" if number(v) == number(v) and v not in ("",) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(name: str) -> Callable[[Context], int]:
    return lambda ctx: len(read_csv(ctx.work / f"{name}.csv"))


def loss_command(ctx: Context, limit_s: float) -> list[str]:
    shape = (["--batch", "1", "--K", "64", "--ncrops", "4", "--providers", "torch", "triton", "--reps", "2"]
             if ctx.smoke else ["--batch", "64", "128", "--providers", "triton", "torch", "compile"])
    return bench("bench_dino_loss.py", *shape, *cpu_args(ctx), "--csv", ctx.work / "loss.csv")


def summarize_loss(ctx: Context, record: dict) -> None:
    rows = read_csv(ctx.work / "loss.csv")
    batch = rows[0]["B"] if rows else "?"
    full = {r["provider"]: number(r["p50_ms"]) for r in rows if r["B"] == batch and r["mode"] == "full"}
    nan = float("nan")
    record["figures"] = {"rows": rows}
    record["summary"] = (f"B={batch} fwd+bwd: triton {full.get('triton', nan):.3g} ms, official formulation (torch) "
                         f"{full.get('torch', nan):.3g} ms, compiled {full.get('compile', nan):.3g} ms")
    record["markdown"] = csv_markdown("DINO loss (bench_dino_loss.py)", rows)


def head_command(ctx: Context, limit_s: float) -> list[str]:
    shape = (["--batch", "1", "--K", "64", "--ncrops", "4", "--dim", "8", "--reps", "2"] if ctx.smoke
             else ["--batch", "128"])
    return bench("bench_dino_loss.py", "--head", *shape, *cpu_args(ctx), "--csv", ctx.work / "head.csv")


def summarize_head(ctx: Context, record: dict) -> None:
    rows = read_csv(ctx.work / "head.csv")
    by = {r["provider"]: r for r in rows}
    record["figures"] = {"rows": rows}
    record["markdown"] = csv_markdown("Head last layer + loss, fused vs unfused (bench_dino_loss.py --head)", rows)
    if set(by) != {"unfused", "fused_head"}:
        fail(record, "no fused/unfused rows")
        return
    ms = {p: number(r["p50_ms"]) for p, r in by.items()}
    gib = {p: number(r["peak_GiB"]) for p, r in by.items()}
    record["summary"] = (f"B={by['fused_head']['B']} fwd+bwd: fused {ms['fused_head']:.3g} ms, unfused "
                         f"{ms['unfused']:.3g} ms; peak fused {gib['fused_head']:.3g} GiB, unfused "
                         f"{gib['unfused']:.3g} GiB ({(gib['unfused'] - gib['fused_head']) * 1024:.0f} MiB less)")


def ibot_command(ctx: Context, limit_s: float) -> list[str]:
    shape = (["--batch", "1", "--K", "64", "--dim", "8", "--grid", "4", "--providers", "torch", "--reps", "2"]
             if ctx.smoke else ["--batch", "128"])
    return bench("bench_ibot_loss.py", *shape, *cpu_args(ctx), "--csv", ctx.work / "ibot.csv")


def summarize_ibot(ctx: Context, record: dict) -> None:
    rows = read_csv(ctx.work / "ibot.csv")
    record["figures"] = {"rows": rows}
    record["markdown"] = csv_markdown("iBOT term, DINOv2's formulation (bench_ibot_loss.py)", rows)
    if not rows:
        fail(record, "no rows")
        return
    record["summary"] = "; ".join(f"B={r['B']} M={r['M']} {r['provider']} fwd+bwd {number(r['p50_ms']):.3g} ms, "
                                  f"peak {number(r['peak_GiB']):.3g} GiB" for r in rows)


def head_ibot_command(ctx: Context, limit_s: float) -> list[str]:
    shape = ["--ibot", "5", "--K", "64", "--dim", "8", "--reps", "2"] if ctx.smoke else ["--ibot", "9760"]
    return bench("bench_dino_loss.py", *shape, *cpu_args(ctx), "--csv", ctx.work / "head_ibot.csv")


def summarize_head_ibot(ctx: Context, record: dict) -> None:
    rows = read_csv(ctx.work / "head_ibot.csv")
    by = {r["provider"]: r for r in rows}
    record["figures"] = {"rows": rows}
    record["markdown"] = csv_markdown("iBOT term, fused head + loss vs DINOv2's formulation (bench_dino_loss.py "
                                      "--ibot)", rows)
    if set(by) != {"dinov2", "fused_head"}:
        fail(record, "no fused/dinov2 rows")
        return
    ms = {p: number(r["p50_ms"]) for p, r in by.items()}
    gib = {p: number(r["peak_GiB"]) for p, r in by.items()}
    record["summary"] = (f"M={by['fused_head']['M']} fwd+bwd: fused {ms['fused_head']:.3g} ms, DINOv2 "
                         f"{ms['dinov2']:.3g} ms; peak fused {gib['fused_head']:.3g} GiB, DINOv2 "
                         f"{gib['dinov2']:.3g} GiB")


def ema_command(ctx: Context, limit_s: float) -> list[str]:
    # torch.compile of the official loop last: its cold compile is the longest part
    shape = (["--arch", "vit_tiny", "--out-dim", "256", "--hidden-dim", "64", "--bottleneck-dim", "32",
              "--providers", "loop", "foreach", "--reps", "2"] if ctx.smoke
             else ["--tensor-momentum", "--providers", "loop", "triton", "foreach", "compile"])
    return bench("bench_ema.py", *shape, *cpu_args(ctx), "--csv", ctx.work / "ema.csv")


def summarize_ema(ctx: Context, record: dict) -> None:
    rows = read_csv(ctx.work / "ema.csv")
    ms = {r["provider"]: number(r["p50_ms"]) for r in rows}
    nan = float("nan")
    record["figures"] = {"rows": rows}
    record["summary"] = (f"{number(rows[0]['params_M'] if rows else nan):.1f}M params: triton "
                         f"{ms.get('triton', nan):.3g} ms, official loop {ms.get('loop', nan):.3g} ms, foreach "
                         f"{ms.get('foreach', nan):.3g} ms")
    record["markdown"] = csv_markdown("EMA update (bench_ema.py)", rows)


# The train-step rows: a tiny ViT on the CPU in smoke runs (the same rows, labelled with the smoke shapes).
TRAIN_STEP_PROVIDERS = ["official", "fastdino", "fastdino-compile", "fastdino-step-graph"]
# Batch 128 also runs selective checkpointing (issue 22's <= 12 GiB), before the compiled row: an eager row takes
# seconds, the compiled one its compile, which could take the step's limit.
TRAIN_STEP_B128_PROVIDERS = ["official", "fastdino", "fastdino-selective", "fastdino-step-graph", "fastdino-compile"]
SMOKE_E2E = dict(archs=["vit_tiny/8"], batch=[2], args=["--embed-dim", "64", "--depth", "2", "--num-heads", "2",
                 "--out-dim", "256", "--local-crops", "2", "--global-size", "32", "--local-size", "16", "--steps", "1",
                 "--warmup", "1"])
ROW_MARGIN_S = 10  # bench_e2e starts no row in the step's last seconds (the table printout follows)


def train_step(name: str, archs: list[str], batches: list[int], smoke_providers: list[str] | None,
               providers: list[str] = TRAIN_STEP_PROVIDERS):
    """(command, summarize, saved) of bench_e2e's train-step table for `archs` x `batches` x `providers`, data on
    the device, into NAME.csv / NAME.md (saved after every row). Rows bench_e2e did not reach keep their slot in
    the table, with the reason. `smoke_providers`: the providers of a smoke run (None: not run in smoke runs)."""
    def plan(ctx: Context) -> tuple[list[str], list[int], list[str]]:
        if ctx.smoke:
            return SMOKE_E2E["archs"], SMOKE_E2E["batch"], smoke_providers
        return archs, batches, providers

    def command(ctx: Context, limit_s: float) -> list[str] | None:
        if ctx.smoke and smoke_providers is None:
            return None
        models, sizes, providers = plan(ctx)
        shape = [*SMOKE_E2E["args"], *cpu_args(ctx)] if ctx.smoke else [
            "--time-limit", f"{max(limit_s - ROW_MARGIN_S, 1) / 60:.2f}"]
        return bench("bench_e2e.py", "--archs", *models, "--batch", *map(str, sizes), "--providers", *providers,
                     "--sources", "device", *shape, "--csv", ctx.work / f"{name}.csv",
                     "--markdown", ctx.work / f"{name}.md")

    def summarize(ctx: Context, record: dict) -> None:
        rows = read_csv(ctx.work / f"{name}.csv")
        have = {(r["model"], r["batch"], r["provider"]) for r in rows}
        models, sizes, providers = plan(ctx)
        missing = [(m, str(b), p) for m, b, p in product(models, sizes, providers) if (m, str(b), p) not in have]
        why = {"timeout": "not measured: the step stopped at its limit", "failed": "not measured: the step failed"}
        reason = why.get(record["status"], "not measured")
        rows += [dict(model=m, batch=b, data="device", provider=p, img_per_s="", peak_gib="", mfu_pct="",
                      notes=reason) for m, b, p in missing]
        record["figures"] = {"rows": rows}
        md = ctx.work / f"{name}.md"
        table = md.read_text() if md.exists() else (
            "| model | batch | data | provider | img/s | ms/step | TFLOP/s | MFU % | peak GiB | speedup | notes |\n"
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|\n")
        record["markdown"] = table + "".join(
            f"| {m} | {b} | device | {p} |{' – |' * 6} {reason} |\n" for m, b, p in missing)
        measured = [r for r in rows if number(r["img_per_s"]) == number(r["img_per_s"])]
        record["summary"] = "; ".join(
            f"{r['model']}@{r['batch']} {r['provider']} {number(r['img_per_s']):.0f} img/s "
            f"{number(r['peak_gib']):.1f} GiB MFU {number(r['mfu_pct']):.0f} %" for r in measured[:6]) + (
            f"; {len(rows) - len(measured)} of {len(rows)} rows not measured (see notes)"
            if len(measured) < len(rows) else "")
        if not measured:
            fail(record)
    return command, summarize, csv_rows(name)


TRAIN_STEP_B128 = train_step("train_step_b128", ["vit_small/16"], [128], smoke_providers=TRAIN_STEP_B128_PROVIDERS,
                             providers=TRAIN_STEP_B128_PROVIDERS)
TRAIN_STEP_B64 = train_step("train_step_b64", ["vit_small/16"], [64], smoke_providers=["official", "fastdino"])
TRAIN_STEP_MORE = train_step("train_step_more", ["vit_small/8", "vit_base/16"], [128, 64], smoke_providers=None)


def quality_command(ctx: Context, limit_s: float) -> list[str] | None:
    """quality_run.py on the carried CIFAR-10 subset for the time the step has, less start-up, the throughput
    probe and two k-NN passes (≈ 75 s on the H200 with the compile cache warm, an estimate)."""
    results = ctx.work / "quality.jsonl"
    if ctx.smoke:  # no --data: quality_run makes its small synthetic set
        return bench("quality_run.py", "--device", "cpu", "--dtype", "float32", "--arch", "vit_tiny", "--patch-size",
                     "8", "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--batch", "8", "--out-dim", "256",
                     "--local-crops", "2", "--global-size", "32", "--local-size", "16", "--minutes", "0.02",
                     "--evals", "1", "--workers", "0", "--probe-steps", "2", "--sync-every", "2", "--providers",
                     "fastdino", "--results", results)
    if not (CIFAR / "train.tar").exists():
        return None
    minutes = max(limit_s - 75, 20) / 60
    return bench("quality_run.py", "--data", CIFAR, "--providers", "fastdino", "--minutes", f"{minutes:.2f}",
                 "--evals", "1", "--batch", "128", "--workers", "16", "--results", results)


def summarize_quality(ctx: Context, record: dict) -> None:
    path = ctx.work / "quality.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    record["figures"] = {"rows": rows}
    if len(rows) < 2:
        fail(record, f"no k-NN before/after ({len(rows)} evaluations)")
        return
    first, last = rows[0], rows[-1]
    record["summary"] = (f"k-NN top-1 {first['knn_top1']:.1f} % -> {last['knn_top1']:.1f} % after "
                         f"{last['minutes']:.1f} min ({last['step']} steps, {last['data_epochs']:.1f} epochs), "
                         f"loss {last['loss']:.3f}")
    lines = ["#### Quality run (quality_run.py)", "", "| minutes | step | loss | k-NN top-1 % | top-5 % | notes |",
             "|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['minutes']:.2f} | {r['step']} | {r['loss']:.4f} | {r['knn_top1']:.2f} | {r['knn_top5']:.2f} "
              f"| {r['notes']} |" for r in rows]
    record["markdown"] = "\n".join(lines) + "\n"


def pipeline_command(ctx: Context, limit_s: float) -> list[str]:
    shape = (["--images", "16", "--batch", "4", "--batches", "1", "--warmup", "1", "--workers", "0", "--global-size",
              "32", "--local-size", "16", "--local-crops", "2", "--min-side", "40", "--max-side", "60",
              "--providers", "torchvision", "dali"] if ctx.smoke else ["--images", "2048", "--batches", "10"])
    return bench("bench_pipeline.py", *shape, *cpu_args(ctx), "--csv", ctx.work / "pipeline.csv")


def summarize_pipeline(ctx: Context, record: dict) -> None:
    rows = read_csv(ctx.work / "pipeline.csv")
    record["figures"] = {"rows": rows}
    rate_column = next((c for c in (rows[0] if rows else {}) if "img" in c), None)
    record["summary"] = "; ".join(f"{r['provider']} {number(r[rate_column]):.0f} img/s" for r in rows) if rate_column \
        else "no rows"
    record["markdown"] = csv_markdown("Multi-crop pipeline from JPEG (bench_pipeline.py)", rows)
    if not rows:
        fail(record)


def e2e_jpeg_command(ctx: Context, limit_s: float) -> list[str]:
    common = ["--sources", "jpeg", "--csv", ctx.work / "e2e_jpeg.csv", "--markdown", ctx.work / "e2e_jpeg.md"]
    if ctx.smoke:
        return bench("bench_e2e.py", "--archs", *SMOKE_E2E["archs"], "--batch", *map(str, SMOKE_E2E["batch"]),
                     *SMOKE_E2E["args"], "--jpeg-archs", "vit_tiny/8", "--jpeg-images", "8", "--jpeg-unique", "4",
                     "--workers", "0", "--providers", "fastdino", *cpu_args(ctx), *common)
    return bench("bench_e2e.py", "--archs", "vit_small/16", "--jpeg-archs", "vit_small/16", "--batch", "128",
                 "--providers", "official", "fastdino", "--data-backend", "dali", "--jpeg-images", "4096",
                 "--jpeg-unique", "512", "--time-limit", f"{max(limit_s - 40, 10) / 60:.2f}", *common)


def summarize_e2e_jpeg(ctx: Context, record: dict) -> None:
    rows = read_csv(ctx.work / "e2e_jpeg.csv")
    md = ctx.work / "e2e_jpeg.md"
    record["figures"] = {"rows": rows}
    record["markdown"] = md.read_text() if md.exists() else ""
    measured = [r for r in rows if number(r["img_per_s"]) == number(r["img_per_s"])]
    record["summary"] = "; ".join(f"{r['provider']} {number(r['img_per_s']):.0f} img/s ({r['notes']})"
                                  for r in measured) or "no rows"
    if not measured:
        fail(record)


def install_command(ctx: Context, limit_s: float) -> list[str] | None:
    if ctx.smoke:
        return None
    return python("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", ROOT)


# The plan, in priority order per stage: (name, stage, what, command, slot_s, limit_s, min_s, ...). Slot and limit
# are estimates for a cold H200 with 16 cores, compile warm-ups included; they wait for a lent GPU to be checked.
# A new step is one line here (slot 0 unless it must come before the fill steps).
INSTALL_WHAT = "pip install -e . against the machine's torch"
STEPS = [
    Step("install", 1, INSTALL_WHAT, install_command, 15, 40, 5, skip_reason="smoke: the package is installed"),
    Step("kernels", 1, f"{', '.join(KERNEL_TEST_FILES)} on CUDA (compiled kernels vs the references)", KERNELS[0],
         75, 110, 20, KERNELS[1], KERNELS[2]),
    Step("train_step_b128", 1, "bench_e2e.py at batch 128: official, fastdino eager, selective checkpointing, "
         "compiled; ViT-S/16, data on the GPU", TRAIN_STEP_B128[0], 180, 240, 60, TRAIN_STEP_B128[1],
         TRAIN_STEP_B128[2]),
    Step("train_step_b64", 1, "the same at batch 64, without selective checkpointing", TRAIN_STEP_B64[0], 90, 120,
         30, TRAIN_STEP_B64[1], TRAIN_STEP_B64[2]),
    Step("loss", 1, "bench_dino_loss.py: triton, torch (official formulation), compile", loss_command, 45, 70, 15,
         summarize_loss, csv_rows("loss")),
    Step("head", 1, "bench_dino_loss.py --head: fused head + loss vs unfused, B=128", head_command, 20, 40, 10,
         summarize_head, csv_rows("head")),
    Step("ema", 1, "bench_ema.py: official loop, triton, foreach, compile", ema_command, 30, 50, 10, summarize_ema,
         csv_rows("ema")),
    Step("head_kernels", 1, f"{', '.join(HEAD_TEST_FILES)} on CUDA (fused head + loss, Sinkhorn center)",
         HEAD_KERNELS[0], 0, 120, 30, HEAD_KERNELS[1], HEAD_KERNELS[2]),
    Step("head_ibot", 1, "bench_dino_loss.py --ibot: the iBOT term, fused head + loss vs DINOv2's formulation, "
         "M=9760 (ViT-S/14, batch 128)", head_ibot_command, 0, 60, 20, summarize_head_ibot, csv_rows("head_ibot")),
    Step("ibot_torch", 1, "bench_ibot_loss.py: the iBOT term in DINOv2's formulation (torch, compile), B=128",
         ibot_command, 0, 40, 10, summarize_ibot, csv_rows("ibot")),
    Step("gpu_tests", 1, "the other gpu-marked tests (GPU_TESTS)", GPU_TEST_STEP[0], 0, 150, 30, GPU_TEST_STEP[1],
         GPU_TEST_STEP[2]),
    Step("quality", 1, "quality_run.py: ViT-S/16 on the CIFAR-10 subset, k-NN before/after", quality_command, 0,
         200, 100, summarize_quality, lambda ctx: lines_in(ctx.work / "quality.jsonl"),
         skip_reason="no .gpu_data/cifar10: run `gpu_check.py prepare` and carry it"),
    Step("train_step_more", 1, "the train-step table for ViT-S/8 and ViT-B/16 at batch 128 and 64",
         TRAIN_STEP_MORE[0], 0, 150, 45, TRAIN_STEP_MORE[1], TRAIN_STEP_MORE[2],
         skip_reason="smoke: train_step_b128 ran the same command"),
    Step("install", 2, INSTALL_WHAT, install_command, 10, 30, 5, skip_reason="smoke: the package is installed"),
    Step("dali_tests", 2, "the gpu-marked DALI tests (the mixed decoder)", DALI_TESTS[0], 40, 80, 15,
         DALI_TESTS[1], DALI_TESTS[2], skip_reason="smoke: gpu_tests collected every gpu-marked test"),
    Step("pipeline", 2, "bench_pipeline.py: official PIL, torchvision, DALI from JPEG", pipeline_command, 50, 80,
         30, summarize_pipeline, csv_rows("pipeline")),
    Step("e2e_jpeg", 2, "bench_e2e.py from JPEG: official PIL loader vs fastdino + DALI", e2e_jpeg_command, 100,
         130, 60, summarize_e2e_jpeg, csv_rows("e2e_jpeg")),
]


# ---------------------------------------------------------------------------------------------------- running

def deadline(steps: list[Step], i: int, now: float, budget_s: float) -> float:
    """When step i, started `now` seconds into the stage, must end: its limit, but never into the slots of the steps
    after it."""
    return min(now + steps[i].limit_s, budget_s - sum(s.slot_s for s in steps[i + 1:]))


def run_step(step: Step, ctx: Context, limit_s: float, log) -> dict:
    argv = step.command(ctx, limit_s)
    if argv is None:
        return not_run(step, step.skip_reason)
    record = dict(not_run(step, ""), status="ok", limit_s=round(limit_s))
    record["command"] = " ".join(str(a) for a in argv)
    print(f"[gpu_check] {step.name}: {step.what} (limit {limit_s:.0f} s)", flush=True)
    log.write(f"\n===== {step.name} (limit {limit_s:.0f} s): {record['command']}\n")
    start = time.perf_counter()
    # A new session, so that a stop kills the step's whole process tree (DataLoader workers, compile workers).
    proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=ctx.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []

    def pump():
        """The output goes to the log and stdout as it comes: a call killed mid-step still shows it."""
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))
            log.write(lines[-1])
            sys.stdout.write(lines[-1])
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stop_after = ctx.rehearse.get(step.name)
    stopped = None
    while proc.poll() is None:
        if time.perf_counter() - start >= limit_s:
            stopped = f"stopped at its limit ({limit_s:.0f} s)"
        elif stop_after is not None and step.saved(ctx) >= stop_after:
            stopped = f"rehearsal: stopped as at its limit after {stop_after} saved rows"
            record["rehearsal"] = True
        if stopped:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(POLL_S)
    reader.join(timeout=10)  # a grandchild that left the session may hold the pipe open: do not wait for it
    log.flush()
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["returncode"] = proc.returncode
    if stopped:
        record["status"], record["stopped"] = "timeout", stopped
    elif proc.returncode != 0:
        record["status"] = "failed"
    try:
        step.summarize(ctx, record)
    except (OSError, KeyError, ValueError, IndexError, json.JSONDecodeError) as err:  # a broken output file
        record["problems"].append(f"reading the results: {type(err).__name__}: {err}")
    if record["problems"]:
        fail(record)
    if stopped:
        record["summary"] = f"{stopped}; {step.saved(ctx)} rows saved: {record['summary']}"
    if record["status"] != "ok":
        record["output_tail"] = "".join(lines)[-3000:]
    return record


def run_plan(steps: list[Step], ctx: Context, log, budget_s: float, save: Callable[[list[dict]], object]) -> list:
    """The steps one after the other, each until its `deadline`; a step with less than its `min_s` left is not run.
    The results are saved after each step."""
    records, started = [], time.perf_counter()
    for i, step in enumerate(steps):
        now = time.perf_counter() - started
        end = deadline(steps, i, now, budget_s)
        if end - now < step.min_s:
            reserved = sum(s.slot_s for s in steps[i + 1:])
            record = not_run(step, f"stage budget spent ({budget_s - now:.0f} s left, {reserved:.0f} s of them "
                                   f"reserved for later steps)")
        else:
            record = run_step(step, ctx, end - now, log)
        print(f"[gpu_check] {step.name}: {record['status']} in {record['seconds']:.0f} s  {record['summary']}",
              flush=True)
        records.append(record)
        save(records)
    return records


def plan_table(stage: int, budget_s: float | None = None) -> str:
    """The budget of a stage as markdown: each step's slot and limit, and when it starts and ends at the latest
    (every step before it running to its deadline). `--plan` prints it; DEVELOPERS.md and RESULTS.md quote it."""
    steps = [s for s in STEPS if s.stage == stage]
    budget_s = STAGE_BUDGET_S[stage] if budget_s is None else budget_s
    lines = [f"stage {stage}: budget {budget_s:.0f} s, slots {sum(s.slot_s for s in steps):.0f} s", "",
             "| step | slot s | limit s | min s | latest start s | latest end s |", "|---|---:|---:|---:|---:|---:|"]
    now = 0.0
    for i, step in enumerate(steps):
        end = deadline(steps, i, now, budget_s)
        runs = end - now >= step.min_s
        lines.append(f"| {step.name} | {step.slot_s:.0f} | {step.limit_s:.0f} | {step.min_s:.0f} | "
                     f"{now:.0f} | {end if runs else now:.0f}{'' if runs else ' (not run)'} |")
        now = end if runs else now
    return "\n".join(lines) + "\n"


def environment(smoke: bool) -> dict:
    """Device, driver and library versions (read without initialising CUDA in this process) and the source: the
    commit `prepare` recorded in .gpu_data/source.json (what travels to the GPU machine is a copy of the tree,
    without .git), checked against the files here; else git's."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "smoke": smoke}
    info["source"] = source_info()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["device"] = smi.stdout.strip() or "no GPU (nvidia-smi printed nothing)"
    except (OSError, subprocess.TimeoutExpired):
        info["device"] = "cpu (no nvidia-smi)"
    if smoke:  # one torch import less: the steps print their versions in the log
        info["torch_triton"] = "see gpu_check.log"
        return info
    versions = subprocess.run(python("-c", "import torch, triton; print(torch.__version__, triton.__version__)"),
                              capture_output=True, text=True, timeout=120)
    info["torch_triton"] = versions.stdout.strip()
    return info


def tree_digest(files: list[str]) -> str:
    """sha256 over the paths and contents of `files` (relative to ROOT; a missing file counts as missing)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        path = ROOT / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"<missing>") + b"\0")
    return digest.hexdigest()


def git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def source_info(path: Path = SOURCE) -> str:
    """"commit abc1234" (+ ", dirty" and whether the tree still matches what `prepare` saw) for the table."""
    if path.is_file():
        source = json.loads(path.read_text())
        same = tree_digest(source["files"]) == source["digest"]
        return (f"commit {source['commit']}{', dirty' if source['dirty'] else ''} (prepared {source['prepared']}"
                f"{'' if same else '; the tree here differs from it'})")
    commit = git("rev-parse", "--short", "HEAD")
    return f"commit {commit}{', dirty' if git('status', '--porcelain') else ''}" if commit else "commit unknown"


def to_markdown(info: dict, records: list[dict], stages: list[int]) -> str:
    lines = [f"### GPU check, stage {'+'.join(map(str, stages))}{' (smoke, CPU)' if info['smoke'] else ''}", "",
             f"- device: {info['device']}; torch, triton: {info['torch_triton']}; {info['date']}; {info['source']}",
             f"- command: `{info['command']}`", "",
             "| step | status | s | result | target |", "|---|---|---:|---|---|"]
    for r in records:
        result = r["summary"] + ("; " + "; ".join(r["problems"][:3]) if r["problems"] else "")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {result.replace('|', '/')} "
                     f"| {r['target']} |")
    details = [r["markdown"] for r in records if r.get("markdown")]
    return "\n".join(lines + [""] + details) + "\n"


def check(args) -> int:
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_out_"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    cache = work / "compile_cache" if args.smoke else COMPILE_CACHE
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
               TRITON_CACHE_DIR=str(cache / "triton"), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    if args.smoke:
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    ctx = Context(smoke=args.smoke, work=work, env=env, rehearse=dict(args.rehearse_stop))
    info = environment(args.smoke)
    info["command"] = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    stages = [1, 2] if args.smoke and args.stage is None else [args.stage or 1]
    records = []
    try:
        with open(out / "gpu_check.log", "w") as log:
            for stage in stages:
                steps = [s for s in STEPS if s.stage == stage and (not args.only or s.name in args.only)]
                budget = STAGE_BUDGET_S[stage] if args.budget_s is None else args.budget_s
                done = list(records)
                records = done + run_plan(steps, ctx, log, budget,
                                          lambda new: write_results(out, info, done + new, stages))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    markdown = write_results(out, info, records, stages)
    print(f"\n[gpu_check] results in {out}\n\n" + markdown, flush=True)
    ok = all(r["status"] == "ok" or (args.smoke and r["status"] == "not run") or r.get("rehearsal")
             for r in records)
    return 0 if ok else 1


def not_run(step: Step, reason: str) -> dict:
    return dict(name=step.name, stage=step.stage, what=step.what, status="not run", seconds=0.0, summary=reason,
                target=TARGETS.get(step.name, ""), figures={}, problems=[], markdown="")


def write_results(out: Path, info: dict, records: list[dict], stages: list[int]) -> str:
    markdown = to_markdown(info, records, stages)
    (out / "gpu_check.md").write_text(markdown)
    (out / "gpu_check.json").write_text(json.dumps({**info, "stages": stages, "steps": records}, indent=1))
    return markdown


# ---------------------------------------------------------------------------------------------------- prepare

def prepare_cifar(source: Path, per_class: dict[str, int], dest: Path = CIFAR, seed: int = 0) -> None:
    """dest/train.tar and dest/val.tar: `per_class[split]` images of every class, drawn with `seed` from the
    ImageFolder tars SOURCE/{train,val}.tar.gz (members SPLIT/CLASS/FILE, shared/data/README.md)."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, count in per_class.items():
        archive = source / f"{split}.tar.gz"
        with tarfile.open(archive) as tar:
            by_class: dict[str, list[str]] = {}
            for m in tar.getmembers():
                if m.isfile():
                    by_class.setdefault(Path(m.name).parent.name, []).append(m.name)
        chosen = {n for names in by_class.values() for n in rng.sample(sorted(names), min(count, len(names)))}
        partial = dest / f"{split}.tar.partial"
        with tarfile.open(archive, "r|gz") as tar, tarfile.open(partial, "w") as out:  # one pass, in file order
            for m in tar:
                if m.name in chosen:
                    out.addfile(m, tar.extractfile(m))
        partial.replace(dest / f"{split}.tar")
        print(f"{dest / f'{split}.tar'}: {len(chosen)} images of {len(by_class)} classes, "
              f"{(dest / f'{split}.tar').stat().st_size / 2**20:.1f} MiB")


def prepare_dali(version: str = DALI_VERSION, dest: Path = DALI, part_mib: int = PART_MIB) -> None:
    """NVIDIA DALI and the libraries it needs, as wheels for the GPU machine (Python 3.12, x86-64, CUDA 13) in one
    tar split into dest/c0/part, c1/part, ... (part_mib MiB each, one per device call). Each cK/offset holds the bytes
    before part K (gpu_check.sh checks that nothing was lost between calls); the last folder also holds SHA256, the
    whole tar's checksum. As ../shared/gpu/pack_dali.sh (seen working there)."""
    platforms = [f"--platform={p}" for p in ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version=3.12",
                        "--implementation=cp", *platforms, "-d", str(wheels), f"nvidia-dali-cuda130=={version}"],
                       check=True)
        for name in IMAGE_HAS:
            for path in wheels.glob(f"{name}-*.whl"):
                path.unlink()
        archive = Path(tmp) / "dali.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(wheels, arcname="wheels")
        shutil.rmtree(dest, ignore_errors=True)
        digest, offset, k = hashlib.sha256(), 0, 0
        with open(archive, "rb") as f:
            while chunk := f.read(part_mib * 2**20):
                (dest / f"c{k}").mkdir(parents=True)
                (dest / f"c{k}" / "part").write_bytes(chunk)
                (dest / f"c{k}" / "offset").write_text(f"{offset}\n")
                digest.update(chunk)
                offset, k = offset + len(chunk), k + 1
        (dest / f"c{k - 1}" / "SHA256").write_text(digest.hexdigest() + "\n")
        print(f"{dest}: parts c0..c{k - 1} ({offset / 2**20:.0f} MiB in all); the last one is c{k - 1}")


def prepare_source(dest: Path = SOURCE) -> dict:
    """dest: the commit, whether the tree differs from it, and a digest of the tracked files as they are now."""
    files = git("ls-files").splitlines()
    source = dict(commit=git("rev-parse", "--short", "HEAD") or "unknown", dirty=bool(git("status", "--porcelain")),
                  prepared=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  files=files, digest=tree_digest(files))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(source, indent=1))
    print(f"{dest}: commit {source['commit']}{' (dirty)' if source['dirty'] else ''}, {len(files)} files")
    return source


def prepare(args) -> int:
    if ".gpu_data/" not in (ROOT / ".gitignore").read_text().split():
        raise SystemExit(".gpu_data/ must be in .gitignore: the device calls carry it, git must not track it")
    if not (Path(args.cifar) / "train.tar.gz").is_file():
        raise SystemExit(f"no CIFAR-10 tars in {args.cifar} (train.tar.gz, val.tar.gz): pass --cifar DIR")
    prepare_source()
    prepare_cifar(Path(args.cifar), QUALITY_SUBSET)
    if args.dali:
        prepare_dali()
    return 0


def step_rows(text: str) -> tuple[str, int]:
    name, _, rows = text.partition(":")
    if name not in {s.name for s in STEPS} or not rows.isdigit():
        raise argparse.ArgumentTypeError(f"--rehearse-stop takes STEP:ROWS with a step of the plan, got {text!r}")
    return name, int(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    prep = sub.add_parser("prepare", help="fill .gpu_data/ with what the device calls carry")
    prep.add_argument("--cifar", default=str(ROOT.parent / "shared" / "data" / "cifar10"),
                      help="folder with CIFAR-10's train.tar.gz and val.tar.gz")
    prep.add_argument("--dali", action="store_true", help="also the DALI parts for stage 2 (downloads ~260 MB)")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=None, help="default: 1 (smoke: both)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter: the real plan")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for the table, the JSON and the log "
                        "(default $OUT, else a new temporary folder)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the stage (default: "
                        + ", ".join(f"stage {k} {v}" for k, v in STAGE_BUDGET_S.items()) + ")")
    parser.add_argument("--rehearse-stop", nargs="+", type=step_rows, default=[], metavar="STEP:ROWS",
                        help="stop STEP as at its limit once it has saved ROWS rows (the smoke test's rehearsal)")
    parser.add_argument("--plan", action="store_true", help="print each stage's budget table and exit")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        return prepare(args)
    if args.plan:
        print("\n".join(plan_table(stage) for stage in STAGE_BUDGET_S))
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
