"""Publish a finished run's student on the Hugging Face Hub.

``build_upload_folder`` writes what would be uploaded: the final student (``<run>/student/``), its model card
(``README.md``: sentence-transformers' own card for the model, with the repo id, language, license and PROD
tags set, plus a PROD section: the schedule, dev metrics per stage, test metrics, BEIR zero-shot if the run
has it, usage and PROD's citation) and, under ``prod/``, the run's recipe.yaml, report.md/report.png and
final.json. ``push_run`` builds that folder in a temporary directory (or, for a dry run, in
``<run>/hub-upload/``) and uploads it with ``HfApi.create_repo`` + ``HfApi.upload_folder``.

Nothing here writes into the run's own files, and every failure is a one-line :class:`ProdStError` that
says what to do (log in, go online or use --dry-run, pass --exist-ok). Only rank 0 pushes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from prod_st.citation import PROD_BIBTEX
from prod_st.distributed import is_main
from prod_st.errors import ProdStError

logger = logging.getLogger(__name__)

__all__ = ["PROD_BIBTEX", "PROD_TAGS", "build_upload_folder", "push_run", "render_prod_section", "validate_repo_id"]

PROD_TAGS = ("prod", "knowledge-distillation", "dense-retrieval")
UPLOAD_DIR = "hub-upload"  # the dry run's default folder, inside the run folder
HUB = "https://huggingface.co"
PACKAGED_HUB_IDS = {  # packaged model names (prod_st.models.PACKAGED) -> their Hub id, for `base_model`
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")

SBERT_BIBTEX = """@inproceedings{reimers-2019-sentence-bert,
    title = "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
    author = "Reimers, Nils and Gurevych, Iryna",
    booktitle = "Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing",
    month = "11",
    year = "2019",
    publisher = "Association for Computational Linguistics",
    url = "https://arxiv.org/abs/1908.10084",
}"""

NO_TOKEN = ("no Hugging Face token: run `huggingface-cli login` (`hf auth login` with huggingface_hub 1.0+) "
            "or set HF_TOKEN")
OFFLINE = "cannot reach the Hugging Face Hub (offline?); use --dry-run to write the folder locally"


# ----------------------------------------------------------------------------------------------- checks
def validate_repo_id(repo_id: str) -> str:
    """`user/name` (or `org/name`): letters, digits, '-', '_', '.', no '--' / '..', at most 96 characters."""
    text = str(repo_id or "").strip()
    shape_ok = bool(REPO_ID_PATTERN.match(text)) and len(text) <= 96 and "--" not in text and ".." not in text \
        and not text.endswith(".git")
    if shape_ok:
        try:
            from huggingface_hub.utils import validate_repo_id as hub_validate

            hub_validate(text)
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency of sentence-transformers
            pass
        except ValueError:
            shape_ok = False
    if not shape_ok:
        raise ProdStError(
            f"invalid Hub repository id {str(repo_id)!r}: use `user/name` (or `org/name`) with letters, digits, "
            "'-', '_' and '.', no '--' or '..', at most 96 characters"
        )
    return text


def _finished_run(run_dir: Path | str) -> Path:
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ProdStError(f"run folder not found: {run}")
    if not (run / "final.json").is_file():
        raise ProdStError(f"{run} is not a finished run (no final.json): finish it with `prod-st run` first")
    if not (run / "student" / "modules.json").is_file():
        raise ProdStError(f"{run} has no final student ({run / 'student'} is missing): finish the run with "
                          "`prod-st run` first")
    _check_student_layers(run)
    return run


def _check_student_layers(run: Path) -> None:
    """The card describes the student as the recipe's first `student.num_layers` layers: refuse a saved student
    whose own config says otherwise (read from its config.json, without loading it) rather than publish a card
    that contradicts the model."""
    from prod_st.models import saved_layer_count

    expected = (_read_recipe(run).get("student") or {}).get("num_layers")
    found = saved_layer_count(run / "student")
    if expected is not None and found is not None and found != expected:
        raise ProdStError(f"{run / 'student'} has {found} transformer layers but the run's recipe says "
                          f"student.num_layers: {expected}: its model card would contradict the model; publish the "
                          "student that run made")


def _is_upload_folder(folder: Path) -> bool:
    """A folder this module wrote earlier (safe to replace)."""
    return folder.is_dir() and (folder / "prod" / "recipe.yaml").is_file() and (folder / "modules.json").is_file()


def _check_out_dir(run: Path, out: Path) -> None:
    """Refuse an output folder that would overwrite the run (or anything that is not an earlier upload folder)."""
    r, o = run.resolve(), out.resolve()
    if o == r or o in r.parents:
        raise ProdStError(f"the upload folder {out} would overwrite the run folder {run}: choose another folder")
    if r in o.parents:
        top = r / o.relative_to(r).parts[0]
        if top.exists() and not _is_upload_folder(top):
            raise ProdStError(f"the upload folder {out} lies inside the run's own files ({top.name}): choose "
                              f"another folder, e.g. {run / UPLOAD_DIR}")
    if o.exists():
        if not o.is_dir():
            raise ProdStError(f"the upload folder {out} exists and is not a folder: choose another folder")
        if any(o.iterdir()) and not _is_upload_folder(o):
            raise ProdStError(f"the upload folder {out} exists and is not empty (and not an earlier upload folder): "
                              "choose a new or empty folder")


# ----------------------------------------------------------------------------------------------- model card
def _base_model(init: str | None) -> str | None:
    """The Hub id of the student's init model, when it is one (a packaged name or a `user/name` id)."""
    if not init:
        return None
    if init in PACKAGED_HUB_IDS:
        return PACKAGED_HUB_IDS[init]
    if REPO_ID_PATTERN.match(init) and not Path(init).expanduser().exists():
        return init
    return None


