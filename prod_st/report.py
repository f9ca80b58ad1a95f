"""The run report: report.md (dev metrics per stage, teacher strength, student-teacher gap, wall times,
warnings, final test metrics) and report.png (the metric stage by stage). Reads only the run folder."""

from __future__ import annotations

import json
from pathlib import Path

from prod_st.distributed import is_main

METRICS = ("nDCG@10", "MRR@10", "R@100", "Acc@5", "Acc@20", "Acc@100")  # shown when present, in this order
DEFAULT_METRIC = "nDCG@10"


def metric_columns(rows, headline: str | None = None) -> list[str]:
    """The metric columns of a table over `rows` (metric dicts): the headline metric (the recipe's
    `eval.metric`) first, then those of METRICS that some row has. Data with answers and no qrels (DPR's NQ
    test) has only Acc@k; qrels data has no Acc@k. Never empty: the headline stands alone when no row has a
    metric."""
    present = {k for r in rows if isinstance(r, dict) for k in r}
    wanted = dict.fromkeys(([headline] if headline else []) + list(METRICS))
    return [m for m in wanted if m in present] or [headline or DEFAULT_METRIC]


def headline_metric(recipe: dict | None) -> str:
    """`eval.metric` of a recipe mapping (nDCG@10 when it has none)."""
    evaluation = (recipe or {}).get("eval") if isinstance(recipe, dict) else None
    return (evaluation or {}).get("metric") or DEFAULT_METRIC


def run_metric(run_dir: Path) -> str:
    """The headline metric of a run folder's recipe.yaml (nDCG@10 when it cannot be read)."""
    import yaml

    try:
        return headline_metric(yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()))
    except (OSError, yaml.YAMLError):
        return DEFAULT_METRIC


def load_records(run_dir: Path) -> list[dict]:
    stages = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name[:2].isdigit() and (p / "DONE").exists())
    return [json.loads((p / "metrics.json").read_text()) for p in stages]


def _num(value) -> str:
    return "" if value is None else f"{value:.4f}"


def render_markdown(run_dir: Path, records: list[dict], final: dict | None, metric: str | None = None) -> str:
    """report.md. `metric`: the headline metric (default: the run's eval.metric); every table shows the metrics
    that exist, headed by it."""
    metric = metric or run_metric(run_dir)
    recipe = final["recipe"] if final else run_dir.name
    dev_cols = metric_columns([r.get("student_dev") for r in records], metric)
    teacher_metric = metric_columns([r.get("teacher_dev") for r in records], metric)[0]
    rerank_cols = metric_columns([r.get("teacher_rerank_dev") for r in records], metric)[:2]
    lines = [f"# PROD run `{recipe}`", "", f"Run folder: `{run_dir}`", "", "## Dev metrics per stage", ""]
    header = ["#", "stage", "teacher", *(f"student {c}" for c in dev_cols), f"teacher {teacher_metric} (measured as)",
              "teacher reranking the student's top-k: " + " / ".join(rerank_cols),
              "gap before: KL / tau / top-1", "gap after: KL / tau / top-1", "wall time (s)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        dev, teacher = r.get("student_dev") or {}, r.get("teacher_dev") or {}
        teacher_cell = f"{_num(teacher.get(teacher_metric))} ({r.get('teacher_measured_as')})" if teacher else ""
        reranked = r.get("teacher_rerank_dev") or {}
        rerank_cell = " / ".join(_num(reranked.get(c)) for c in rerank_cols) if reranked else ""
        gaps = [
            " / ".join(f"{g[k]:.3f}" for k in ("kl", "kendall_tau", "top1_agreement")) if g else ""
            for g in (r.get("gap_before"), r.get("gap_after"))
        ]
        cells = [str(r["index"]), r["name"], r.get("teacher") or "", *(_num(dev.get(c)) for c in dev_cols),
                 teacher_cell, rerank_cell, *gaps, f"{sum(r['seconds'].values()):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
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
        rows = final_test_rows(final)
        cols = metric_columns([m for _, m in rows], metric)
        lines += ["", f"## Test ({final['num_test_queries']} queries, {final['num_docs']} documents)", "",
                  "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {label} | " + " | ".join(_num(m.get(k)) for k in cols) + " |" for label, m in rows]
        lines += ["", f"Total wall time: {final['seconds']['run']:.0f} s."]
    lines += ["", "![metric per stage](report.png)", ""]
    return "\n".join(lines)


def final_test_rows(final: dict) -> list[tuple[str, dict]]:
    """(label, metrics) of final.json's test table: the student before and after PROD (an evaluate-only run has
    one student, tested as it is), then each teacher."""
    test = final.get("test") or {}
    rows = [("student", test.get("student") or {})]
    if "student_before_training" in test:
        rows = [("student before training", test["student_before_training"] or {}),
                ("student after PROD", test.get("student") or {})]
    return rows + [(f"teacher {n} ({m.get('as', '')})", m) for n, m in (test.get("teachers") or {}).items()]


def plot(records: list[dict], path: Path, metric: str = DEFAULT_METRIC) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    for column in metric_columns([r.get("student_dev") for r in records], metric)[:2]:
        ax.plot(names, [r["student_dev"].get(column, float("nan")) for r in records], marker="o",
                label=f"student {column}")
    teacher = [(r.get("teacher_dev") or {}).get(metric) for r in records]
    if any(t is not None for t in teacher):
        ax.plot(names, [t if t is not None else float("nan") for t in teacher], "s--", label=f"teacher {metric}")
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
        metric = run_metric(run_dir)
        plot(records, run_dir / "report.png", metric)
        (run_dir / "report.md").write_text(render_markdown(run_dir, records, final, metric))
    return run_dir / "report.md"
