"""bench/harness.py, the kept benchmarks' shared harness: its RSS sampler sees memory this process takes, its
timer times, and its JSON writer round-trips."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import harness  # noqa: E402


def test_the_rss_sampler_sees_a_deliberate_allocation_in_its_step():
    with harness.RssSampler(fields=("RssAnon", "VmRSS"), interval=0.01) as memory:
        start = memory.first["RssAnon"] / 1024
        memory.step = "alloc"
        block = np.ones(200 * 2**20 // 8)  # 200 MB, every page touched
        time.sleep(0.1)
        memory.step = None
        del block
    assert memory.peak_mb("RssAnon") - start > 180, (start, memory.peak)
    assert memory.steps["alloc"]["RssAnon"] / 1024 - start > 180
    assert memory.peak["VmRSS"] >= memory.peak["RssAnon"]
    assert harness.peak_rss_mb() >= memory.peak_mb("RssAnon") and harness.status_mb("RssAnon") > 0


def test_timer_and_json_round_trip(tmp_path):
    with harness.Timer() as t:
        time.sleep(0.05)
    assert 0.04 < t.seconds < 5
    value, seconds = harness.timed(lambda: 7)
    assert value == 7 and seconds >= 0
    record = {"seconds": round(t.seconds, 3), "U_s": None, "rows": [1, 2], "nested": {"unit": 8.0, "none": None}}
    path = harness.write_json(tmp_path / "a" / "b.json", record, indent=1)
    assert json.loads(path.read_text()) == record


def test_installed_versions_name_the_packages_and_the_cpu_s_bf16_kernels(tmp_path, monkeypatch):
    found = harness.installed_versions()
    assert found["python"] == sys.version.split()[0] and found["torch"].startswith(__import__("torch").__version__[:4])
    assert "cpu" in found
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16\n")
    real_path = harness.Path
    monkeypatch.setattr(harness, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    assert harness.cpu_kernels() == "Test CPU 9000: amx_bf16 avx512f avx2"
    monkeypatch.setattr(harness, "Path", lambda p: tmp_path / "missing")
    assert harness.cpu_kernels() == "unknown"
