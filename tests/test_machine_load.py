"""Speed figures on a busy machine carry a warning: the decision from given loads and spreads, and `bench` run beside
a CPU burner. (Nothing asserts that this shared machine is quiet.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from moeexport.cli import main
from moeexport.machine_load import judge, other_load, relative_spread, usable_cores

SMALL = ["--prompt-tokens", "16", "--new-tokens", "4", "--bandwidth-buffer", "128MiB"]


@pytest.mark.parametrize("load, cores, threads, spread, busy", [
    (0.2, 2, 2, None, None),  # quiet: a stray task now and then
    (0.2, 2, 2, 0.1, None),
    (3.1, 2, 2, None, "load 3.1 on 2 cores, timed with 2 threads"),
    (1.0, 2, 2, None, "load 1.0 on 2 cores"),  # one other busy task takes a core the runtime computes on
    (1.0, 2, 1, None, None),  # ... which a one-thread run leaves free
    (6.0, 8, 2, None, None),
    (7.0, 8, 2, None, "load 7.0 on 8 cores"),
    (0.0, 2, 2, 0.6, "repeated runs differ by 60%"),
])
def test_busy_when_other_work_wants_the_runtimes_cores_or_repeats_disagree(load, cores, threads, spread, busy):
    judged = judge(load, cores, threads, spread)
    if busy is None:
        assert judged.warning is None and not judged.busy
    else:
        assert judged.busy and busy in judged.warning and judged.warning.startswith("machine busy: ")
        assert judged.warning.endswith("the speeds are not reliable")
    assert judged.to_dict()["busy"] == judged.busy


def test_relative_spread_is_the_range_over_the_median():
    assert relative_spread([100.0, 300.0, 200.0]) == 1.0
    assert relative_spread([10.0]) is None and relative_spread([0.0, 0.0]) is None


def test_bench_beside_a_cpu_burner_warns_in_its_output_json_and_report(demo_gguf_of, tmp_path, capsys):
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cores() + 1)]
    try:
        deadline = time.monotonic() + 10
        while other_load() < usable_cores() and time.monotonic() < deadline:  # the burners are running
            time.sleep(0.1)
        out = tmp_path / "bench"
        assert main(["bench", str(demo_gguf_of("f32")), "--repeats", "2", "--out", str(out), *SMALL]) == 0
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    assert "machine busy: load" in printed and "the speeds are not reliable" in printed
    assert printed.index("machine busy") < printed.index("decode tok/s")  # before the numbers, not after
    report = json.loads((out / "report.json").read_text())
    assert report["machine_load"]["busy"] and report["machine_load"]["load"] >= usable_cores()
    assert all(run["machine_load"]["busy"] for run in report["artifacts"][0]["runs"])
    assert "machine busy: load" in (out / "report.html").read_text()


def test_the_reports_warn_only_for_a_busy_reading():
    from moeexport.report import _busy

    assert _busy(judge(0.0, 2, 2, 0.05).to_dict()) == "" and _busy(None) == ""
    assert "machine busy: load 3.0 on 2 cores" in _busy(judge(3.0, 2, 2).to_dict())
