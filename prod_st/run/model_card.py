"""The student's model card: sentence-transformers' own card, with what SentenceTransformerTrainer recorded in
the model's card data at every stage (each stage's training data with its statistics, loss and its citation,
hyperparameters, training logs, dev metrics through `RetrievalEvaluator`), the test and BEIR metrics in its
model-index, and the PROD section of the run's report (`prod_st.run.report.render_prod_section`).

A stage keeps its card data in `<stage>/card.json` (a run resumes in another process, and each stage loads the
student anew); at the end of the run `write_card` renders `<run>/student/README.md` from them, and `prod-st push`
publishes that card, with the repository id in place of sentence-transformers' model id placeholder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prod_st.util.paths import write_text_atomic

logger = logging.getLogger(__name__)

STAGE_CARD = "card.json"
MODEL_ID_PLACEHOLDER = "sentence_transformers_model_id"  # what sentence-transformers writes without a model id
MARKER = "<!-- prod-st: the PROD section -->"  # a card written by write_card
PROD_TAGS = ("prod", "knowledge-distillation", "dense-retrieval")
PACKAGED_HUB_IDS = {  # packaged model names (prod_st.util.model_paths.PACKAGED) -> their Hub id, for `base_model`
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}
KEPT_DATASET_KEYS = ("name", "split", "size", "columns", "stats_table", "examples_table", "loss")


def save_stage_card(model, folder: Path, stage: str, dataset: str) -> None:
    """Write what the trainer (and the dev evaluator) recorded in `model.model_card_data` to `folder/card.json`."""
    card = model.model_card_data
    name = f"{Path(str(dataset)).name}: {stage}"
    train = [{k: d[k] for k in KEPT_DATASET_KEYS if k in d} | {"name": name, "split": "train"}
             for d in card.train_datasets]
    logs: list[dict] = []
    for row in card.training_logs:
        if "Training Loss" in row or row.get("Step") or not logs:
            logs.append(dict(row))
        else:  # the dev evaluation after training (recorded at step 0) joins the stage's last step
            logs[-1].update({k: v for k, v in row.items() if k not in ("Epoch", "Step")})
    evaluations = [{"name": getattr(e, "name", ""), "primary": getattr(e, "primary_metric", None),
                    "config": e.get_config_dict(), "metrics": m} for e, m in card.eval_results_dict.items()]
    payload = {"stage": stage, "train_datasets": train, "citations": card.citations, "tags": card.tags,
               "non_default_hyperparameters": card.non_default_hyperparameters,
               "all_hyperparameters": card.all_hyperparameters, "training_logs": logs,
               "evaluations": evaluations}
    write_text_atomic(folder / STAGE_CARD, json.dumps(payload, indent=2, default=str) + "\n")


def _restore(model, stage_cards: list[dict]) -> None:
    """Fill `model.model_card_data` from the stages' card.json, in schedule order: every stage's training data,
    losses and citations, the hyperparameters that differ from the defaults (per stage), the training logs on
    one step axis, and the last stage's dev metrics."""
    from prod_st.retrieval.retrieval_evaluator import RetrievalEvaluator

    card, offset = model.model_card_data, 0
    for stage in stage_cards:
        card.train_datasets += stage["train_datasets"]
        card.citations |= stage["citations"]
        card.add_tags(stage["tags"])
        for field in ("non_default_hyperparameters", "all_hyperparameters"):
            getattr(card, field).update({f"{stage['stage']}: {k}": v for k, v in stage.get(field, {}).items()})
        rows = [{"Stage": stage["stage"], **row, "Step": row["Step"] + offset} for row in stage["training_logs"]]
        card.training_logs += rows
        offset = max([offset] + [row["Step"] for row in rows])
    evaluated = [stage["evaluations"] for stage in stage_cards if stage["evaluations"]]
    for evaluation in (evaluated[-1] if evaluated else []):  # the dev metrics of the final student
        evaluator = RetrievalEvaluator(name=evaluation["name"], metric=evaluation["primary"] or "nDCG@10",
                                       **evaluation["config"])
        card.eval_results_dict[evaluator] = evaluation["metrics"]


def _base_model(init: str | None) -> str | None:
    """The Hub id of the student's init model, when it is one (a packaged name or a `user/name` id)."""
    from prod_st.util.errors import ProdStError
    from prod_st.util.hub import check_repo_id

    if not init or Path(init).expanduser().exists():
        return None
    try:
        return PACKAGED_HUB_IDS.get(init) or check_repo_id(init)
    except ProdStError:
        return None


