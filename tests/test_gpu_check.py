"""benchmarks/gpu_check.py, the prepared GPU check: its smoke mode runs the real plan on the CPU (so the script cannot
rot between lent GPUs), the budget rule keeps each step's slot, a step stopped at its limit keeps what it saved, a
skipped or unnamed GPU test fails the check, the commit travels with the tree, and the CIFAR-10 subset it carries is
drawn per class."""
import importlib
import io
import json
import shutil
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
def test_smoke_mode_runs_the_real_plan_and_a_stopped_step_keeps_its_rows(gpu_check, tmp_path):
    """The dress rehearsal: every step of both stages in plan order with the real budgets on tiny shapes; the
    batch-128 train-step step is stopped as at its limit after two rows (the selective and compiled rows unmeasured)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out",
                             str(tmp_path), "--rehearse-stop", "train_step_b128:2"],
                            capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {r["name"]: r for r in report["steps"] if r["stage"] == 1} | {
        f"{r['name']}@2": r for r in report["steps"] if r["stage"] == 2}
    statuses = {name: r["status"] for name, r in steps.items()}
    assert result.returncode == 0, (statuses, result.stdout[-3000:], result.stderr[-3000:])
    assert [r["name"] for r in report["steps"]] == [s.name for s in gpu_check.STEPS], "the real plan, in order"
    not_in_smoke = {"install", "train_step_more", "install@2", "dali_tests@2"}  # each says why (skip_reason)
    assert {name for name, s in statuses.items() if s == "not run"} == not_in_smoke, statuses
    assert {name for name, s in statuses.items() if s not in ("ok", "not run")} == {"train_step_b128"}, statuses

    stopped = steps["train_step_b128"]
    assert stopped["status"] == "timeout" and stopped["rehearsal"], stopped
    rows = {r["provider"]: r for r in stopped["figures"]["rows"]}
    assert set(rows) == set(gpu_check.TRAIN_STEP_B128_PROVIDERS), "every batch-128 slot has a row"
    assert all(float(rows[p]["img_per_s"]) > 0 for p in ("official", "fastdino")), rows
    for provider in ("fastdino-selective", "fastdino-compile"):
        assert rows[provider]["notes"] == "not measured: the step stopped at its limit", rows
        assert f"| {provider} | – |" in stopped["markdown"]

    table = (tmp_path / "gpu_check.md").read_text()
    assert result.stdout.rstrip().endswith(table.rstrip()), "the table must be the last thing printed"
    tests = steps["gpu_tests"]["figures"]["tests"]
    assert {t["node"].split("[")[0] for t in tests} == set(gpu_check.GPU_TESTS)


def test_default_out_is_a_temporary_folder_outside_the_tree(gpu_check, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.main(["--smoke", "--stage", "2", "--only", "install"]) == 0
    out = Path(capsys.readouterr().out.split("[gpu_check] results in ")[1].split("\n")[0])
    assert (out / "gpu_check.md").is_file() and ROOT not in out.parents
    shutil.rmtree(out)
    assert "gpu_check_out/" in (ROOT / ".gitignore").read_text().split()


def test_slots_add_up_to_at_most_each_stage_budget(gpu_check):
    for stage, budget in gpu_check.STAGE_BUDGET_S.items():
        steps = [s for s in gpu_check.STEPS if s.stage == stage]
        assert sum(s.slot_s for s in steps) <= budget, stage
        assert all(s.slot_s <= s.limit_s and s.min_s <= s.limit_s for s in steps), stage
    assert "| train_step_b128 | 180 |" in gpu_check.plan_table(1)


def _step(gpu_check, name, command, slot_s, limit_s, min_s, **kwargs):
    return gpu_check.Step(name, 1, name, lambda ctx, limit: command, slot_s, limit_s, min_s, **kwargs)


def _sleeper(name, seconds):
    return [sys.executable, "-c", f"import time; print('{name}', flush=True); time.sleep({seconds})"]


def test_a_step_never_runs_into_the_slots_of_later_steps(gpu_check, tmp_path):
    ctx = gpu_check.Context(smoke=False, work=tmp_path, env={})
    # 6 s: "hangs" may run 6 - 3 (reserved for "reserved") = 3 s, under its limit of 5, and is stopped there;
    # "reserved" gets its slot; the fill step after it finds less than its 4 s minimum and is not run.
    steps = [_step(gpu_check, "hangs", _sleeper("hangs", 60), 1, 5, 1),
             _step(gpu_check, "reserved", _sleeper("reserved", 0), 3, 3, 1),
             _step(gpu_check, "fill", _sleeper("fill", 0), 0, 5, 4)]
    assert gpu_check.deadline(steps, 0, 0.0, 6) == 3 and gpu_check.deadline(steps, 1, 1.0, 6) == 4
    records = gpu_check.run_plan(steps, ctx, io.StringIO(), budget_s=6, save=lambda done: None)
    assert [r["status"] for r in records] == ["timeout", "ok", "not run"], records
    assert 2.5 < records[0]["seconds"] < 5 and "hangs" in records[0]["output_tail"]


def test_a_pytest_step_stopped_part_way_keeps_the_results_it_had(gpu_check, tmp_path):
    """Results are written per test (pytest_results plugin), not at exit: two tests pass, the third is still running
    when the step is stopped (as at its limit, after 2 saved results) and counts as not run."""
    tests = tmp_path / "test_three.py"
    tests.write_text("import time\n\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n\n"
                     "def test_c():\n    time.sleep(120)\n")
    results = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_results",
               "--results-jsonl", str(results), str(tests)]
    ctx = gpu_check.Context(smoke=False, work=tmp_path, env=None, rehearse={"kernels": 2})

    def summarize(ctx, record):
        gpu_check.summarize_tests(ctx, record, results, "kernels")

    step = _step(gpu_check, "kernels", command, 60, 60, 1, summarize=summarize,
                 saved=lambda ctx: max(gpu_check.lines_in(results) - 1, 0))
    record = gpu_check.run_step(step, ctx, 60, io.StringIO())
    assert record["status"] == "timeout" and record["seconds"] < 60, record
    assert record["figures"]["passed"] == 2 and [n.split("::")[1] for n in record["figures"]["not_run"]] == ["test_c"]
    assert any("1 tests not run" in p for p in record["problems"]), record["problems"]


def _results(path: Path, cases: list[tuple[str, str]], gpu_marked=None) -> None:
    """A pytest_results file of (node id, status) cases, all of them collected (and gpu-marked unless given)."""
    nodes = [n for n, _ in cases]
    lines = [{"collected": nodes, "gpu": nodes if gpu_marked is None else gpu_marked}]
    lines += [dict(node=n, status=s, message="why" if s != "passed" else "", seconds=0.1) for n, s in cases]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _summarize(gpu_check, tmp_path, cases, step="gpu_tests", smoke=False) -> dict:
    ctx = gpu_check.Context(smoke=smoke, work=tmp_path, env={})
    _results(tmp_path / "r.jsonl", cases)
    record = {"status": "ok", "problems": [], "summary": ""}
    gpu_check.summarize_tests(ctx, record, tmp_path / "r.jsonl", step)
    return record


def _all_gpu_cases(gpu_check, status="passed"):
    return [(f"{name}[x]", status) for name in gpu_check.GPU_TESTS]


def test_every_named_gpu_test_passing_is_ok(gpu_check, tmp_path):
    record = _summarize(gpu_check, tmp_path, _all_gpu_cases(gpu_check))
    assert record["status"] == "ok" and record["figures"]["passed"] == len(gpu_check.GPU_TESTS), record


def test_a_skip_fails_the_check_on_the_gpu_but_not_in_smoke_mode(gpu_check, tmp_path):
    assert _summarize(gpu_check, tmp_path, _all_gpu_cases(gpu_check, "skipped"))["status"] == "failed"
    assert _summarize(gpu_check, tmp_path, _all_gpu_cases(gpu_check, "skipped"), smoke=True)["status"] == "ok"


def test_an_unnamed_or_missing_gpu_test_fails_the_check(gpu_check, tmp_path):
    new = ("tests/test_new.py::test_new_gpu_thing", "passed")
    unnamed = _summarize(gpu_check, tmp_path, _all_gpu_cases(gpu_check) + [new])
    assert unnamed["status"] == "failed" and any("test_new_gpu_thing" in p for p in unnamed["problems"])
    missing = _summarize(gpu_check, tmp_path, _all_gpu_cases(gpu_check)[1:])
    assert missing["status"] == "failed" and any("no such test" in p for p in missing["problems"])


def test_a_kernel_step_checks_its_own_gpu_tests_only(gpu_check, tmp_path):
    kernels = [(f"{n}[x]", "passed") for n, step in gpu_check.GPU_TESTS.items() if step == "kernels"]
    assert _summarize(gpu_check, tmp_path, kernels, step="kernels")["status"] == "ok"
    other = next(n for n, step in gpu_check.GPU_TESTS.items() if step != "kernels")
    wrong = _summarize(gpu_check, tmp_path, kernels + [(f"{other}[x]", "passed")], step="kernels")
    assert wrong["status"] == "failed" and any("named for step" in p for p in wrong["problems"]), wrong


def test_the_commit_travels_in_source_json(gpu_check, tmp_path):
    """What reaches the GPU machine is a copy of the tree without .git: `prepare` writes the commit, the dirty flag
    and a digest of the tracked files, and the table says whether the tree there is still that one."""
    path = tmp_path / "source.json"
    source = gpu_check.prepare_source(path)
    assert source["commit"] != "unknown" and "README.md" in source["files"]
    info = gpu_check.source_info(path)
    assert info.startswith(f"commit {source['commit']}") and "differs" not in info, info
    path.write_text(json.dumps(dict(source, digest="0" * 64)))
    assert "the tree here differs from it" in gpu_check.source_info(path)


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
