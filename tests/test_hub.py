"""The Hub layer (prod_st.util.hub): ids checked by huggingface_hub's validate_repo_id, its typed errors as one line,
and model loading through huggingface_hub's own cache under HF_HUB_OFFLINE. Nothing here reaches the network."""

from __future__ import annotations

import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import httpx2  # noqa: E402
import pytest  # noqa: E402
from huggingface_hub import errors  # noqa: E402

import prod_st.util.models  # noqa: E402
from prod_st.util.errors import ProdStError  # noqa: E402
from prod_st.util.hub import check_repo_id, hub_error  # noqa: E402
from prod_st.util.models import load_model  # noqa: E402


def response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x/y"))


def wrapped(exc: BaseException) -> OSError:
    """As transformers raises it: an OSError whose cause is huggingface_hub's typed error."""
    try:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from exc
    except OSError as outer:
        return outer


@pytest.mark.parametrize("repo_id", ["user/name", "Org-1/prod_minilm.L3", "a/b"])
def test_usual_repo_ids_pass(repo_id):
    assert check_repo_id(repo_id) == repo_id


@pytest.mark.parametrize("repo_id", ["", "no-namespace", "a/b/c", "user/-name", "user/na me", "us--er/name",
                                     "user/name..x", "user/name.git", "/name", "user/", "user/" + "x" * 100])
def test_bad_repo_ids_are_one_line(repo_id):
    with pytest.raises(ProdStError, match="invalid Hub repository id") as error:
        check_repo_id(repo_id)
    assert "\n" not in str(error.value)


CASES = {
    "not found": (errors.RepositoryNotFoundError("404 Client Error", response=response(404)), "not found on the Hub"),
    "gated": (errors.GatedRepoError("403 Client Error", response=response(403)), "is gated"),
    "no revision": (errors.RevisionNotFoundError("404 Client Error", response=response(404)), "not found"),
    "not cached": (errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
                   "not in the local Hub cache"),
    "offline": (errors.OfflineModeIsEnabled("offline mode is enabled"), "HF_HUB_OFFLINE"),
    "no token": (errors.LocalTokenNotFoundError("no token"), "hf auth login"),
    "server": (errors.HfHubHTTPError("500 Server Error", response=response(500)), "try again later"),
    "network": (httpx2.ConnectError("[Errno 111] Connection refused"), "cannot reach the Hugging Face Hub"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("wrap", [False, True])
def test_typed_hub_errors_become_one_line(case, wrap):
    exc, needle = CASES[case]
    error = hub_error(wrapped(exc) if wrap else exc, "loading model 'x/y'", repo_id="x/y")
    message = str(error)
    assert isinstance(error, ProdStError) and "\n" not in message
    assert message.startswith("loading model 'x/y': ") and needle in message, message


def test_load_model_maps_the_hub_error_in_the_chain(monkeypatch):
    def missing(*args, **kwargs):
        raise wrapped(errors.GatedRepoError("403 Client Error: gated", response=response(403)))

    monkeypatch.setattr(prod_st.util.models, "SentenceTransformer", missing)
    with pytest.raises(ProdStError, match=r"unknown model 'org/gated-model'.*org/gated-model is gated"):
        load_model("org/gated-model")


def test_load_model_reads_huggingface_hubs_own_cache_offline(tmp_path, monkeypatch, tiny_model_dir):
    """No socket probe: under HF_HUB_OFFLINE a Hub id that is in the Hub cache loads from it."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = load_model("someone/tiny")
    assert model.get_embedding_dimension() == 32
    with pytest.raises(ProdStError, match="not in the local Hub cache"):
        load_model("someone/not-cached")


def test_recipe_publish_repo_id_is_checked_by_the_hub_validator(tmp_path):
    import yaml

    from prod_st.recipe import load_recipe

    recipe = yaml.safe_load(load_recipe("quickstart").resolved_yaml())
    for bad in ("us--er/name", "no-namespace"):
        recipe["publish"] = {"repo_id": bad}
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        with pytest.raises(ProdStError, match=rf"publish\.repo_id: invalid Hub repository id '{bad}'") as error:
            load_recipe(tmp_path / "r.yaml")
        assert "\n" not in str(error.value)
    recipe["publish"] = {"repo_id": "user/name"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert load_recipe(tmp_path / "r.yaml").publish.repo_id == "user/name"
