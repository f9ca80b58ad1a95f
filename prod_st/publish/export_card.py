"""The dataset card (README.md) of a `prod-st export` folder: the Hub's YAML header (one config per layout and
stage, plus corpus and queries) and, per stage, the teacher, its strength check, the stage's recipe, the scale of
the scores and how to load them."""

from __future__ import annotations

from pathlib import Path

import yaml

from prod_st.run.report import run_metric
from prod_st.util.paths import write_text_atomic


def scale_text(labels: dict, kind: str | None) -> str:
    """What the scores are, in words: raw logits or a scaled similarity."""
    scale = labels.get("scale")
    kind = labels.get("kind") or kind
    if kind == "cross-encoder":
        return "raw logits of the cross-encoder (unscaled)"
    if kind == "bi-encoder" and scale is not None:
        similarity = "cosine similarity" if scale != 1 else "dot product"
        return f"scaled {similarity}: the bi-encoder's {similarity} x {scale:g}"
    if kind == "ensemble":
        return ("the weighted sum of its members' scores, each in its own scale (a cross-encoder's raw logits, a "
                "bi-encoder's similarity x its scale: cosine x 20)")
    return "the scale the student trained on (this run is older than the record of the teacher's scale)"


def _teacher_text(name: str, spec: dict) -> str:
    kind = spec.get("kind", "?")
    if spec.get("model"):
        return f"`{name}`: a pretrained {kind}, `{spec['model']}`"
    if spec.get("train"):
        return f"`{name}`: a {kind} trained in the run from `{spec['train'].get('backbone')}`"
    if spec.get("members"):
        members = ", ".join(f"`{m}` x {w:g}" for m, w in spec["members"].items())
        return f"`{name}`: an ensemble of {members}"
    return f"`{name}`: a {kind}"


def _metric(metrics: dict, metric: str) -> str:
    value = (metrics or {}).get(metric)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


def _strength(stage, previous: dict, metric: str) -> str:
    r = stage.record
    lines = [f"- teacher on dev, as {r.get('teacher_measured_as') or 'measured'}: {metric} "
             f"{_metric(r.get('teacher_dev'), metric)}; the student it taught, before the stage: "
             f"{_metric(previous.get('student_dev'), metric)}; after: {_metric(r.get('student_dev'), metric)}"]
    if r.get("teacher_rerank_dev"):
        lines.append(f"- teacher reranking the student's dev top-k: {metric} {_metric(r['teacher_rerank_dev'], metric)}")
    warnings = r.get("warnings") or []
    lines += [f"- warning: {w}" for w in warnings] or ["- check passed: the teacher is stronger than its student "
                                                       "(and not weaker than the previous stage's teacher)"]
    return "\n".join(lines)


def _stage_recipe(recipe: dict, stage) -> dict:
    name = stage.folder.split("-", 1)[1]
    if stage.record.get("kind") == "dpd" or name.startswith("dpd-"):
        return {"dpd": recipe.get("dpd")}
    return next((s for s in recipe.get("stages") or [] if s.get("name") == name), {})


def header(stages, formats: tuple[str, ...]) -> dict:
    configs = []
    for stage in stages:
        for config in stage.configs:
            configs.append({"config_name": config, "data_files": [{"split": "train", "path": f"data/{config}/*.parquet"}]})
    if "ids" in formats:
        configs += [{"config_name": name, "data_files": [{"split": "train", "path": f"data/{name}/*.parquet"}]}
                    for name in ("corpus", "queries")]
    return {"tags": ["sentence-transformers", "prod-st", "knowledge-distillation", "hard-negatives", "teacher-scores"],
            "task_categories": ["sentence-similarity", "text-retrieval"], "language": ["en"], "configs": configs}


