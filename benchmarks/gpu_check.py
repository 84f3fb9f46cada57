"""One prepared GPU check: every GPU-only test and every GPU figure of fastdino, as steps that each have their own
time limit, ending in one markdown table and one JSON file.

A GPU is lent to some sessions only, for 15 minutes in all (DEVELOPERS.md says when and how to run this). The check
comes in two stages, each one device call (`benchmarks/gpu_check.sh` wraps them):
- stage 1 (<= 8 min on a cold H200, the install included): the GPU-only tests (named in GPU_TESTS; on the GPU a
  skip fails the check), the kernel test files on CUDA (compiled Triton instead of the interpreter), the DINO loss,
  fused-head (fused vs unfused head + loss: time and peak memory at B=128) and EMA benchmarks, the train-step table
  (fastdino against the official formulation in one process: img/s, MFU, peak GiB) and a short quality run on the
  CIFAR-10 subset carried in .gpu_data/ (k-NN before and after);
- stage 2 (after the DALI wheels came over in parts): the DALI tests, the multi-crop pipeline benchmark from JPEG
  and the end-to-end train step from JPEG.
Each step is a subprocess; a step that fails or runs out of time is recorded and the next one starts. A step never
starts with less time than the later steps of its stage need at least (`min_s`), so one hang cannot eat the stage.
After every step the table and the JSON are rewritten under --out, so even a killed call returns what it has; the
table is printed last.

    python benchmarks/gpu_check.py prepare [--dali]   # here, before the device calls: .gpu_data/ (see DEVELOPERS.md)
    bash benchmarks/gpu_check.sh 1                    # on the GPU machine: install, then stage 1 into $OUT
    python benchmarks/gpu_check.py --smoke --out DIR  # CPU, tiny shapes, both stages (tests/test_gpu_check.py)
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
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".gpu_data"  # git-ignored; what the device calls carry
CIFAR = DATA / "cifar10"
DALI = DATA / "dali"
DALI_VERSION = "2.4.0"
PART_MIB = 50
FIRST_PART_MIB = 40  # + the CIFAR-10 subset (18 MiB) + the tree (< 1 MiB) stays under a call's 64 MiB
IMAGE_HAS = ("numpy", "six", "packaging", "typing_extensions", "wheel", "PyYAML", "pyyaml")  # the GPU image's

# Every test marked `gpu`, by function (all its parametrizations), and the stage that runs it. The check fails when
# a gpu-marked test is missing here or a name here matches no test, so a new GPU test cannot be forgotten.
GPU_TESTS = {
    "tests/test_cuda.py::test_bf16_step_on_cuda_follows_fp32": 1,
    "tests/test_cuda.py::test_fsdp2_on_one_rank_matches_one_process": 1,
    "tests/test_cuda.py::test_compiled_blocks_match_eager_on_cuda": 1,
    "tests/test_cuda.py::test_each_fused_sdpa_backend_runs_vit_s16_attention": 1,
    "tests/test_cuda.py::test_model_attention_never_takes_the_math_path_on_cuda": 1,
    "tests/test_cuda.py::test_vit_s16_attention_runs_cudnn_on_hopper": 1,
    "tests/test_cuda.py::test_varlen_attention_runs_one_call_and_matches_sdpa": 1,
    "tests/test_cuda.py::test_residual_stream_is_bf16_under_cuda_autocast": 1,
    "tests/test_cuda_graph.py::test_captured_graphs_equal_the_default_step_on_gpu": 1,
    "tests/test_dino_loss.py::test_matches_reference": 1,
    "tests/test_dino_loss.py::test_full_size_k_default_blocks": 1,
    "tests/test_dino_loss.py::test_teacher_probabilities": 1,
    "tests/test_pipelines.py::test_dali_on_the_gpu_agrees_with_the_reference": 2,
}
# Test files whose every test runs on CUDA tensors when there is a GPU: their fp32/fp16 cases then run the compiled
# kernels, which CI only runs in the interpreter.
CUDA_TEST_FILES = ["tests/test_dino_loss.py", "tests/test_ema.py"]
# The short quality run: the paper's ViT-S/16 recipe on the CIFAR-10 subset (32-px images, upscaled by the crops).
QUALITY_SUBSET = dict(train=1000, val=200)  # images per class
TARGETS = {"loss": "<= 0.15 ms (fwd+bwd, B=64)",
           "head": "fused <= unfused time, >= 400 MB less peak (fwd+bwd, B=128)", "ema": "<= 0.2 ms, one launch",
           "train_step": ">= 2,500 img/s, <= 12 GiB (ViT-S/16, batch 128)", "pipeline": ">= 3,000 img/s (DALI)",
           "e2e_jpeg": ">= 2,000 img/s", "gpu_tests": "all pass, none skipped", "dali_tests": "all pass, none skipped"}


@dataclass
class Context:
    smoke: bool
    work: Path
    """Scratch folder for the steps' CSV / XML / JSON files (not returned: $OUT takes 8 files at most)."""
    env: dict


