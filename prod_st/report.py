"""The run report: report.md (dev metrics per stage, teacher strength, student-teacher gap, wall times,
warnings, final test metrics) and report.png (the metric stage by stage). Reads only the run folder."""

from __future__ import annotations

import json
from pathlib import Path

from prod_st.distributed import is_main

METRICS = ("nDCG@10", "MRR@10", "R@100")


def load_records(run_dir: Path) -> list[dict]:
    stages = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit() and (p / "DONE").exists())
    return [json.loads((p / "metrics.json").read_text()) for p in stages]


def _num(value) -> str:
    return "" if value is None else f"{value:.4f}"


def render_markdown(run_dir: Path, records: list[dict], final: dict | None) -> str:
    recipe = final["recipe"] if final else run_dir.name
    lines = [f"# PROD run `{recipe}`", "", f"Run folder: `{run_dir}`", "", "## Dev metrics per stage", ""]
    lines += [
        "| # | stage | teacher | student nDCG@10 | student MRR@10 | student R@100 | teacher nDCG@10 (measured as) "
        "| teacher reranking the student's top-k: nDCG@10 / MRR@10 "
        "| gap before: KL / tau / top-1 | gap after: KL / tau / top-1 | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        dev, teacher = r["student_dev"], r.get("teacher_dev") or {}
        teacher_cell = f"{teacher['nDCG@10']:.4f} ({r['teacher_measured_as']})" if teacher else ""
        reranked = r.get("teacher_rerank_dev") or {}
        rerank_cell = f"{reranked['nDCG@10']:.4f} / {reranked['MRR@10']:.4f}" if reranked else ""
        gaps = [
            " / ".join(f"{g[k]:.3f}" for k in ("kl", "kendall_tau", "top1_agreement")) if g else ""
            for g in (r.get("gap_before"), r.get("gap_after"))
        ]
        lines.append(
            f"| {r['index']} | {r['name']} | {r.get('teacher') or ''} | {_num(dev.get('nDCG@10'))} "
            f"| {_num(dev.get('MRR@10'))} | {_num(dev.get('R@100'))} | {teacher_cell} | {rerank_cell} "
            f"| {gaps[0]} | {gaps[1]} "
            f"| {sum(r['seconds'].values()):.0f} |"
        )
    lines += ["", "Gap = teacher vs student over the student's dev top-k: T^2-scaled KL of their temperature "
              "softmaxes, Kendall tau of their orderings, share of queries where both rank the same document first.", ""]
    steps = [(r["name"], k, v) for r in records for k, v in r["seconds"].items()]
    lines += ["## Wall time per step", "", "| stage | step | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {k} | {v:.1f} |" for name, k, v in steps]
    selections = [r for r in records if r.get("selection")]
    if selections:
        lines += ["", "## Data progressive distillation", ""]
        for r in selections:
            counts = ", ".join(f"{k} {v}" for k, v in r["selection"].items())
            lines.append(f"- {r['name']}: {counts}")
    warnings = [(r["name"], w) for r in records for w in r.get("warnings", [])]
    lines += ["", "## Warnings", ""]
    lines += [f"- **{name}**: {w}" for name, w in warnings] or ["None."]
    if final:
        test = final["test"]
        lines += ["", f"## Test ({final['num_test_queries']} queries, {final['num_docs']} documents)", "",
                  "| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        rows = [("student before training", test["student_before_training"]), ("student after PROD", test["student"])]
        rows += [(f"teacher {n} ({m['as']})", m) for n, m in test["teachers"].items()]
        lines += [f"| {label} | " + " | ".join(_num(m.get(k)) for k in METRICS) + " |" for label, m in rows]
        lines += ["", f"Total wall time: {final['seconds']['run']:.0f} s."]
    lines += ["", "![metric per stage](report.png)", ""]
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for metric in ("nDCG@10", "MRR@10"):
        ax.plot(names, [r["student_dev"].get(metric) for r in records], marker="o", label=f"student {metric}")
    teacher = [r.get("teacher_dev", {}).get("nDCG@10") for r in records]
    if any(t is not None for t in teacher):
        ax.plot(names, [t if t is not None else float("nan") for t in teacher], "s--", label="teacher nDCG@10")
    ax.set_xlabel("stage")
    ax.set_ylabel("dev metric")
    ax.set_title("PROD: the student stage by stage")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dir: Path) -> Path:
    """Write report.md and report.png into `run_dir` (rank 0 only) and return report.md's path."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    final_path = run_dir / "final.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    if is_main():
        plot(records, run_dir / "report.png")
        (run_dir / "report.md").write_text(render_markdown(run_dir, records, final))
    return run_dir / "report.md"