def render(run: Path, stages, *, formats: tuple[str, ...], repo_id: str | None, corpus_rows: int,
           query_rows: int) -> str:
    recipe = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")) or {}
    metric = run_metric(run)
    dataset = (recipe.get("data") or {}).get("dataset")
    where = repo_id or "path/to/this/folder"
    first = stages[0].folder
    lines = [
        "---", yaml.safe_dump(header(stages, formats), sort_keys=False).rstrip(), "---", "",
        f"# Teacher scores of the PROD run `{recipe.get('name')}` ({dataset})", "",
        "Hard negatives with their teacher's scores, one dataset per PROD stage, written by `prod-st export` from "
        "the run's own training rows: exactly what each stage's student was distilled on (every epoch's fresh "
        "draw of negatives, positive first).", "",
        "| config | stage | teacher | scores | rows | negatives per row | scored pairs |",
        "|---|---|---|---|---|---|---|",
    ]
    teachers = recipe.get("teachers") or {}
    for stage in stages:
        teacher = stage.labels.get("teacher") or stage.record.get("teacher")
        kind = stage.labels.get("kind") or (teachers.get(teacher) or {}).get("kind")
        rows = stage.text_rows if "text" in formats else stage.rows
        pairs = stage.pairs if "ids" in formats else rows * (1 + stage.negatives)
        lines.append(f"| {', '.join(f'`{c}`' for c in stage.configs)} | {stage.record.get('kind', '?')} | "
                     f"`{teacher}` ({kind}) | {scale_text(stage.labels, kind)} | {rows:,} | {stage.negatives} | "
                     f"{pairs:,} |")
    if "ids" in formats:
        lines += ["", f"`corpus`: the {corpus_rows:,} documents these rows name (`_id`, `text`: the text as the "
                  f"teacher read it, title and text joined); `queries`: their {query_rows:,} queries (`_id`, `text`)."]
    lines += ["", "## Layouts", ""]
    if "text" in formats:
        lines += ["- `<stage>`: `query`, `positive`, `negative_1` ... `negative_k` (texts) and `score` (the teacher's "
                  "k+1 scores, the positive's first): sentence-transformers' n-tuple layout with scores, read as it is "
                  "by `SentenceTransformerTrainer` with `DistillKLDivLoss` or `MarginMSELoss`. Rows whose query had "
                  "fewer than k negatives are left out."]
    if "ids" in formats:
        lines += ["- `<stage>-ids`: `query_id`, `corpus_ids` (the positive first, then the negatives) and `scores` "
                  "(the teacher's, in the same order), like the `msmarco-scores-*` datasets; join `corpus_ids` with "
                  "`corpus` and `query_id` with `queries`."]
    lines += ["", "## Load and train", "", "```python", "from datasets import load_dataset",
              "from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer",
              "from sentence_transformers.losses import DistillKLDivLoss", "",
              f'train = load_dataset("{where}", "{first}", split="train")'
              if repo_id else f'train = load_dataset("parquet", data_files="{where}/data/{first}/*.parquet", split="train")',
              'model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")',
              "loss = DistillKLDivLoss(model)  # the scores are logits already: temperature 1",
              "SentenceTransformerTrainer(model=model, train_dataset=train, loss=loss).train()", "```", "",
              "The scores are in the scale the PROD student trained on (see each stage): a cross-encoder's logits as "
              "they are, a cosine bi-encoder's cosine x 20, so a softmax over them is the teacher's distribution "
              "over the row's candidates.", ""]
    for stage in stages:
        record, teacher = stage.record, stage.labels.get("teacher") or stage.record.get("teacher")
        previous = _previous_record(run, record["index"]) if "index" in record else {}
        spec = teachers.get(teacher) or {}
        lines += [f"## Stage `{stage.folder}` ({record.get('kind', '?')})", "",
                  f"- teacher: {_teacher_text(teacher, spec)}",
                  f"- scores: {scale_text(stage.labels, spec.get('kind'))}",
                  f"- candidates: {stage.labels.get('candidates', 'list')}; {stage.rows:,} training rows "
                  f"({stage.text_rows:,} in the text layout)",
                  "", f"Teacher strength ({metric}, the run's dev queries):", "", _strength(stage, previous, metric),
                  "", "The stage in the recipe:", "", "```yaml",
                  yaml.safe_dump(_stage_recipe(recipe, stage), sort_keys=False).rstrip(), "```", ""]
        if record.get("selection"):
            lines += [f"DPD's selection of training queries: {record['selection']}", ""]
    lines += ["## Provenance", "",
              f"Run `{run.name}`, recipe `{recipe.get('name')}` on `{dataset}` (the resolved recipe is `recipe.yaml` "
              "in this folder); written by `prod-st export` (PROD: Lin et al., WWW 2023, "
              "[arXiv:2209.13335](https://arxiv.org/abs/2209.13335)).", ""]
    return "\n".join(lines)


def _previous_record(run: Path, index: int) -> dict:
    """metrics.json of the step before step `index` (the student the stage's teacher taught)."""
    import json

    for folder in run.iterdir():
        if folder.name[:2] == f"{index - 1:02d}" and (folder / "metrics.json").is_file():
            try:
                return json.loads((folder / "metrics.json").read_text())
            except ValueError:
                return {}
    return {}


def write_card(path: Path, run: Path, stages, *, formats: tuple[str, ...], repo_id: str | None, corpus_rows: int,
               query_rows: int) -> None:
    import shutil

    write_text_atomic(path, render(run, stages, formats=formats, repo_id=repo_id, corpus_rows=corpus_rows,
                                   query_rows=query_rows))
    shutil.copy2(run / "recipe.yaml", path.parent / "recipe.yaml")
