"""benchmarks/gpu_check.py, the prepared GPU check: its smoke mode runs every step on the CPU (so the script cannot
rot between lent GPUs), a skipped or unnamed GPU test fails the check, a step that hangs is stopped at its limit
and the next one runs, and the CIFAR-10 subset it carries is drawn per class."""
import importlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    """The gpu_check.py script as a module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        yield importlib.import_module("gpu_check")


@pytest.mark.slow
def test_smoke_mode_runs_every_step_and_prints_the_table_last(gpu_check, tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {r["name"]: r["status"] for r in report["steps"]}
    assert result.returncode == 0, (statuses, result.stdout[-3000:], result.stderr[-3000:])
    not_in_smoke = {"install", "cuda_tests", "dali_tests", "train_step_more"}  # each says why (skip_reason)
    assert {name for name, status in statuses.items() if status != "ok"} <= not_in_smoke
    assert {s.name for s in gpu_check.STEPS} == set(statuses)
    table = (tmp_path / "gpu_check.md").read_text()
    assert result.stdout.rstrip().endswith(table.rstrip()), "the table must be the last thing printed"
    gpu_tests = next(r for r in report["steps"] if r["name"] == "gpu_tests")
    assert {t["node"].split("[")[0] for t in gpu_tests["figures"]["tests"]} == set(gpu_check.GPU_TESTS)


def _junit(path: Path, cases: list[tuple[str, str, str]]) -> None:
    """A JUnit XML file of (classname, name, outcome) cases, outcome passed / failure / skipped."""
    body = "".join(f'<testcase classname="{c}" name="{n}">' + (f'<{o} message="why"/>' if o != "passed" else "")
                   + "</testcase>" for c, n, o in cases)
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')


def _summarize(gpu_check, tmp_path, cases, smoke=False) -> dict:
    ctx = gpu_check.Context(smoke=smoke, work=tmp_path, env={})
    _junit(tmp_path / "gpu_tests_1.xml", cases)
    record = {"status": "ok", "problems": []}
    gpu_check.summarize_gpu_tests(1)(ctx, record)
    return record


def _stage1_cases(gpu_check, outcome="passed"):
    return [(name.split("::")[0].removesuffix(".py").replace("/", "."), name.split("::")[1] + "[x]", outcome)
            for name, stage in gpu_check.GPU_TESTS.items() if stage == 1]


def test_every_named_gpu_test_passing_is_ok(gpu_check, tmp_path):
    record = _summarize(gpu_check, tmp_path, _stage1_cases(gpu_check))
    assert record["status"] == "ok" and record["figures"]["passed"] == len(_stage1_cases(gpu_check)), record


def test_a_skip_fails_the_check_on_the_gpu_but_not_in_smoke_mode(gpu_check, tmp_path):
    assert _summarize(gpu_check, tmp_path, _stage1_cases(gpu_check, "skipped"))["status"] == "failed"
    dali = ("tests.test_pipelines", "test_dali_on_the_gpu_agrees_with_the_reference[a]", "skipped")
    cases = _stage1_cases(gpu_check, "skipped") + [dali]
    assert _summarize(gpu_check, tmp_path, cases, smoke=True)["status"] == "ok"


def test_an_unnamed_or_missing_gpu_test_fails_the_check(gpu_check, tmp_path):
    new = ("tests.test_new", "test_new_gpu_thing", "passed")
    unnamed = _summarize(gpu_check, tmp_path, _stage1_cases(gpu_check) + [new])
    assert unnamed["status"] == "failed" and any("test_new_gpu_thing" in p for p in unnamed["problems"])
    missing = _summarize(gpu_check, tmp_path, _stage1_cases(gpu_check)[1:])
    assert missing["status"] == "failed" and any("no such test" in p for p in missing["problems"])


def test_a_hanging_step_is_stopped_and_the_next_one_runs(gpu_check, tmp_path):
    def step(name, seconds, limit_s, min_s):
        command = [sys.executable, "-c", f"import time; print('{name}', flush=True); time.sleep({seconds})"]
        return gpu_check.Step(name, 1, name, lambda ctx, limit: command, limit_s=limit_s, min_s=min_s)

    ctx = gpu_check.Context(smoke=False, work=tmp_path, env={})
    # 6 s: the first step gets its minimum (the last one reserves 5 s), hangs and is stopped; the second runs; the
    # last no longer has its 5 s.
    steps = [step("hangs", 60, 2, 1), step("next", 0, 2, 1.5), step("too_late", 0, 5, 5)]
    records = gpu_check.gpu_steps(steps, ctx, io.StringIO(), budget_s=6, save=lambda done: None)
    assert [r["status"] for r in records] == ["timeout", "ok", "not run"], records
    assert records[0]["seconds"] < 5 and "hangs" in records[0]["output_tail"]


def test_cifar_subset_draws_each_class(gpu_check, tmp_path):
    source = tmp_path / "cifar"
    source.mkdir()
    for split, per_class in (("train", 5), ("val", 3)):
        with tarfile.open(source / f"{split}.tar.gz", "w:gz") as tar:
            for cls in ("cat", "dog"):
                for i in range(per_class):
                    info = tarfile.TarInfo(f"{split}/{cls}/{i}.jpg")
                    info.size = 3
                    tar.addfile(info, io.BytesIO(b"jpg"))
    gpu_check.prepare_cifar(source, {"train": 2, "val": 1}, dest=tmp_path / "subset")
    for split, count in (("train", 2), ("val", 1)):
        with tarfile.open(tmp_path / "subset" / f"{split}.tar") as tar:
            names = tar.getnames()
        assert sorted({Path(n).parent.name for n in names}) == ["cat", "dog"] and len(names) == 2 * count
        assert all(n.startswith(f"{split}/") for n in names)
