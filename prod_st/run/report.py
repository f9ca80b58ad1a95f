"""The run report: report.md (dev metrics per stage, teacher strength, student-teacher gap, wall times,
warnings, final test metrics) and report.png (the metric stage by stage). Reads only the run folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prod_st.util.distributed import is_main

METRICS = ("nDCG@10", "MRR@10", "R@100", "Acc@5", "Acc@20", "Acc@100")  # shown when present, in this order
DEFAULT_METRIC = "nDCG@10"
logger = logging.getLogger(__name__)


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


def read_run(run_dir: Path) -> tuple[dict, dict]:
    """(recipe, final.json) of a finished run folder, each as a mapping; a one-line error when unreadable."""
    import yaml

    from prod_st.util.errors import ProdStError

    out = []
    for name, load in (("recipe.yaml", yaml.safe_load), ("final.json", json.loads)):
        path = Path(run_dir) / name
        try:
            data = load(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise ProdStError(f"cannot read {path}: {' '.join(str(e).split())[:200]}") from None
        if not isinstance(data, dict):
            raise ProdStError(f"{path} is not a mapping")
        out.append(data)
    return out[0], out[1]


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _cell(value) -> str:
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


# ---- the run's description: data, teachers, schedule (report.md and the model card) -----------------------
def _dpd_negatives_text(dpd: dict) -> str:
    """DPD's negatives in the schedule table: drawn afresh every epoch from the student's top rerank_depth (the
    default since issue 20; a dump leaves it out), or its hardest in rank order."""
    if dpd.get("negatives", "sample") == "hardest":
        return f"{dpd.get('num_negatives')} hardest of the student"
    return f"{dpd.get('num_negatives')} from ranks 1-{dpd.get('rerank_depth')} of the student (sample)"


def _loss_text(loss: dict | None, kind: str) -> str:
    if kind == "warmup":
        return "hard loss only (contrastive, in-batch + hard negatives)"
    if not loss:
        return ""
    text = f"{loss.get('hard_weight')}·hard + {loss.get('kd_weight')}·KD"
    text += f" + {loss['reg_weight']}·reg" if loss.get("reg_weight") else ""
    return text + f", T = {loss.get('temperature')}"


def _length_text(spec: dict) -> str:
    if spec.get("max_steps"):
        return f"{spec['max_steps']} steps"
    epochs = spec.get("epochs")
    return f"{epochs:g} epoch(s)" if isinstance(epochs, (int, float)) else ""


def _teacher_source(spec: dict) -> str:
    if spec.get("model"):
        return f"pretrained `{spec['model']}`"
    if spec.get("members"):
        return "ensemble: " + " + ".join(f"{w:g} x {m}" for m, w in spec["members"].items()) + " (sum of logits)"
    train = spec.get("train") or {}
    text = (f"trained by prod-st from `{train.get('backbone')}` ({_length_text(train)}, lr {train.get('lr')}, "
            f"{train.get('num_negatives')} negatives")
    return text + (f" mined by {train['negatives_from']}" if train.get("negatives_from") else "") + ")"


def _schedule(recipe: dict, h: str) -> list[str]:
    data, student = recipe.get("data") or {}, recipe.get("student") or {}
    teachers, stages, dpd = recipe.get("teachers") or {}, recipe.get("stages") or [], recipe.get("dpd")
    lines = [
        f"{h} Data", "",
        f"- Dataset: `{data.get('dataset')}` (splits: train `{data.get('train_split')}`, "
        f"dev `{data.get('dev_split')}`, "
        f"test `{data.get('test_split')}`; relevance level {data.get('relevance_level')})",
        "- Subsets (seeded; *all* = the full split): "
        + ", ".join(f"{k} queries {data.get(f'{k}_queries') or 'all'}" for k in ("train", "dev", "test"))
        + f", corpus {data.get('corpus_size') or 'all'} documents",
        f"- Student: the first {student.get('num_layers') or 'all'} layers of `{student.get('init')}`; max query "
        f"length {student.get('max_query_length')}, max document length {student.get('max_doc_length')} tokens", "",
    ]
    if teachers:
        lines += [f"{h} Teachers", ""] + _table(["teacher", "kind", "source"], [
            [_cell(n), _cell(t.get("kind")), _cell(_teacher_source(t))] for n, t in teachers.items()]) + [""]
    rows = []
    for i, s in enumerate(stages, 1):
        kind, neg = s.get("kind", "distill"), s.get("negatives") or {}
        negatives = (f"{neg.get('count')} from ranks {neg.get('start')}-{neg.get('end')} of {neg.get('miner')} "
                     f"({neg.get('strategy')})") if neg else ""
        rows.append([str(i), _cell(s.get("name")), kind, _cell(s.get("teacher")), _cell(s.get("candidates")),
                     _cell(negatives), _cell(_loss_text(s.get("loss"), kind)), str(s.get("lr")), _length_text(s),
                     str(s.get("batch_size"))])
    rounds = int(dpd.get("rounds") or 1) if dpd else 0
    for r in range(1, rounds + 1):
        rows.append([str(len(stages) + r), f"dpd-{r}", "dpd", _cell(dpd.get("teacher")), "list",
                     _dpd_negatives_text(dpd), _cell(_loss_text(dpd.get("loss"), "dpd")),
                     str(dpd.get("lr")), _length_text(dpd), str(dpd.get("batch_size"))])
    lines += [f"{h} Schedule", ""] + _table(
        ["#", "stage", "kind", "teacher", "candidates", "negatives", "loss", "lr", "length", "batch"], rows)
    lines += ["", "Loss: hard = cross-entropy of the positive over the candidates; KD = T²·KL(teacher ‖ student) "
              "over "
              "the temperature softmaxes; reg = the same against a frozen copy of the stage-start student. Negatives "
              "are re-mined before each stage."]
    if dpd:
        rule = dpd.get("rule") or {}
        variant = rule.get("variant", "msmarco")
        teacher_rule = (f"the teacher ranks a relevant one within its top {rule.get('teacher_max')}"
                        if variant == "msmarco" else "the teacher ranks a relevant one better than the student (and "
                        f"within {rule.get('student_max')})")
        lines += ["", f"DPD: {dpd.get('rounds')} round(s). The teacher `{dpd.get('teacher')}` reranks the "
                  "student's top "
                  f"{dpd.get('rerank_depth')} for each training query; a query is kept when the student's first "
                  f"relevant document is at rank {rule.get('student_min')}-{rule.get('student_max')} and "
                  f"{teacher_rule} ({variant} rule)."]
    return lines + [""]


# ---- the measurements (report.md and the model card) -------------------------------------------------------
def _stages(records: list[dict], metric: str, h: str, detail: bool) -> list[str]:
    """Dev metrics per stage; `detail` (report.md) adds the teacher's reranking, the gaps and wall times."""
    dev_cols = metric_columns([r.get("student_dev") for r in records], metric)
    teacher_metric = metric_columns([r.get("teacher_dev") for r in records], metric)[0]
    rerank_cols = metric_columns([r.get("teacher_rerank_dev") for r in records], metric)[:2]
    header = ["#", "stage", "teacher", *(f"student {c}" for c in dev_cols), f"teacher {teacher_metric} (measured as)"]
    header += (["teacher reranking the student's top-k: " + " / ".join(rerank_cols), "gap before: KL / tau / top-1",
                "gap after: KL / tau / top-1", "wall time (s)"] if detail else ["train steps", "DPD: kept queries"])
    rows = []
    for r in records:
        dev, teacher = r.get("student_dev") or {}, r.get("teacher_dev") or {}
        cells = [str(r.get("index")), _cell(r.get("name")), _cell(r.get("teacher")),
                 *(_num(dev.get(c)) for c in dev_cols),
                 f"{_num(teacher.get(teacher_metric))} ({r.get('teacher_measured_as')})" if teacher else ""]
        if detail:
            reranked = r.get("teacher_rerank_dev") or {}
            cells.append(" / ".join(_num(reranked.get(c)) for c in rerank_cols) if reranked else "")
            cells += [" / ".join(f"{g[k]:.3f}" for k in ("kl", "kendall_tau", "top1_agreement")) if g else ""
                      for g in (r.get("gap_before"), r.get("gap_after"))]
            cells.append(f"{sum((r.get('seconds') or {}).values()):.0f}")
        else:
            cells += [str((r.get("train") or {}).get("steps", "")), str((r.get("selection") or {}).get("kept", ""))]
        rows.append(cells)
    lines = [f"{h} Dev metrics per stage", ""] + _table(header, rows)
    if detail:
        lines += ["", "Gap = teacher vs student over the student's dev top-k: T^2-scaled KL of their temperature "
                  "softmaxes, Kendall tau of their orderings, share of queries where both rank the same document "
                  "first."]
    warnings = [(r.get("name"), w) for r in records for w in r.get("warnings") or []]
    lines += ["", f"{h} Warnings", ""] + ([f"- **{_cell(n)}**: {_cell(w)}" for n, w in warnings] or ["None."])
    return lines + [""]


