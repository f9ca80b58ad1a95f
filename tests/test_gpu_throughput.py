"""bench/gpu_throughput.py (issue 19), prod-st's throughput bench: its small mode runs every measurement through
prod-st's own code paths on the CPU and writes every rate, and its FLOP-share arithmetic is right."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_throughput

PRECISIONS = ("bf16", "fp32")
EXPECTED = {f"encode_{p}_docs_per_s" for p in PRECISIONS} | {
    f"{ce}_{p}_pairs_per_s" for ce in ("ce12", "ce24") for p in PRECISIONS} | {
    f"train_{mode}_{p}_steps_per_s" for mode in ("list_x8", "list", "inbatch") for p in PRECISIONS}


def test_flop_share_arithmetic():
    # the H200 limits: a 6-layer 768 student (12 x 768^2 weights a layer) on a 75-token passage is
    # ~6.4 GFLOP, so 790 TFLOP/s is ~120k docs/s
    params = 6 * 12 * 768**2
    doc = gpu_throughput.flops_per_item(params, 75)
    assert doc == pytest.approx(6.37e9, rel=1e-3)
    assert 790e12 / doc == pytest.approx(124_000, rel=0.01)
    assert gpu_throughput.peak_share(3205, doc, 790) == pytest.approx(3205 * doc / 790e12)
    assert gpu_throughput.peak_share(3205, doc, 790) == pytest.approx(0.0258, rel=1e-2)
    # training is 6 x params x tokens: list mode, batch 64 x (9 + 16 x 75) tokens -> ~40 steps/s at the limit
    step = gpu_throughput.flops_per_item(params, 64 * (9 + 16 * 75), train=True)
    assert step == pytest.approx(3 * gpu_throughput.flops_per_item(params, 64 * (9 + 16 * 75)))
    assert gpu_throughput.peak_share(40, step, 790) == pytest.approx(1.0, rel=0.01)
    assert gpu_throughput.peak_share(1000, 2e8, 1) == pytest.approx(0.2)


def test_small_mode_writes_every_rate(tmp_path):
    out = tmp_path / "throughput.json"
    returned = gpu_throughput.main(["--size", "small", "--device", "cpu", "--threads", "1", "--out", str(out),
                                    "--workdir", str(tmp_path / "work")])
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["errors"] == {}
    assert set(result["rates"]) == EXPECTED
    assert all(rate > 0 and math.isfinite(rate) for rate in result["rates"].values()), result["rates"]
    assert result["meta"]["device"] == "cpu" and set(result["peak_share"].values()) == {None}  # GPU only
    tokens, params = result["meta"]["tokens"], result["meta"]["student_params"]
    assert 0 < tokens["query"] < tokens["doc"] < tokens["pair"]
    assert result["flop_per_item"]["encode_fp32_docs_per_s"] == pytest.approx(2 * params * tokens["doc"], rel=0.01)
    batch = result["meta"]["train_batch"]["list"]
    assert result["flop_per_item"]["train_list_fp32_steps_per_s"] == pytest.approx(
        6 * params * batch * (tokens["query"] + 16 * tokens["doc"]), rel=0.01)
    for projection in result["projection"].values():  # every line of the schedule got a rate
        assert projection["total_gpu_hours"] > 0 and None not in projection["gpu_hours"].values()
    assert set(result["batch_wait_ms"]) == {key[:-len("_steps_per_s")] for key in EXPECTED if key.startswith("train")}


def spy_run_batches(monkeypatch) -> list:
    from prod_st.retrieval import encoding

    calls, run = [], encoding.run_batches
    monkeypatch.setattr(encoding, "run_batches", lambda *a, **k: calls.append(k["workers"]) or run(*a, **k))
    return calls


def test_gpu_paths_profile_and_filter(tmp_path, monkeypatch):
    """--host-workers takes prod-st's GPU paths on the CPU (run_batches, dataloader workers), --only picks
    measurements, --profile records each one's busiest functions."""
    out, calls = tmp_path / "throughput.json", spy_run_batches(monkeypatch)
    result = gpu_throughput.main(["--size", "small", "--device", "cpu", "--threads", "1", "--out", str(out),
                                  "--workdir", str(tmp_path / "work"), "--only", "fp32", "--host-workers", "1",
                                  "--length-buckets", "1", "--steps", "2", "--profile", "5"])
    assert result["errors"] == {} and result["meta"]["host_workers"] == 1
    assert calls and set(calls) == {1}  # the corpus encoding went through run_batches
    assert set(result["rates"]) == {key for key in EXPECTED if "fp32" in key}
    assert set(result["profile"]) == {"build_student"} | {key[:-len("_per_s")].rsplit("_", 1)[0] for key in
                                                          result["rates"]}
    assert all(len(rows) == 5 and rows[0].count("|") == 3 for rows in result["profile"].values())


def test_host_workers_off_takes_sentence_transformers_loops(tmp_path, monkeypatch):
    """--host-workers off: the paths before issue 19 (no run_batches), so that one GPU run measures both."""
    calls = spy_run_batches(monkeypatch)
    result = gpu_throughput.main(["--size", "small", "--device", "cpu", "--threads", "1", "--out",
                                  str(tmp_path / "tp.json"), "--workdir", str(tmp_path / "work"), "--only",
                                  "encode_fp32", "--host-workers", "off"])
    assert result["errors"] == {} and result["meta"]["host_workers"] == "off"
    assert set(result["rates"]) == {"encode_fp32_docs_per_s"} and calls == []
