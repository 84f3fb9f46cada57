"""pytest plugin of the GPU check: every test's result written as one JSON line the moment it is known, so that a
pytest run killed at its time limit still leaves every result it had (JUnit XML is written only at exit).

    python -m pytest -p benchmarks.pytest_results --results-jsonl PATH ...   # in the repository root

Lines: {"collected": [node ids], "gpu": [node ids marked gpu]} once collection is done (the gpu-marked ones counted
before -m / --deselect took any away), then {"node", "status" (passed / failed / skipped), "message", "seconds"} per
test.
"""
import json

import pytest


def pytest_addoption(parser):
    parser.addoption("--results-jsonl", default=None, help="append each test's result to this JSON lines file")


class Results:
    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)  # line-buffered: each line reaches the disk as it is written
        self.gpu: list[str] = []
        self.outcome: dict[str, dict] = {}

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    @pytest.hookimpl(tryfirst=True)  # before -m and --deselect remove items
    def pytest_collection_modifyitems(self, items):
        self.gpu = [item.nodeid for item in items if item.get_closest_marker("gpu")]

    def pytest_collection_finish(self, session):
        self.write({"collected": [item.nodeid for item in session.items], "gpu": self.gpu})

    def pytest_runtest_logreport(self, report):
        record = self.outcome.setdefault(report.nodeid, dict(node=report.nodeid, status="passed", message="",
                                                             seconds=0.0))
        record["seconds"] += report.duration
        if report.outcome != "passed" and record["status"] == "passed":  # the first phase that did not pass
            record["status"] = "skipped" if report.skipped else "failed"
            message = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else \
                str(report.longrepr).strip().splitlines()[-1] if report.longrepr else ""
            record["message"] = message[:300]
        if report.when == "teardown":
            self.write(self.outcome.pop(report.nodeid))


def pytest_configure(config):
    path = config.getoption("--results-jsonl")
    if path:
        config.pluginmanager.register(Results(path), "gpu_check_results")
