"""pytest plugin: append each test's outcome to a JSON-lines file the moment it is known.

    SEGFORMER_FAST_OUTCOMES=out.jsonl python -m pytest -p benchmarks.pytest_outcomes ...

Used by benchmarks/gpu_check.sh beside ``--junitxml``: the XML is written only when pytest ends,
so a run killed by its time limit still leaves these lines (one ``{"collected": n}`` line, then one
line per test phase that decides the outcome: a call, or a setup/teardown that failed or skipped).
Without the environment variable the plugin does nothing.
"""

from __future__ import annotations

import json
import os

ENV_VAR = "SEGFORMER_FAST_OUTCOMES"


def _write(record: dict) -> None:
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def pytest_collection_finish(session):
    _write({"collected": len(session.items)})


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _write({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "xfail": hasattr(report, "wasxfail"), "duration": round(report.duration, 3)})