@dataclass
class Step:
    name: str
    stage: int
    what: str
    command: Callable[[Context, float], list[str] | None]
    """argv of the step given its time limit in seconds; None: not run in this mode (the reason is `skip_reason`)."""
    limit_s: float
    """Longest it may run on the GPU."""
    min_s: float
    """Least time worth starting it with: earlier steps leave at least this much to it."""
    summarize: Callable[[Context, dict], None] = lambda ctx, record: None
    """Reads the step's output files into record["summary"] / ["figures"] / ["markdown"]; may set status failed."""
    skip_reason: str = ""
    smoke_limit_s: float = 120


def python(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def bench(script: str, *args) -> list[str]:
    return python(ROOT / "benchmarks" / script, *args)


def cpu_args(ctx: Context) -> list[str]:
    return ["--device", "cpu", "--dtype", "float32"] if ctx.smoke else []


# ------------------------------------------------------------------------------------------------------- tests

def pytest_command(ctx: Context, stage: int) -> list[str] | None:
    """Every gpu-marked test in tests/ (on the GPU those of other stages deselected, in a smoke run all of them, by
    the stage-1 step), results into a JUnit XML file."""
    if ctx.smoke and stage != 1:
        return None
    others = [name for name, s in GPU_TESTS.items() if s != stage and not ctx.smoke]
    return python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests",
                  f"--junitxml={ctx.work / f'gpu_tests_{stage}.xml'}", *(f"--deselect={n}" for n in others))


def junit_results(path: Path) -> list[tuple[str, str, str]]:
    """(node id, status, message) of every test case of a JUnit XML file; status passed/failed/skipped."""
    results = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module, name = case.get("classname", ""), case.get("name", "")
        node = f"{module.replace('.', '/')}.py::{name}"
        status, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                status = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "").split("\n")[0][:200]
        results.append((node, status, message))
    return results


def summarize_gpu_tests(stage: int):
    def summarize(ctx: Context, record: dict) -> None:
        xml = ctx.work / f"gpu_tests_{stage}.xml"
        if not xml.exists():
            record["status"] = "failed"
            return
        results = junit_results(xml)
        functions = {node.split("[")[0] for node, _, _ in results}
        problems = [f"gpu-marked but not named in gpu_check.GPU_TESTS: {f}" for f in sorted(functions - set(GPU_TESTS))]
        problems += [f"named in gpu_check.GPU_TESTS but no such test: {name}"
                     for name, s in GPU_TESTS.items() if (s == stage or ctx.smoke) and name not in functions]
        counts = {s: sum(1 for _, status, _ in results if status == s) for s in ("passed", "failed", "skipped")}
        bad = [(n, s, m) for n, s, m in results if s == "failed" or (s == "skipped" and not ctx.smoke)]
        problems += [f"{status}: {node} ({message})" for node, status, message in bad]
        record["figures"] = {"tests": [dict(node=n, status=s, message=m) for n, s, m in results], **counts}
        record["summary"] = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
                             + (" (no GPU: skips expected)" if ctx.smoke else ""))
        if problems:
            record["status"] = "failed"
            record["problems"] = problems
    return summarize


def cuda_tests_command(ctx: Context, limit_s: float) -> list[str] | None:
    if ctx.smoke:
        return None
    return python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *CUDA_TEST_FILES,
                  f"--junitxml={ctx.work / 'cuda_tests.xml'}")