def write_card(run: Path, out: Path, *, model_id: str | None = None, language: str | None = "en",
               license: str | None = "apache-2.0") -> Path:
    """Render `out/README.md`: sentence-transformers' card of the run's student (`<run>/student`, loaded from
    disk, nothing looked up on the Hub) filled from the stages' card.json and final.json, then the PROD
    section. Returns its path."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.model_card import generate_model_card

    from prod_st.retrieval.retrieval_evaluator import RetrievalEvaluator
    from prod_st.run.report import headline_metric, load_records, read_run, render_prod_section
    from prod_st.util.citation import PROD_BIBTEX

    recipe, final = read_run(run)
    records = load_records(run)
    model = SentenceTransformer(str(run / "student"), device="cpu", local_files_only=True)
    card = model.model_card_data
    card.local_files_only = True
    stage_cards = [json.loads((run / f"{r['index']:02d}-{r['name']}" / STAGE_CARD).read_text())
                   for r in records if (run / f"{r['index']:02d}-{r['name']}" / STAGE_CARD).is_file()]
    _restore(model, stage_cards)
    data, student, metric = recipe.get("data") or {}, recipe.get("student") or {}, headline_metric(recipe)
    test_name = f"{Path(str(data.get('dataset'))).name}-{data.get('test_split')}"
    tested = {test_name: ((final.get("test") or {}).get("student"), metric)}
    tested |= {f"beir-{Path(name).name}": (m, "nDCG@10") for name, m in (final.get("beir") or {}).items()
               if name != "average"}
    settings = recipe.get("eval") or {}
    settings = {"top_k": settings.get("top_k", 1000), "index_factory": settings.get("index", "Flat")}
    for name, (metrics, primary) in tested.items():  # into the model-index, not into the training logs
        if isinstance(metrics, dict) and metrics:
            level = data.get("test_relevance_level") or data.get("relevance_level") or 1
            evaluator = RetrievalEvaluator(name=name, metric=primary, relevance_level=1 if name.startswith("beir-")
                                           else level, **settings)
            card.eval_results_dict[evaluator] = evaluator.prefix_name_to_metrics(metrics, name)
    if model_id:
        card.set_model_id(model_id)
    if language:
        card.set_language(language)
    if license:
        card.set_license(license)
    card.add_tags(list(PROD_TAGS))
    card.base_model = _base_model(student.get("init"))
    layers, origin = student.get("num_layers"), card.base_model or Path(str(student.get("init") or "")).name
    card.model_name = " ".join(part for part in ("PROD student", f"(first {layers} layers)" if layers else "",
                                                 f"of {origin}" if origin else "") if part)
    card.task_name = "dense retrieval (semantic search): encode queries and documents, rank documents by similarity"
    card.ir_model = True  # the usage snippet shows encode_query / encode_document
    if not any("lin2023prod" in c for c in card.citations.values()):  # no stage recorded PRODLoss's own
        card.citations["PROD"] = PROD_BIBTEX
    model._model_card_text = None  # a fresh card, not the README.md the folder came with
    card.save_dir = str(out)
    intro = ("## PROD: progressive distillation\n\n"
             f"This model was trained with prod-st (recipe `{recipe.get('name', final.get('recipe', ''))}`), an "
             "implementation of PROD (Lin et al., WWW 2023, [arXiv:2209.13335](https://arxiv.org/abs/2209.13335)) on "
             "sentence-transformers: a small dual-encoder student is distilled from a chain of progressively stronger "
             "teachers (teacher progressive distillation), then on the training queries it still narrowly misses "
             "(data progressive distillation, DPD). The run's recipe, report and test metrics are under `prod/`.\n")
    prod = f"{MARKER}\n{intro}\n{render_prod_section(recipe, records, final, level=3)}\n"
    text = generate_model_card(model)
    at = text.find("\n## Training Details")  # after sentence-transformers' evaluation, before its training details
    text = text[:at + 1] + prod + text[at:] if at >= 0 else text.rstrip("\n") + "\n\n" + prod
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "README.md", text)
    return out / "README.md"


def set_model_id(readme: Path, model_id: str) -> bool:
    """Put `model_id` into a card written by write_card (as sentence-transformers does when it pushes a card it
    wrote earlier); False when `readme` is not such a card."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if MARKER not in text:
        return False
    readme.write_text(text.replace(f'("{MODEL_ID_PLACEHOLDER}")', f'("{model_id}")'), encoding="utf-8")
    return True
