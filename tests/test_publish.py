"""Publishing a finished run on the Hub: the upload folder (student + model card + prod/), the dry run, a push
through a local stand-in for HfApi, and every failure as one ProdStError line that leaves the run untouched.
Nothing here reaches the network (HF_HUB_OFFLINE is forced, the Hub API is faked)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import httpx2  # noqa: E402  (huggingface_hub 2.x's HTTP client)
import pytest  # noqa: E402
import requests  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled  # noqa: E402

from prod_st.publish.push import build_upload_folder, push_run  # noqa: E402
from prod_st.publish import push as publish  # noqa: E402
from prod_st.recipe import load_recipe  # noqa: E402
from prod_st.util.errors import ProdStError  # noqa: E402

REPO = "someone/prod-tiny-student"
PROD_FILES = {"prod/recipe.yaml", "prod/report.md", "prod/report.png", "prod/final.json"}


# ---------------------------------------------------------------------------------------------- helpers
def tree_hash(folder: Path, skip: str | None = None) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder` (optionally skipping one top-level entry)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if skip and rel.parts[0] == skip:
            continue
        out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def http_error(status: int, message: str = "error") -> HfHubHTTPError:
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} Client Error: {message}", response=httpx2.Response(status, request=request))


def real_signature(name: str):
    """A stand-in method that binds each call to the signature of `huggingface_hub.HfApi.<name>` (a wrong or
    missing keyword raises TypeError, as the real client would) and returns the keywords that were passed."""
    from huggingface_hub import HfApi

    signature = inspect.signature(getattr(HfApi, name))

    def bind(self, *args, **kwargs) -> dict:
        arguments = signature.bind(self, *args, **kwargs).arguments
        return {k: v for k, v in arguments.items() if k != "self"}

    return bind


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi, with the real signatures of the methods publish.py calls: records
    calls; `fail_create` / `fail_upload` are raised."""

    endpoint = "https://huggingface.co"
    _create_repo = real_signature("create_repo")
    _upload_folder = real_signature("upload_folder")

    def __init__(self, fail_create: BaseException | None = None, fail_upload: BaseException | None = None):
        self.calls: list[tuple[str, dict]] = []
        self.fail_create, self.fail_upload = fail_create, fail_upload
        self.uploaded: dict[str, str] = {}

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", self._create_repo(*args, **kwargs)))
        if self.fail_create is not None:
            raise self.fail_create
        return f"{self.endpoint}/{self.calls[-1][1]['repo_id']}"

    def upload_folder(self, *args, **kwargs):
        self.calls.append(("upload_folder", self._upload_folder(*args, **kwargs)))
        if self.fail_upload is not None:
            raise self.fail_upload
        folder = Path(self.calls[-1][1]["folder_path"])
        self.uploaded = {rel: (folder / rel).read_text(errors="replace") if rel == "README.md" else ""
                         for rel in files(folder)}
        return "commit-info"


def test_fake_hub_api_refuses_what_hfapi_refuses():
    """The fake is only worth its name if a keyword HfApi does not take fails here too."""
    api = FakeHubApi()
    with pytest.raises(TypeError, match="privat"):
        api.create_repo(REPO, privat=True)
    with pytest.raises(TypeError):
        api.create_repo(REPO, True)  # private is keyword-only
    with pytest.raises(TypeError, match="folder"):
        api.upload_folder(folder=".", repo_id=REPO)
    assert api.calls == []
    assert api.create_repo(REPO, private=True, exist_ok=True, repo_type="model").endswith(REPO)
    assert api.calls == [("create_repo", {"repo_id": REPO, "private": True, "exist_ok": True, "repo_type": "model"})]


def stage_record(index: int, name: str, kind: str, teacher=None, ndcg=0.3, **extra) -> dict:
    return {
        "index": index, "name": name, "kind": kind, "teacher": teacher,
        "student_dev": {"nDCG@10": ndcg, "MRR@10": ndcg - 0.05, "R@100": ndcg + 0.4},
        "teacher_dev": {}, "teacher_measured_as": None, "gap_before": {}, "gap_after": {},
        "train": {}, "selection": {}, "warnings": [], "seconds": {"eval": 1.0}, **extra,
    }


