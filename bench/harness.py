"""What the kept benchmarks share: timing, the machine's reference unit U, this process's memory, JSON out.

    from harness import Timer, timed, reference_unit, RssSampler, peak_rss_mb, maxrss_mb, status_mb, write_json
    from harness import installed_versions

- `Timer()` (a context manager: `.seconds`; wall clock unless `clock=time.process_time`) and `timed(fn)` ->
  (fn(), seconds).
- `reference_unit()`: U, seconds of plain `CrossEncoder.predict` on bench's 2,000 wordnet-gloss pairs (a fresh-head
  MiniLM cross-encoder, batch 64, max length 128), measured just before a run so its wall time reads on any
  machine and load (bench/RESULTS.md quotes every wall time next to it).
- Memory from /proc/self/status: `status_mb(field)` now (RssAnon: own memory; RssFile: pages of memory-mapped
  files the kernel can drop; VmRSS: both), `peak_rss_mb()` (VmHWM: this process's peak RSS, afresh after exec),
  `maxrss_mb()` (getrusage's ru_maxrss, which Linux carries over fork and exec), and `RssSampler`, a background
  thread that keeps the peaks of chosen fields (overall and per labelled step).
- `write_json(path, record)` writes one JSON record (parent folders made); `installed_versions()`: the packages a
  result depends on, to record with it (a teacher trained on another install need not be the same).

Imported by the scripts in bench/ (their folder is on sys.path when run as `python bench/NAME.py`).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---- time ------------------------------------------------------------------------------------------------
class Timer:
    """`with Timer() as t: ...`, then `t.seconds`; while running, `t.seconds` is the time so far. A Timer also
    runs from its construction (`t = Timer()`, later `t.seconds`); `with` restarts it."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock, self.start, self.end = clock, clock(), None

    def __enter__(self) -> Timer:
        self.start, self.end = self.clock(), None
        return self

    def __exit__(self, *exc) -> None:
        self.end = self.clock()

    @property
    def seconds(self) -> float:
        return (self.end if self.end is not None else self.clock()) - self.start


def timed(fn, clock=time.perf_counter):
    """(fn(), seconds it took on `clock`)."""
    with Timer(clock) as t:
        result = fn()
    return result, t.seconds


def reference_unit() -> float:
    """U: seconds of plain `CrossEncoder.predict` on bench's 2,000 wordnet-gloss pairs (a fresh-head MiniLM
    cross-encoder), measured just before a run, so its wall time can be read on any machine and load."""
    sys.path.insert(0, str(ROOT / "bench"))
    from teacher_throughput import build_rows

    from prod_st.teachers import load_cross_encoder

    queries, lists = build_rows(2000, 8, seed=0)
    pairs = [(q, d) for q, docs in zip(queries, lists) for d in docs]
    model = load_cross_encoder("all-MiniLM-L6-v2", num_labels=1, max_length=128)
    model.predict(pairs[:16], batch_size=64, show_progress_bar=False)  # warm-up, as bench/teacher_throughput.py
    _, seconds = timed(lambda: model.predict(pairs, batch_size=64, show_progress_bar=False))
    return round(seconds, 1)


# ---- memory ----------------------------------------------------------------------------------------------
def status_kb(fields) -> dict[str, int]:
    """The /proc/self/status `fields` (kB) that this kernel reports."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            found[name] = int(value.split()[0])
    return found


def maxrss_mb() -> float:
    """getrusage's peak RSS of this process (MB); Linux carries it over fork and exec from the parent."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def status_mb(field: str) -> float:
    """A /proc/self/status field in MB (ru_maxrss where the kernel has no such field)."""
    kb = status_kb((field,)).get(field)
    return kb / 1024 if kb is not None else maxrss_mb()


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM, MB): unlike ru_maxrss it starts afresh after exec."""
    return status_mb("VmHWM")


class RssSampler:
    """Peaks (kB) of /proc/self/status `fields` in this process, sampled every `interval` seconds by a daemon
    thread from construction until `stop()` (which takes a last sample); also a context manager. `first` is the
    reading at the start; `steps` holds the same peaks per step (set `.step` to the label of the work running
    now). With `trace_mb`, every change of RssAnon by more than that is printed to stderr
    (`TRACE <s> step=<key> anon=<MB>`)."""

    def __init__(self, fields=("RssAnon", "RssFile"), interval: float = 0.1, trace_mb: float | None = None) -> None:
        self.fields, self.interval = tuple(fields), interval
        self.first = status_kb(self.fields)
        self.peak = {name: self.first.get(name, 0) for name in self.fields}
        self.step: str | None = None
        self.steps: dict[str, dict[str, int]] = {}
        self.trace_kb, self._traced, self._start = (trace_mb or 0) * 1024, 0, time.time()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        for name, kb in status_kb(self.fields).items():
            self.peak[name] = max(self.peak[name], kb)
            if self.step is not None:
                peaks = self.steps.setdefault(self.step, dict.fromkeys(self.fields, 0))
                peaks[name] = max(peaks[name], kb)
            if self.trace_kb and name == "RssAnon" and abs(kb - self._traced) > self.trace_kb:
                print(f"TRACE {time.time() - self._start:7.1f}s step={self.step} anon={kb // 1024} MB",
                      file=sys.stderr, flush=True)
                self._traced = kb

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> RssSampler:
        if not self._done.is_set():
            self._done.set()
            self._thread.join()
            self.sample()
        return self

    def peak_mb(self, field: str = "RssAnon") -> float:
        return self.peak[field] / 1024

    def __enter__(self) -> RssSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- JSON out --------------------------------------------------------------------------------------------
def write_json(path, record, indent: int | None = None) -> Path:
    """Write `record` as JSON to `path` (its folder made if needed); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=indent))
    return path


def installed_versions() -> dict[str, str]:
    """Python, the installed versions of the packages a measured number depends on, and the CPU's bf16 kernels
    (`cpu`): the same run on another machine differed by up to 0.018 test nDCG@10 (bench/RESULTS.md 1.5), bf16
    kernels (AMX, AVX-512, AVX2) being the likely cause."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "sentence-transformers", "datasets", "faiss-cpu", "prod-st"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    found["cpu"] = cpu_kernels()
    return found


def cpu_kernels() -> str:
    """The CPU's model name and which of its vector extensions matter for bf16 matmuls, e.g.
    `Intel(R) Xeon(R) Processor: amx_bf16 avx512_bf16 avx512f avx2`; `unknown` off Linux."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    fields = dict(line.split(":", 1) for line in info.splitlines()[:40] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    from prod_st.util.precision import CPU_BF16_FLAGS  # the flags `precision: auto` picks bf16 by

    flags = set(fields.get("flags", "").split())
    wanted = [f for f in (*CPU_BF16_FLAGS, "avx512f", "avx2") if f in flags]
    return f"{fields.get('model name', 'unknown')}: {' '.join(wanted) or 'none of amx/avx512/avx2'}"