def summarize_cuda_tests(ctx: Context, record: dict) -> None:
    xml = ctx.work / "cuda_tests.xml"
    if not xml.exists():
        record["status"], record["summary"] = "failed", "no results"
        return
    results = junit_results(xml)
    counts = {s: sum(1 for _, status, _ in results if status == s) for s in ("passed", "failed", "skipped")}
    record["figures"] = counts
    record["summary"] = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    record["problems"] = [f"{s}: {n} ({m})" for n, s, m in results if s != "passed"]


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


def loss_command(ctx: Context, limit_s: float) -> list[str]:
    shape = (["--batch", "1", "--K", "64", "--ncrops", "4", "--providers", "torch", "triton", "--reps", "2"]
             if ctx.smoke else ["--batch", "64", "128"])
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
        record["status"], record["summary"] = "failed", "no fused/unfused rows"
        return
    ms = {p: number(r["p50_ms"]) for p, r in by.items()}
    gib = {p: number(r["peak_GiB"]) for p, r in by.items()}
    record["summary"] = (f"B={by['fused_head']['B']} fwd+bwd: fused {ms['fused_head']:.3g} ms, unfused "
                         f"{ms['unfused']:.3g} ms; peak fused {gib['fused_head']:.3g} GiB, unfused "
                         f"{gib['unfused']:.3g} GiB ({(gib['unfused'] - gib['fused_head']) * 1024:.0f} MiB less)")


def ema_command(ctx: Context, limit_s: float) -> list[str]:
    shape = (["--arch", "vit_tiny", "--out-dim", "256", "--hidden-dim", "64", "--bottleneck-dim", "32",
              "--providers", "loop", "foreach", "--reps", "2"] if ctx.smoke else ["--tensor-momentum"])
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


SMOKE_E2E = ["--archs", "vit_tiny/8", "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--batch", "2",
             "--out-dim", "256", "--local-crops", "2", "--global-size", "32", "--local-size", "16", "--steps", "1",
             "--warmup", "1"]


def train_step_command(name: str, archs: list[str], smoke: bool = True):
    """The train-step table of `archs` from device-resident crops into NAME.csv / NAME.md; bench_e2e starts no row
    after the time limit less a row's length, and saves the table after every row. `smoke`: also in smoke runs."""
    def command(ctx: Context, limit_s: float) -> list[str] | None:
        common = ["--sources", "device", "--csv", ctx.work / f"{name}.csv", "--markdown", ctx.work / f"{name}.md"]
        if ctx.smoke:
            return bench("bench_e2e.py", *SMOKE_E2E, "--providers", "official", "fastdino", *cpu_args(ctx),
                         *common) if smoke else None
        return bench("bench_e2e.py", "--archs", *archs, "--batch", "64", "128", "--providers", "official",
                     "fastdino", "fastdino-compile", "--time-limit", f"{max(limit_s - 60, 10) / 60:.2f}", *common)
    return command


def summarize_e2e(csv_name: str, md_name: str, data: str):
    def summarize(ctx: Context, record: dict) -> None:
        rows = read_csv(ctx.work / csv_name)
        record["figures"] = {"rows": rows}
        md = ctx.work / md_name
        record["markdown"] = md.read_text() if md.exists() else ""
        parts = []
        for r in rows:
            if r["data"] == data and number(r["img_per_s"]) == number(r["img_per_s"]):
                parts.append(f"{r['model']}@{r['batch']} {r['provider']} {number(r['img_per_s']):.0f} img/s "
                             f"{number(r['peak_gib']):.1f} GiB MFU {number(r['mfu_pct']):.0f} %")
        skipped = sum(1 for r in rows if number(r["img_per_s"]) != number(r["img_per_s"]))
        record["summary"] = "; ".join(parts[:6]) + (f"; {skipped} rows not measured (see notes)" if skipped else "")
        if not parts:
            record["status"] = "failed"
    return summarize


def quality_command(ctx: Context, limit_s: float) -> list[str]:
    """quality_run.py on the carried CIFAR-10 subset for the time the step has left, less start-up, the throughput
    probe and two k-NN passes (≈ 75 s on the H200, an estimate)."""
    results = ctx.work / "quality.jsonl"
    if ctx.smoke:  # no --data: quality_run makes its small synthetic set
        return bench("quality_run.py", "--device", "cpu", "--dtype", "float32", "--arch", "vit_tiny", "--patch-size",
                     "8", "--embed-dim", "64", "--depth", "2", "--num-heads", "2", "--batch", "8", "--out-dim", "256",
                     "--local-crops", "2", "--global-size", "32", "--local-size", "16", "--minutes", "0.02",
                     "--evals", "1", "--workers", "0", "--probe-steps", "2", "--sync-every", "2", "--providers",
                     "fastdino", "--results", results)
    if not (CIFAR / "train.tar").exists():
        return None
    minutes = max(limit_s - 75, 30) / 60
    return bench("quality_run.py", "--data", CIFAR, "--providers", "fastdino", "--minutes", f"{minutes:.2f}",
                 "--evals", "1", "--batch", "128", "--workers", "16", "--results", results)