@pytest.fixture
def finished_run(tmp_path, tiny_model_dir) -> Path:
    """A minimal finished run folder: recipe, two done stages, the student, final.json (with BEIR), report."""
    run = tmp_path / "runs" / "quickstart"
    run.mkdir(parents=True)
    recipe = load_recipe("quickstart").resolved_yaml()
    assert recipe.count("num_layers: 3") == 1
    (run / "recipe.yaml").write_text(recipe.replace("num_layers: 3", "num_layers: 2"))  # the tiny student's 2
    records = [
        stage_record(0, "init", "init", ndcg=0.3111),
        stage_record(1, "bi", "distill", teacher="bi", ndcg=0.4222,
                     teacher_dev={"nDCG@10": 0.7333, "MRR@10": 0.7, "R@100": 0.97}, teacher_measured_as="retriever",
                     train={"steps": 40, "train_loss": 1.2},
                     warnings=["teacher 'bi' is a test warning: PROD needs a stronger teacher"]),
    ]
    for r in records:
        folder = run / f"{r['index']:02d}-{r['name']}"
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps(r, indent=2))
        (folder / "DONE").write_text("")
    shutil.copytree(tiny_model_dir, run / "student")
    final = {
        "recipe": "quickstart",
        "test": {
            "student": {"nDCG@10": 0.5316, "MRR@10": 0.4791, "R@100": 0.905},
            "student_before_training": {"nDCG@10": 0.3922, "MRR@10": 0.3515, "R@100": 0.7875},
            "teachers": {"bi": {"as": "retriever", "nDCG@10": 0.7009, "MRR@10": 0.653, "R@100": 0.975}},
        },
        "num_test_queries": 400, "num_docs": 4000, "seconds": {"run": 10.0, "test_eval": 2.0},
        "beir": {"scifact": {"nDCG@10": 0.40, "MRR@10": 0.35, "R@100": 0.8},
                 "nfcorpus": {"nDCG@10": 0.20, "MRR@10": 0.30, "R@100": 0.2}},
    }
    (run / "final.json").write_text(json.dumps(final, indent=2))
    (run / "report.md").write_text("# PROD run `quickstart`\n\n![metric per stage](report.png)\n")
    (run / "report.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return run


def assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(error.value)
    assert "\n" not in message and message.strip() == message and message
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------------------------------------- dry run
def test_dry_run_writes_the_exact_upload_folder(finished_run, tiny_model_dir):
    before = tree_hash(finished_run)
    api = FakeHubApi()
    out = push_run(finished_run, REPO, dry_run=True, api=api)

    assert out == finished_run / "hub-upload"
    assert api.calls == []  # no Hub call in a dry run
    assert tree_hash(finished_run, skip="hub-upload") == before  # the run itself is untouched
    model_files = files(Path(tiny_model_dir)) - {"README.md"}
    assert files(out) == model_files | {"README.md"} | PROD_FILES
    for rel in model_files:  # the student's files are copied byte for byte
        assert (out / rel).read_bytes() == (finished_run / "student" / rel).read_bytes(), rel
    for name in ("recipe.yaml", "report.md", "report.png", "final.json"):
        assert (out / "prod" / name).read_bytes() == (finished_run / name).read_bytes()
    assert not [p for p in finished_run.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    card = (out / "README.md").read_text()
    front = card.split("---")[1]  # the YAML metadata of sentence-transformers' card
    for tag in ("sentence-transformers", "prod", "knowledge-distillation", "dense-retrieval"):
        assert f"- {tag}\n" in front
    assert "language:\n- en" in front and "license: apache-2.0" in front
    assert "library_name: sentence-transformers" in front
    assert "This is a [sentence-transformers](https://www.SBERT.net) model" in card  # ST's own card body
    assert f'SentenceTransformer("{REPO}")' in card
    assert "encode_query" in card and "encode_document" in card and "similarity(" in card
    # the PROD section: schedule, stage table, test, BEIR, citation
    assert card.index("## PROD: progressive distillation") > card.index("## Model Details")
    assert "### Schedule" in card and "| 1 | warmup | warmup |" in card and "| 5 | dpd-1 | dpd | ens |" in card
    assert "Dataset: `wordnet-gloss`" in card and "train queries 800" in card and "corpus 4000 documents" in card
    assert "a query is kept when the student's first relevant document is at rank 2-15" in card
    assert "| # | stage | teacher | student nDCG@10 | student MRR@10 | student R@100 |" in card
    assert "| 0 | init |  | 0.3111 |" in card and "| 1 | bi | bi | 0.4222 |" in card and "0.7333 (retriever)" in card
    assert "test warning" in card
    assert "| student before training | 0.3922 |" in card and "0.5316" in card
    assert "| teacher bi (retriever) | 0.7009 |" in card
    assert "### BEIR zero-shot" in card and "| scifact | 0.4000 |" in card and "| **average (2)** | 0.3000 |" in card
    assert "@inproceedings{lin2023prod," in card and "eprint={2209.13335}" in card
    assert "title={PROD: Progressive Distillation for Dense Retrieval}" in card
    assert "booktitle={Proceedings of the ACM Web Conference 2023}" in card


def test_push_publishes_the_card_the_run_wrote_without_loading_the_model(finished_run, monkeypatch):
    """The run writes student/README.md (prod_st.run.model_card) at its end; push copies it, puts the repository id in
    place of sentence-transformers' placeholder, and loads no model."""
    import sentence_transformers

    from prod_st.run.model_card import MODEL_ID_PLACEHOLDER, write_card

    write_card(finished_run, finished_run / "student")
    written = (finished_run / "student" / "README.md").read_text()
    assert f'SentenceTransformer("{MODEL_ID_PLACEHOLDER}")' in written
    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", lambda *a, **k: pytest.fail("model loaded"))
    out = push_run(finished_run, REPO, dry_run=True)
    assert (out / "README.md").read_text() == written.replace(MODEL_ID_PLACEHOLDER, REPO)
    card = (out / "README.md").read_text()
    assert card.count("\n## Usage") == 1 and card.count("\n## Citation") == 1  # one of each, sentence-transformers'
    assert card.index("## Evaluation") < card.index("## PROD: progressive distillation") < card.index("## Training")
    assert "name: quickstart test" not in card and "name: wordnet gloss test" in card  # test metrics, model-index
    assert "name: beir scifact" in card and "#### PROD\n" in card  # BEIR too; PROD's citation (no stage recorded one)


def test_dry_run_folder_loads_as_the_same_model(finished_run):
    from sentence_transformers import SentenceTransformer

    out = push_run(finished_run, REPO, dry_run=True)
    texts = ["a cat on a lap", "money at the bank"]
    published = SentenceTransformer(str(out), device="cpu").encode(texts)
    original = SentenceTransformer(str(finished_run / "student"), device="cpu").encode(texts)
    assert published.shape == original.shape
    assert abs(published - original).max() < 1e-6


def test_dry_run_dir_and_rerun_replaces_the_earlier_folder(finished_run, tmp_path):
    target = tmp_path / "elsewhere" / "upload"
    assert push_run(finished_run, REPO, dry_run=True, dry_run_dir=target) == target
    (target / "stale.txt").write_text("from an earlier dry run")
    build_upload_folder(finished_run, target, repo_id="other/name")
    assert not (target / "stale.txt").exists()
    assert 'SentenceTransformer("other/name")' in (target / "README.md").read_text()


def test_upload_folder_never_overwrites_the_run_or_a_foreign_folder(finished_run, tmp_path):
    before = tree_hash(finished_run)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for target in (finished_run, finished_run.parent, finished_run / "student", finished_run / "01-bi" / "x", foreign):
        with pytest.raises(ProdStError) as error:
            build_upload_folder(finished_run, target, repo_id=REPO)
        assert_one_line(error, "choose")
    assert tree_hash(finished_run) == before
    assert (foreign / "keep.txt").read_text() == "mine"


def test_card_without_beir_or_report_is_still_complete(finished_run, tmp_path):
    final = json.loads((finished_run / "final.json").read_text())
    del final["beir"]
    (finished_run / "final.json").write_text(json.dumps(final))
    (finished_run / "report.md").unlink()
    before = tree_hash(finished_run)
    out = build_upload_folder(finished_run, tmp_path / "up", repo_id=REPO)
    card = (out / "README.md").read_text()
    assert "### BEIR zero-shot" not in card and "### Test (400 queries, 4000 documents)" in card
    assert "## Dev metrics per stage" in (out / "prod" / "report.md").read_text()  # rendered, not copied
    assert tree_hash(finished_run) == before  # ...and not written into the run


# ---------------------------------------------------------------------------------------------- push
@pytest.mark.parametrize("private", [False, True])
def test_push_creates_the_repo_then_uploads_the_folder(finished_run, tiny_model_dir, private):
    before = tree_hash(finished_run)
    api = FakeHubApi()
    url = push_run(finished_run, REPO, private=private, api=api)

    assert url == f"https://huggingface.co/{REPO}"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    create, upload = api.calls[0][1], api.calls[1][1]
    assert create == {"repo_id": REPO, "private": private, "exist_ok": False, "repo_type": "model"}
    assert upload["repo_id"] == REPO and upload["repo_type"] == "model" and upload["commit_message"]
    assert set(api.uploaded) == (files(Path(tiny_model_dir)) - {"README.md"}) | {"README.md"} | PROD_FILES
    assert "## PROD: progressive distillation" in api.uploaded["README.md"]
    assert not Path(upload["folder_path"]).exists()  # built in a temporary folder, cleaned up
    assert tree_hash(finished_run) == before and not (finished_run / "hub-upload").exists()


def test_push_with_exist_ok_passes_it_on(finished_run):
    api = FakeHubApi()
    push_run(finished_run, REPO, exist_ok=True, api=api)
    assert api.calls[0][1]["exist_ok"] is True


FAILURES = {
    "no token": (LocalTokenNotFoundError("Token is required (`token=True`), but no token found."), None,
                 ("no valid Hugging Face token", "login", "HF_TOKEN")),
    "401": (http_error(401, "Invalid username or password."), None,
            ("no valid Hugging Face token", "login", "HF_TOKEN")),
    "network down (httpx)": (httpx2.ConnectError("[Errno 111] Connection refused"), None,
                             ("cannot reach the Hugging Face Hub (offline?)", "--dry-run")),
    "network down (requests)": (requests.exceptions.ConnectionError("Max retries exceeded\nwith url"), None,
                                ("cannot reach the Hugging Face Hub (offline?)", "--dry-run")),
    "network down (OSError)": (OSError(101, "Network is unreachable"), None,
                               ("cannot reach the Hugging Face Hub (offline?)", "--dry-run")),
    "offline mode": (OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."), None,
                     ("cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE", "--dry-run")),
    "repo exists": (http_error(409, "You already created this model repo"), None,
                    (f"{REPO} already exists", "--exist-ok")),
    "no write access": (http_error(403, "Forbidden"), None, ("cannot write to 'someone'",)),
    "upload fails": (None, httpx2.ReadTimeout("timed out"), ("cannot reach the Hugging Face Hub", "--exist-ok")),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_push_failures_are_one_line_and_leave_the_run_untouched(finished_run, case):
    fail_create, fail_upload, needles = FAILURES[case]
    before = tree_hash(finished_run)
    api = FakeHubApi(fail_create=fail_create, fail_upload=fail_upload)
    with pytest.raises(ProdStError) as error:
        push_run(finished_run, REPO, api=api)
    assert_one_line(error, *needles)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no chained traceback
    assert tree_hash(finished_run) == before


def test_no_token_is_refused_before_any_hub_call(finished_run, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: pytest.fail("HfApi built without a token"))
    before = tree_hash(finished_run)
    with pytest.raises(ProdStError) as error:
        push_run(finished_run, REPO)
    assert_one_line(error, "no Hugging Face token")
    assert tree_hash(finished_run) == before


def test_real_hfapi_offline_is_a_one_line_error(finished_run):
    """The real client, with offline mode on and an endpoint nobody listens on: still one line, no traceback."""
    from huggingface_hub import HfApi

    before = tree_hash(finished_run)
    with pytest.raises(ProdStError) as error:
        push_run(finished_run, REPO, api=HfApi(endpoint="http://127.0.0.1:9", token="hf_not_a_real_token"))
    assert_one_line(error, "cannot reach the Hugging Face Hub", "--dry-run")
    assert tree_hash(finished_run) == before


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("missing", ["final.json", "student"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_unfinished_run_is_refused(finished_run, missing, dry_run):
    target = finished_run / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    before = tree_hash(finished_run)
    api = FakeHubApi()
    with pytest.raises(ProdStError) as error:
        push_run(finished_run, REPO, dry_run=dry_run, api=api)
    assert_one_line(error, "prod-st run")
    assert api.calls == [] and tree_hash(finished_run) == before


@pytest.mark.parametrize("dry_run", [False, True])
def test_student_with_other_layers_than_the_recipe_is_refused(finished_run, dry_run):
    """The card says "first k layers" from the recipe: a student whose config disagrees is not published."""
    recipe = finished_run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("num_layers: 2", "num_layers: 3"))
    before = tree_hash(finished_run)
    api = FakeHubApi()
    with pytest.raises(ProdStError) as error:
        push_run(finished_run, REPO, dry_run=dry_run, api=api)
    assert_one_line(error, "has 2 transformer layers", "student.num_layers: 3")
    assert api.calls == [] and tree_hash(finished_run) == before


def test_missing_run_folder_is_refused(tmp_path):
    with pytest.raises(ProdStError) as error:
        push_run(tmp_path / "nope", REPO, api=FakeHubApi())
    assert_one_line(error, "run folder not found")


@pytest.mark.parametrize("repo_id", ["", "no-namespace", "a/b/c", "user/-name", "user/na me", "us--er/name",
                                     "user/name..x", "user/name.git", "/name", "user/", "user/" + "x" * 100])
def test_bad_repo_id_is_refused(finished_run, repo_id):
    api = FakeHubApi()
    with pytest.raises(ProdStError) as error:
        push_run(finished_run, repo_id, api=api)
    assert_one_line(error, "invalid Hub repository id", "user/name")
    assert api.calls == [] and not (finished_run / "hub-upload").exists()


def test_only_rank_zero_pushes(finished_run, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    api = FakeHubApi()
    assert push_run(finished_run, REPO, api=api) == f"https://huggingface.co/{REPO}"
    assert push_run(finished_run, REPO, dry_run=True, api=api) == finished_run / "hub-upload"
    assert api.calls == [] and not (finished_run / "hub-upload").exists()


def test_validate_repo_id_accepts_usual_ids():
    for repo_id in ("user/name", "Org-1/prod_minilm.L3", "a/b"):
        assert publish.validate_repo_id(repo_id) == repo_id


def test_push_command_dry_run_and_bad_input(finished_run, tmp_path, monkeypatch, capsys):
    """`prod-st push RUN --repo-id U/N --dry-run` writes the folder; bad input is one line and exit 2."""
    import sys

    from prod_st_cli.main import main

    def cli(*args):
        monkeypatch.setattr(sys, "argv", ["prod-st", "push", *args])
        with pytest.raises(SystemExit) as info:
            main()
        return info.value.code, capsys.readouterr()

    out_dir = tmp_path / "upload"
    code, captured = cli(str(finished_run), "--repo-id", "me/prod-student", "--dry-run", "--dry-run-dir", str(out_dir))
    assert code == 0 and "upload folder written to" in captured.out
    assert (out_dir / "README.md").exists() and (out_dir / "modules.json").exists()
    code, captured = cli(str(finished_run), "--repo-id", "not a repo id", "--dry-run")
    assert code == 2 and captured.err.count("error:") == 1 and "Traceback" not in captured.err


# ---------------------------------------------------------------------------------------------- the run lock
def _lock_in_another_process(folder: Path) -> subprocess.CompletedProcess:
    code = f"from prod_st.util import locks; from pathlib import Path; locks.lock_run_folder(Path({str(folder)!r}))"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_a_push_while_a_run_holds_the_folder_is_refused_naming_it_and_writes_nothing(finished_run):
    from test_faults import hold, kill9

    other = hold("run", finished_run)
    try:
        with pytest.raises(ProdStError) as error:
            push_run(finished_run, REPO, dry_run=True, api=FakeHubApi())
        assert_one_line(error, "is in use by another prod-st command", f"pid {other.pid}", "before this push")
        assert not (finished_run / "hub-upload").exists()
    finally:
        kill9(other)
    assert push_run(finished_run, REPO, dry_run=True, api=FakeHubApi()).is_dir()  # free once the run ended


def test_a_run_started_during_a_push_is_refused_and_a_run_publishing_itself_keeps_its_lock(finished_run, monkeypatch):
    from prod_st.util import locks

    (finished_run / locks.RUN_LOCK).touch()  # a run held the folder once
    refusals = []  # what a run started in another process while the upload folder is built is told
    real = publish.build_upload_folder

    def build_while_checking(run, out, *, repo_id):
        other = _lock_in_another_process(run)
        refusals.append(other.stderr if other.returncode != 0 else "")
        return real(run, out, repo_id=repo_id)

    monkeypatch.setattr(publish, "build_upload_folder", build_while_checking)
    push_run(finished_run, REPO, api=FakeHubApi())  # a real push (faked Hub), in a temporary folder
    assert f"(push: pid {os.getpid()} on" in refusals[0]
    assert _lock_in_another_process(finished_run).returncode == 0  # released after the push

    held = locks.lock_run_folder(finished_run)  # a run that publishes itself holds its folder already
    try:
        push_run(finished_run, REPO, dry_run=True, api=FakeHubApi())
        assert f"(run: pid {os.getpid()} on" in refusals[1]  # the run's hold, not a push's
        assert f"(run: pid {os.getpid()} on" in _lock_in_another_process(finished_run).stderr  # still held
    finally:
        held.release()