def _tests(final: dict, metric: str, h: str) -> list[str]:
    lines = []
    if final.get("test"):
        rows = final_test_rows(final)
        cols = metric_columns([m for _, m in rows], metric)
        size = f" ({final.get('num_test_queries')} queries, {final.get('num_docs')} documents)"
        lines += [f"{h} Test{size}", ""] + _table(["model", *cols], [[_cell(label), *(_num(m.get(c)) for c in cols)]
                                                                     for label, m in rows]) + [""]
    beir = {k: v for k, v in (final.get("beir") or {}).items() if k != "average" and isinstance(v, dict)}
    if beir:
        cols = metric_columns(list(beir.values()), DEFAULT_METRIC)
        average = {c: sum(m[c] for m in beir.values()) / len(beir)
                   for c in cols if all(isinstance(m.get(c), (int, float)) for m in beir.values())}
        rows = [[_cell(n), *(_num(m.get(c)) for c in cols)] for n, m in beir.items()]
        rows.append([f"**average ({len(beir)})**", *(_num(average.get(c)) for c in cols)])
        lines += [f"{h} BEIR zero-shot", ""] + _table(["dataset", *cols], rows) + [""]
    return lines


def render_prod_section(recipe: dict, records: list[dict], final: dict | None, *, level: int = 3,
                        detail: bool = False) -> str:
    """The run as markdown, shared by report.md (`detail`: teacher reranking, gaps, wall times) and the model
    card: data, teachers and schedule, dev metrics per stage, warnings, test and BEIR metrics. Metric tables
    show the metrics that exist, headed by the recipe's eval.metric."""
    h, metric = "#" * level, headline_metric(recipe)
    lines = _schedule(recipe, h) if recipe.get("data") else []
    return "\n".join(lines + (_stages(records, metric, h, detail) if records else []) + _tests(final or {}, metric, h))