def summarize_quality(ctx: Context, record: dict) -> None:
    path = ctx.work / "quality.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    record["figures"] = {"rows": rows}
    if len(rows) < 2:
        record["status"] = "failed"
        record["summary"] = "no k-NN before/after"
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
        record["status"] = "failed"


def e2e_jpeg_command(ctx: Context, limit_s: float) -> list[str]:
    common = ["--sources", "jpeg", "--csv", ctx.work / "e2e_jpeg.csv", "--markdown", ctx.work / "e2e_jpeg.md"]
    if ctx.smoke:
        return bench("bench_e2e.py", *SMOKE_E2E, "--jpeg-archs", "vit_tiny/8", "--jpeg-images", "8", "--jpeg-unique",
                     "4", "--workers", "0", "--providers", "fastdino", *cpu_args(ctx), *common)
    return bench("bench_e2e.py", "--archs", "vit_small/16", "--jpeg-archs", "vit_small/16", "--batch", "128",
                 "--providers", "official", "fastdino", "--data-backend", "dali", "--jpeg-images", "4096",
                 "--jpeg-unique", "512", "--time-limit", f"{max(limit_s - 40, 10) / 60:.2f}", *common)


def install_command(ctx: Context, limit_s: float) -> list[str] | None:
    if ctx.smoke:
        return None
    return python("-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", ROOT)


STEPS = [
    Step("install", 1, "pip install -e . against the machine's torch", install_command, 60, 10,
         skip_reason="smoke: the package is installed already"),
    Step("gpu_tests", 1, "every gpu-marked test of stage 1 (GPU_TESTS)", lambda ctx, s: pytest_command(ctx, 1),
         120, 30, summarize_gpu_tests(1)),
    Step("cuda_tests", 1, f"{' '.join(CUDA_TEST_FILES)} on CUDA (compiled kernels)", cuda_tests_command, 75, 20,
         summarize_cuda_tests, skip_reason="smoke: the CPU suite runs these files"),
    Step("loss", 1, "bench_dino_loss.py: torch (official formulation), compile, triton", loss_command, 90, 20,
         summarize_loss),
    Step("head", 1, "bench_dino_loss.py --head: fused head + loss vs unfused, B=128", head_command, 45, 15,
         summarize_head),
    Step("ema", 1, "bench_ema.py: official loop, compile, foreach, triton", ema_command, 45, 15, summarize_ema),
    Step("train_step", 1, "bench_e2e.py: official vs fastdino (eager, compiled), ViT-S/16, data on the GPU",
         train_step_command("train_step", ["vit_small/16"]), 180, 60,
         summarize_e2e("train_step.csv", "train_step.md", "device")),
    Step("quality", 1, "quality_run.py: ViT-S/16 on the CIFAR-10 subset, k-NN before/after", quality_command, 180,
         120, summarize_quality, skip_reason="no .gpu_data/cifar10: run `gpu_check.py prepare` and carry it"),
    Step("install", 2, "pip install -e . against the machine's torch", install_command, 60, 10,
         skip_reason="smoke: the package is installed already"),
    Step("dali_tests", 2, "every gpu-marked test of stage 2 (DALI's mixed decoder)",
         lambda ctx, s: pytest_command(ctx, 2), 60, 20, summarize_gpu_tests(2),
         skip_reason="smoke: gpu_tests collected every stage's tests"),
    Step("pipeline", 2, "bench_pipeline.py: official PIL, torchvision, DALI from JPEG", pipeline_command, 90, 40,
         summarize_pipeline),
    Step("e2e_jpeg", 2, "bench_e2e.py from JPEG: official PIL loader vs fastdino + DALI", e2e_jpeg_command, 120, 60,
         summarize_e2e("e2e_jpeg.csv", "e2e_jpeg.md", "jpeg")),
    Step("train_step_more", 2, "bench_e2e.py as train_step, ViT-S/8 and ViT-B/16, while time is left",
         train_step_command("train_step_more", ["vit_small/8", "vit_base/16"], smoke=False), 120, 30,
         summarize_e2e("train_step_more.csv", "train_step_more.md", "device"),
         skip_reason="smoke: train_step ran the same command"),
]
STAGE_BUDGET_S = {1: 470, 2: 200}  # stage 1 <= 8 min with start-up; stage 2 fits what stage 1 leaves of 15 min


