"""bench/overhead.py's bookkeeping: whose CPU time is whose, and the first trial apart from the rest."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("_overhead_bench", ROOT / "bench" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_split_ticks_attributes_descendants_to_the_benchmark(bench):
    root = 100
    # pid -> (ppid, start, ticks): 101 child of root, 102 grandchild (a Ray worker under the raylet),
    # 200 another user's process, 300 reused pid (new start time), 400 new since the last snapshot
    prev = {100: (1, 5, 10, "python"), 101: (100, 6, 20, "raylet"), 102: (101, 7, 30, "ray::IDLE"),
            200: (1, 8, 40, "other"), 300: (1, 9, 1000, "old")}
    cur = {100: (1, 5, 15, "python"), 101: (100, 6, 27, "raylet"), 102: (101, 7, 39, "ray::ImplicitFunc"),
           200: (1, 8, 51, "other"), 300: (1, 99, 13, "reused"), 400: (102, 50, 4, "child"), 500: (2, 3, 0, "kthread")}
    by_pid = {}
    ours, others = bench.split_ticks(prev, cur, root, by_pid)
    assert ours == 5 + 7 + 9 + 4          # root, child, grandchild, the new process under the grandchild
    assert others == 11 + 13              # the other process; the reused pid counts from zero
    assert by_pid == {(100, 5): ["python", 5], (101, 6): ["raylet", 7], (102, 7): ["ray::ImplicitFunc", 9],
                      (400, 50): ["child", 4]}


def test_split_ticks_survives_a_parent_cycle(bench):
    cur = {10: (11, 1, 5, "a"), 11: (10, 1, 6, "b")}   # a torn read can make two processes each other's parent
    assert bench.split_ticks({}, cur, root=99) == (0, 11)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs /proc (Linux)")
def test_load_monitor_counts_a_busy_thread_of_this_process_as_own(bench):
    def spin():
        stop = time.monotonic() + 1.5
        while time.monotonic() < stop:
            pass

    with bench.LoadMonitor(interval_s=0.2) as mon:
        t = threading.Thread(target=spin)
        t.start()
        t.join()
    assert mon.seconds >= 1.5
    assert mon.own_cpu_s > 0.05      # at least a few ticks, even on a crowded machine
    assert mon.other_cores is not None and mon.other_cores >= 0
    assert mon.top_own()[0][0] == "this process"


def test_per_trial_split_sets_the_first_trials_apart(bench):
    a = [{"trial": {"x": i}, "seconds": s} for i, s in enumerate([6.0, 5.0, 5.0, 5.0])]
    b = [{"trial": {"x": i}, "seconds": s, "start": 100.0 + i} for i, s in enumerate([12.0, 5.5, 5.1, 5.3])]
    out = bench.per_trial_split(a, b)
    assert out["first_a_s"] == 6.0 and out["first_b_s"] == 12.0
    assert out["steady_diffs"] == pytest.approx([0.5, 0.1, 0.3])
    assert out["steady_median_diff_s"] == pytest.approx(0.3)
    # Tune started another trial first: both first trials are left out
    b[2]["start"] = 0.0
    out = bench.per_trial_split(a, b)
    assert out["first_b_s"] == 5.1
    assert out["steady_diffs"] == pytest.approx([0.5, 0.3])
    assert out["steady_median_diff_s"] == pytest.approx(0.4)