def render_markdown(run_dir: Path, records: list[dict], final: dict | None, metric: str | None = None,
                    *, plot: bool = True) -> str:
    """report.md: the run (`render_prod_section`, with details), wall time per step, DPD counts, the plot."""
    import yaml

    try:
        recipe = yaml.safe_load((Path(run_dir) / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    if metric:
        recipe = recipe | {"eval": (recipe.get("eval") or {}) | {"metric": metric}}
    name = final["recipe"] if final else Path(run_dir).name
    lines = [f"# PROD run `{name}`", "", f"Run folder: `{run_dir}`", "",
             render_prod_section(recipe, records, final, level=2, detail=True)]
    steps = [[_cell(r["name"]), k, f"{v:.1f}"] for r in records for k, v in (r.get("seconds") or {}).items()]
    lines += ["## Wall time per step", ""] + _table(["stage", "step", "seconds"], steps)
    selections = [r for r in records if r.get("selection")]
    if selections:
        lines += ["", "## Data progressive distillation", ""]
        lines += [f"- {r['name']}: " + ", ".join(f"{k} {v}" for k, v in r["selection"].items()) for r in selections]
    if final:
        lines += ["", f"Total wall time: {final['seconds']['run']:.0f} s."]
    lines += ["", "![metric per stage](report.png)", ""] if plot else [""]
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


def plot(records: list[dict], path: Path, metric: str = DEFAULT_METRIC) -> bool:
    """Draw report.png; False (and no file) without matplotlib, the `plot` extra: the report is then its tables."""
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed (pip install 'prod-st[plot]'): report.md without report.png")
        return False

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
    return True


def write_report(run_dir: Path) -> Path:
    """Write report.md and report.png into `run_dir` (rank 0 only) and return report.md's path."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    final_path = run_dir / "final.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    if is_main():
        metric = run_metric(run_dir)
        drawn = plot(records, run_dir / "report.png", metric)
        (run_dir / "report.md").write_text(render_markdown(run_dir, records, final, metric, plot=drawn))
    return run_dir / "report.md"