# ---------------------------------------------------------------------------------------------------- running

def run_step(step: Step, ctx: Context, limit_s: float, log) -> dict:
    argv = step.command(ctx, limit_s)
    if argv is None:
        return not_run(step, step.skip_reason)
    record = dict(not_run(step, ""), status="ok", limit_s=round(limit_s))
    record["command"] = " ".join(str(a) for a in argv)
    header = f"\n===== {step.name} (limit {limit_s:.0f} s): {record['command']}\n"
    if not ctx.smoke:
        log.write(header)
    start = time.perf_counter()
    # A new session, so that a timeout kills the step's whole process tree (DataLoader workers, compile workers).
    proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=ctx.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []

    def pump():
        """On the GPU the output goes to the log and stdout as it comes (a call killed mid-step still shows it);
        in a smoke run, where two steps run at once, it is written in one piece at the end."""
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))
            if not ctx.smoke:
                log.write(lines[-1])
                sys.stdout.write(lines[-1])
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        timed_out = True
    reader.join(timeout=10)  # a grandchild that left the session may hold the pipe open: do not wait for it
    text = "".join(lines)
    if ctx.smoke:
        log.write(header + text)
    log.flush()
    record["seconds"] = round(time.perf_counter() - start, 1)
    record["returncode"] = proc.returncode
    if proc.returncode != 0:
        record["status"] = "failed"
    try:
        step.summarize(ctx, record)
    except (OSError, KeyError, ValueError, IndexError, ET.ParseError) as err:  # a broken output file
        record["problems"].append(f"reading the results: {type(err).__name__}: {err}")
        record["status"] = "failed"
    if record["problems"] and record["status"] == "ok":
        record["status"] = "failed"
    if timed_out:
        record["status"] = "timeout"  # what the summary found missing follows from it
    if record["status"] != "ok":
        record["output_tail"] = text[-3000:]
    return record