def _st_model_card(student_dir: Path, out: Path, *, repo_id: str, recipe: dict, language, license: str | None) -> str:
    """sentence-transformers' own model card for the student, generated as `SentenceTransformer.save` does
    (`generate_model_card` over `model.model_card_data`), with the Hub id, language, license and tags set.
    Nothing is looked up on the Hub (local_files_only)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.model_card import generate_model_card

    model = SentenceTransformer(str(student_dir), device="cpu", local_files_only=True)
    card = model.model_card_data
    card.local_files_only = True  # no base-model / dataset look-ups on the Hub
    card.set_model_id(repo_id)
    if language:
        card.set_language(language)
    if license:
        card.set_license(license)
    card.add_tags(list(PROD_TAGS))
    student = recipe.get("student") or {}
    base = _base_model(student.get("init"))
    if base:
        card.base_model = base
    layers, origin = student.get("num_layers"), base or student.get("init")
    card.model_name = " ".join(
        part for part in ("PROD student", f"(first {layers} layers)" if layers else "",
                          f"of {origin}" if origin else "") if part
    )
    card.task_name = "dense retrieval (semantic search): encode queries and documents, rank documents by similarity"
    card.ir_model = True  # a retriever: the usage snippet shows encode_query / encode_document
    card.citations = {"Sentence Transformers": SBERT_BIBTEX}
    # A model loaded from a folder reuses that folder's README.md on save; we want a fresh card instead.
    model._model_card_text = None
    card.save_dir = str(out)
    return generate_model_card(model)


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _loss_text(loss: dict | None, kind: str) -> str:
    if kind == "warmup":
        return "hard loss only (contrastive, in-batch + hard negatives)"
    if not loss:
        return ""
    parts = [f"{loss.get('hard_weight')}·hard + {loss.get('kd_weight')}·KD"]
    if loss.get("reg_weight"):
        parts.append(f"{loss.get('reg_weight')}·reg")
    return " + ".join(parts) + f", T = {loss.get('temperature')}"


def _length_text(spec: dict) -> str:
    if spec.get("max_steps"):
        return f"{spec['max_steps']} steps"
    epochs = spec.get("epochs")
    return f"{epochs:g} epoch(s)" if isinstance(epochs, (int, float)) else ""


def _negatives_text(neg: dict | None) -> str:
    if not neg:
        return ""
    return (f"{neg.get('count')} from ranks {neg.get('start')}-{neg.get('end')} of {neg.get('miner')} "
            f"({neg.get('strategy')})")


def _teacher_source(spec: dict) -> str:
    if spec.get("model"):
        return f"pretrained `{spec['model']}`"
    if spec.get("members"):
        return "ensemble: " + " + ".join(f"{w:g} x {m}" for m, w in spec["members"].items()) + " (sum of logits)"
    train = spec.get("train") or {}
    text = f"trained by prod-st from `{train.get('backbone')}` ({_length_text(train)}, lr {train.get('lr')}, " \
           f"{train.get('num_negatives')} negatives"
    if train.get("negatives_from"):
        text += f" mined by {train['negatives_from']}"
    return text + ")"


def render_prod_section(recipe: dict, records: list[dict], final: dict, *, repo_id: str) -> str:
    """The PROD part of the model card (markdown): schedule, dev metrics per stage, test, BEIR, usage, citation.
    Metric tables show the metrics that exist, headed by the recipe's eval.metric."""
    from prod_st.report import DEFAULT_METRIC, headline_metric, metric_columns

    metric = headline_metric(recipe)
    data, student = recipe.get("data") or {}, recipe.get("student") or {}
    teachers, stages, dpd = recipe.get("teachers") or {}, recipe.get("stages") or [], recipe.get("dpd")
    lines = [
        "",
        "## PROD: progressive distillation",
        "",
        f"This model was trained with prod-st (recipe `{recipe.get('name', final.get('recipe', ''))}`), "
        "an implementation of PROD (Lin et al., WWW 2023, [arXiv:2209.13335](https://arxiv.org/abs/2209.13335)) on "
        "sentence-transformers: a small dual-encoder student is distilled from a chain of progressively stronger "
        "teachers (teacher progressive distillation), then on the training queries it still narrowly misses "
        "(data progressive distillation, DPD).",
        "",
        "### Data",
        "",
        f"- Dataset: `{data.get('dataset')}` (splits: train `{data.get('train_split')}`, "
        f"dev `{data.get('dev_split')}`, test `{data.get('test_split')}`; "
        f"relevance level {data.get('relevance_level')})",
        "- Subsets (seeded; *all* = the full split): "
        + ", ".join(f"{k} queries {data.get(f'{k}_queries') or 'all'}" for k in ("train", "dev", "test"))
        + f", corpus {data.get('corpus_size') or 'all'} documents",
        f"- Student: the first {student.get('num_layers') or 'all'} layers of `{student.get('init')}`; max query "
        f"length {student.get('max_query_length')}, max document length {student.get('max_doc_length')} tokens",
        "",
    ]
    if teachers:
        lines += ["### Teachers", "", "| teacher | kind | source |", "|---|---|---|"]
        lines += [f"| {_cell(n)} | {_cell(t.get('kind'))} | {_cell(_teacher_source(t))} |" for n, t in teachers.items()]
        lines.append("")
    lines += [
        "### Schedule",
        "",
        "| # | stage | kind | teacher | candidates | negatives | loss | lr | length | batch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(stages, 1):
        kind = s.get("kind", "distill")
        lines.append(
            f"| {i} | {_cell(s.get('name'))} | {kind} | {_cell(s.get('teacher') or '')} | {_cell(s.get('candidates'))} "
            f"| {_cell(_negatives_text(s.get('negatives')))} | {_cell(_loss_text(s.get('loss'), kind))} "
            f"| {s.get('lr')} | {_length_text(s)} | {s.get('batch_size')} |"
        )
    if dpd:
        for r in range(1, int(dpd.get("rounds") or 1) + 1):
            lines.append(
                f"| {len(stages) + r} | dpd-{r} | dpd | {_cell(dpd.get('teacher'))} | list "
                f"| {dpd.get('num_negatives')} hardest of the student | {_cell(_loss_text(dpd.get('loss'), 'dpd'))} "
                f"| {dpd.get('lr')} | {_length_text(dpd)} | {dpd.get('batch_size')} |"
            )
    lines += [
        "",
        "Loss: hard = cross-entropy of the positive over the candidates; KD = T²·KL(teacher ‖ student) over the "
        "temperature softmaxes; reg = the same against a frozen copy of the stage-start student. Negatives are "
        "re-mined before each stage.",
    ]
    if dpd:
        rule = dpd.get("rule") or {}
        variant = rule.get("variant", "msmarco")
        if variant == "msmarco":
            teacher_rule = f"the teacher ranks a relevant one within its top {rule.get('teacher_max')}"
        else:
            teacher_rule = ("the teacher ranks a relevant one better than the student (and within "
                            f"{rule.get('student_max')})")
        lines += [
            "",
            f"DPD: {dpd.get('rounds')} round(s). The teacher `{dpd.get('teacher')}` reranks the student's top "
            f"{dpd.get('rerank_depth')} for each training query; a query is kept when the student's first relevant "
            f"document is at rank {rule.get('student_min')}-{rule.get('student_max')} and {teacher_rule} "
            f"({variant} rule).",
        ]
    lines.append("")

    if records:
        dev_cols = metric_columns([r.get("student_dev") for r in records], metric)
        teacher_metric = metric_columns([r.get("teacher_dev") for r in records], metric)[0]
        header = ["#", "stage", "teacher", *(f"student {c}" for c in dev_cols),
                  f"teacher {teacher_metric} (measured as)", "train steps", "DPD: kept queries"]
        lines += ["### Dev metrics per stage", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in records:
            dev, teacher = r.get("student_dev") or {}, r.get("teacher_dev") or {}
            teacher_cell = f"{_num(teacher.get(teacher_metric))} ({r.get('teacher_measured_as')})" if teacher else ""
            kept = (r.get("selection") or {}).get("kept", "")
            cells = [str(r.get("index")), _cell(r.get("name")), _cell(r.get("teacher") or ""),
                     *(_num(dev.get(c)) for c in dev_cols), _cell(teacher_cell),
                     str((r.get("train") or {}).get("steps", "")), str(kept)]
            lines.append("| " + " | ".join(cells) + " |")
        warnings = [(r.get("name"), w) for r in records for w in r.get("warnings") or []]
        lines += ["", "Warnings raised during the run:" if warnings else "No warnings were raised during the run.", ""]
        lines += [f"- **{_cell(name)}**: {_cell(w)}" for name, w in warnings]
        if warnings:
            lines.append("")

    test = final.get("test") or {}
    if test:
        size = ""
        if final.get("num_test_queries") is not None:
            size = f" ({final['num_test_queries']} queries, {final.get('num_docs')} documents)"
        rows = []
        if "student_before_training" in test:
            rows.append(("student before training", test["student_before_training"]))
        if "student" in test:
            rows.append(("**student after PROD (this model)**", test["student"]))
        rows += [(f"teacher {n} ({m.get('as', '')})", m) for n, m in (test.get("teachers") or {}).items()]
        cols = metric_columns([m for _, m in rows], metric)
        lines += [f"### Test metrics{size}", "", "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {_cell(label)} | " + " | ".join(_num(m.get(c)) for c in cols) + " |" for label, m in rows]
        lines.append("")

    beir = final.get("beir")
    if isinstance(beir, dict):
        datasets = {k: v for k, v in beir.items() if k != "average" and isinstance(v, dict)}
        if datasets:
            cols = metric_columns(list(datasets.values()), DEFAULT_METRIC)
            average = {c: sum(m[c] for m in datasets.values()) / len(datasets)
                       for c in cols if all(isinstance(m.get(c), (int, float)) for m in datasets.values())}
            if not average and isinstance(beir.get("average"), dict):
                average = beir["average"]
            lines += ["### BEIR zero-shot", "", "| dataset | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            lines += [f"| {_cell(n)} | " + " | ".join(_num(m.get(c)) for c in cols) + " |" for n, m in datasets.items()]
            lines.append(f"| **average ({len(datasets)})** | " + " | ".join(_num(average.get(c)) for c in cols) + " |")
            lines.append("")

    lines += [
        "### Use it for retrieval",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{repo_id}")',
        "",
        'queries = ["what is a bank?"]',
        "documents = [",
        '    "a financial institution that accepts deposits",',
        '    "sloping land beside a body of water",',
        "]",
        "query_embeddings = model.encode_query(queries)",
        "document_embeddings = model.encode_document(documents)",
        "scores = model.similarity(query_embeddings, document_embeddings)  # [1, 2]",
        "best = scores.argmax(dim=1)  # the best document for each query",
        "```",
        "",
        "The run's recipe (`prod/recipe.yaml`, every default filled in), its report (`prod/report.md`, "
        "`prod/report.png`) and test metrics (`prod/final.json`) are in this repository.",
        "",
        "### Citation",
        "",
        "If you use this model, please cite PROD:",
        "",
        "```bibtex",
        PROD_BIBTEX,
        "```",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the folder
def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ProdStError(f"cannot read {what} {path}: {' '.join(str(e).split())}") from None


def _read_recipe(run: Path) -> dict:
    path = run / "recipe.yaml"
    if not path.is_file():
        raise ProdStError(f"{run} has no recipe.yaml: not a prod-st run folder")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ProdStError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ProdStError(f"{path} is not a recipe (not a mapping)")
    return data


def _fill(run: Path, out: Path, *, repo_id: str, language, license: str | None) -> None:
    from prod_st.report import headline_metric, load_records, plot, render_markdown

    recipe = _read_recipe(run)
    final = _read_json(run / "final.json", "the run's test metrics")
    records = load_records(run)
    shutil.copytree(run / "student", out, dirs_exist_ok=True)
    prod = out / "prod"
    prod.mkdir(exist_ok=True)
    shutil.copy2(run / "recipe.yaml", prod / "recipe.yaml")
    shutil.copy2(run / "final.json", prod / "final.json")
    if (run / "report.md").is_file():
        shutil.copy2(run / "report.md", prod / "report.md")
    else:  # render it here, never in the run folder
        (prod / "report.md").write_text(render_markdown(run, records, final, headline_metric(recipe)), encoding="utf-8")
    if (run / "report.png").is_file():
        shutil.copy2(run / "report.png", prod / "report.png")
    elif records:
        try:
            plot(records, prod / "report.png", headline_metric(recipe))
        except Exception as e:  # a missing plot should not stop the publication
            logger.warning("could not draw report.png: %s", e)
    try:
        card = _st_model_card(run / "student", out, repo_id=repo_id, recipe=recipe, language=language, license=license)
    except ProdStError:
        raise
    except Exception as e:
        raise ProdStError(f"cannot build the model card from {run / 'student'}: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}") from None
    card = card.rstrip("\n") + "\n" + render_prod_section(recipe, records, final, repo_id=repo_id)
    (out / "README.md").write_text(card, encoding="utf-8")


def build_upload_folder(
    run_dir: Path | str, out_dir: Path | str, *, repo_id: str, language: str | list[str] | None = "en",
    license: str | None = "apache-2.0",
) -> Path:
    """Write the Hub upload folder of a finished run into `out_dir` (replacing an earlier upload folder there)
    and return its path: the student's files, README.md (sentence-transformers' model card + the PROD section)
    and prod/ (recipe.yaml, report.md, report.png, final.json). The run folder itself is only read."""
    repo_id = validate_repo_id(repo_id)
    run = _finished_run(run_dir)
    out = Path(out_dir).expanduser()
    _check_out_dir(run, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _fill(run, tmp, repo_id=repo_id, language=language, license=license)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("upload folder for %s written to %s", repo_id, out)
    return out


# ----------------------------------------------------------------------------------------------- the push
def _network_errors() -> tuple[type[BaseException], ...]:
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("RequestError", "TransportError", "TimeoutException")),
                          ("httpx", ("RequestError", "TransportError", "TimeoutException")),
                          ("requests.exceptions", ("ConnectionError", "Timeout")),
                          ("urllib3.exceptions", ("HTTPError",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        classes += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(classes)


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _hub_error(exc: BaseException, repo_id: str, step: str) -> ProdStError:
    """One line that says what went wrong with the Hub and what to do."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, LocalTokenNotFoundError):
        return ProdStError(NO_TOKEN)
    if isinstance(exc, OfflineModeIsEnabled):
        return ProdStError("cannot reach the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE); unset it to "
                           "push, or use --dry-run to write the folder locally")
    status = _status(exc)
    if isinstance(exc, HfHubHTTPError) or status is not None:
        if status == 401:
            return ProdStError("no valid Hugging Face token (the Hub answered 401): run `huggingface-cli login` "
                               "(`hf auth login` with huggingface_hub 1.0+) or set HF_TOKEN")
        if status == 403:
            namespace = repo_id.split("/")[0]
            return ProdStError(f"your Hugging Face token cannot write to {namespace!r} (403): use a token with write "
                               "access (`huggingface-cli login` / `hf auth login`, or HF_TOKEN) or push to your own "
                               "namespace")
        if status == 409:
            return ProdStError(f"repository {repo_id} already exists: pass --exist-ok to push a new commit to it")
        if status == 404:
            return ProdStError(f"repository {repo_id} not found or not writable with this token (404): check the "
                               "repository id and the token's permissions")
        if status is not None and status >= 500:
            return ProdStError(f"the Hugging Face Hub failed during {step} (HTTP {status}): try again later")
        where = f" (HTTP {status})" if status else ""
        return ProdStError(f"the Hugging Face Hub refused {step}{where}: {_one_line(exc)}")
    if isinstance(exc, _network_errors()) or isinstance(exc, OSError):
        return ProdStError(f"{OFFLINE} ({type(exc).__name__}: {_one_line(exc, 120)})")
    if isinstance(exc, ValueError):
        return ProdStError(f"the Hub did not accept {step}: {_one_line(exc)}")
    return ProdStError(f"pushing to the Hugging Face Hub failed during {step}: {type(exc).__name__}: {_one_line(exc)}")


def push_run(
    run_dir: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    dry_run_dir: Path | str | None = None,
    exist_ok: bool = False,
    token: str | None = None,
    api=None,
    language: str | list[str] | None = "en",
    license: str | None = "apache-2.0",
    commit_message: str | None = None,
) -> Path | str:
    """Publish a finished run's student as the Hub model `repo_id` and return its URL; with `dry_run`, only write
    the upload folder (default `<run>/hub-upload/`) and return its path, without any network call.

    Any failure is a one-line ProdStError (no token, Hub unreachable, repository exists, ...) and the run's
    files are never changed. Only rank 0 pushes; other ranks return at once."""
    repo_id = validate_repo_id(repo_id)
    run = _finished_run(run_dir)
    if dry_run:
        out = Path(dry_run_dir).expanduser() if dry_run_dir is not None else run / UPLOAD_DIR
        if not is_main():
            return out
        return build_upload_folder(run, out, repo_id=repo_id, language=language, license=license)
    url = f"{HUB}/{repo_id}"
    if not is_main():
        return url

    if api is None:
        import huggingface_hub

        if not token and not huggingface_hub.get_token():
            raise ProdStError(NO_TOKEN)
        api = huggingface_hub.HfApi(token=token)
        url = f"{str(getattr(api, 'endpoint', HUB) or HUB).rstrip('/')}/{repo_id}"
    message = commit_message or f"Upload the PROD student of run {run.name} (prod-st)"
    with tempfile.TemporaryDirectory(prefix="prod-st-upload-") as tmp:
        folder = build_upload_folder(run, Path(tmp) / "upload", repo_id=repo_id, language=language, license=license)
        created = False
        try:
            step = "creating the repository"
            repo_url = api.create_repo(repo_id, private=private, exist_ok=exist_ok, repo_type="model")
            created = True
            step = "the upload"
            api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message)
        except Exception as e:  # noqa: BLE001 - every failure becomes one line
            error = _hub_error(e, repo_id, step)
            if created and not exist_ok:
                error = ProdStError(f"{error}; the repository {repo_id} was created: rerun with --exist-ok")
            raise error from None
    if isinstance(repo_url, str) and repo_url.startswith("http"):
        url = str(repo_url)
    logger.info("pushed %s to %s", run, url)
    return url