def environment(smoke: bool) -> dict:
    """Device, driver and library versions, read without initialising CUDA in this process."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "smoke": smoke}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = "unknown"
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


def to_markdown(info: dict, records: list[dict], stages: list[int]) -> str:
    lines = [f"### GPU check, stage {'+'.join(map(str, stages))}{' (smoke, CPU)' if info['smoke'] else ''}", "",
             f"- device: {info['device']}; torch, triton: {info['torch_triton']}; {info['date']}; "
             f"commit {info['commit']}",
             f"- command: `{info['command']}`", "",
             "| step | status | s | result | target |", "|---|---|---:|---|---|"]
    for r in records:
        result = r["summary"] + ("; " + "; ".join(r["problems"][:3]) if r["problems"] else "")
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {result.replace('|', '/')} "
                     f"| {r['target']} |")
    details = [r["markdown"] for r in records if r.get("markdown")]
    return "\n".join(lines + [""] + details) + "\n"


def check(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.smoke:
        env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(smoke=args.smoke, work=work, env=env)
    info = environment(args.smoke)
    info["command"] = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    stages = [1, 2] if args.smoke and args.stage is None else [args.stage or 1]
    steps = [s for s in STEPS if s.stage in stages and (not args.only or s.name in args.only)]
    budget = sum(STAGE_BUDGET_S[s] for s in stages) if args.budget_s is None else args.budget_s
    try:
        with open(out / "gpu_check.log", "w") as log:
            if args.smoke:
                records = smoke_steps(steps, ctx, log)
                write_results(out, info, records, stages)
            else:
                records = gpu_steps(steps, ctx, log, budget, lambda done: write_results(out, info, done, stages))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    markdown = write_results(out, info, records, stages)
    print("\n" + markdown, flush=True)
    ok = all(r["status"] == "ok" or (r["status"] == "not run" and args.smoke) for r in records)
    return 0 if ok else 1


def gpu_steps(steps: list[Step], ctx: Context, log, budget_s: float, save: Callable[[list[dict]], object]) -> list:
    """The steps one after the other, each within its own limit and within what the budget leaves once the later
    steps have their `min_s` (but never under its own `min_s` while that much is left); results saved after each."""
    records, started = [], time.perf_counter()
    for i, step in enumerate(steps):
        left = budget_s - (time.perf_counter() - started)
        limit = min(step.limit_s, max(step.min_s, left - sum(s.min_s for s in steps[i + 1:])), left)
        if limit < step.min_s:
            record = not_run(step, f"stage budget spent ({left:.0f} s left)")
        else:
            print(f"[gpu_check] {step.name}: {step.what} (limit {limit:.0f} s)", flush=True)
            record = run_step(step, ctx, limit, log)
        print(f"[gpu_check] {step.name}: {record['status']} in {record['seconds']:.0f} s  {record['summary']}",
              flush=True)
        records.append(record)
        save(records)
    return records


def smoke_steps(steps: list[Step], ctx: Context, log) -> list[dict]:
    """The steps two at a time (nothing is timed on the CPU; CI has two cores), each with its smoke limit."""
    lock = threading.Lock()

    class Log:  # each step writes its output in one piece
        def write(self, text):
            with lock:
                log.write(text)

        def flush(self):
            with lock:
                log.flush()

    def run(step):
        record = run_step(step, ctx, step.smoke_limit_s, Log())
        print(f"[gpu_check] {step.name}: {record['status']} in {record['seconds']:.0f} s  {record['summary']}",
              flush=True)
        return record

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, steps))


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


def prepare_dali(version: str = DALI_VERSION, dest: Path = DALI, first_part_mib: int = FIRST_PART_MIB) -> None:
    """NVIDIA DALI and the libraries it needs, as wheels for the GPU machine (Python 3.12, x86-64, CUDA 13) in one
    tar split into dest/c0/part (first_part_mib MiB: it rides with stage 1), c1/part, ... (PART_MIB MiB each).
    Each cK/offset holds the bytes before part K (gpu_check.sh checks that nothing was lost between calls); the
    last folder also holds SHA256, the whole tar's checksum. As ../shared/gpu/pack_dali.sh (seen working there)."""
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
            while chunk := f.read((first_part_mib if k == 0 else PART_MIB) * 2**20):
                (dest / f"c{k}").mkdir(parents=True)
                (dest / f"c{k}" / "part").write_bytes(chunk)
                (dest / f"c{k}" / "offset").write_text(f"{offset}\n")
                digest.update(chunk)
                offset, k = offset + len(chunk), k + 1
        (dest / f"c{k - 1}" / "SHA256").write_text(digest.hexdigest() + "\n")
        print(f"{dest}: parts c0..c{k - 1} ({offset / 2**20:.0f} MiB in all); the last one is c{k - 1}")


def prepare(args) -> int:
    if ".gpu_data/" not in (ROOT / ".gitignore").read_text().split():
        raise SystemExit(".gpu_data/ must be in .gitignore: the device calls carry it, git must not track it")
    if not (Path(args.cifar) / "train.tar.gz").is_file():
        raise SystemExit(f"no CIFAR-10 tars in {args.cifar} (train.tar.gz, val.tar.gz): pass --cifar DIR")
    prepare_cifar(Path(args.cifar), QUALITY_SUBSET)
    if args.dali:
        prepare_dali()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    prep = sub.add_parser("prepare", help="fill .gpu_data/ with what the device calls carry")
    prep.add_argument("--cifar", default=str(ROOT.parent / "shared" / "data" / "cifar10"),
                      help="folder with CIFAR-10's train.tar.gz and val.tar.gz")
    prep.add_argument("--dali", action="store_true", help="also the DALI parts for stage 2 (downloads ~260 MB)")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=None, help="default: 1 (smoke: both)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, interpreter: checks the script")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for the table, "
                        "the JSON and the log (default $OUT)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the stage (default: "
                        + ", ".join(f"stage {k} {v}" for k, v in STAGE_BUDGET_S.items()) + ")")
    args = parser.parse_args(argv)
    return prepare(args) if args.command == "prepare" else check(args)


if __name__ == "__main__":
    sys.exit(main())
