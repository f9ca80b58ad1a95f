"""The Hugging Face Hub: repository ids checked by huggingface_hub's own `validate_repo_id`, and its typed
errors (found anywhere in an exception's chain: transformers wraps them in OSError) turned into one line that
says what to do. Nothing here probes the network: HF_HUB_OFFLINE and huggingface_hub's cache fallback decide."""

from __future__ import annotations

import errno

from prod_st.util.errors import ProdStError

LOGIN = "run `hf auth login` or set HF_TOKEN"
OFFLINE = "cannot reach the Hugging Face Hub (offline?)"
UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}


def check_repo_id(repo_id) -> str:
    """`user/name` (or `org/name`) as the Hub accepts it; a one-line ProdStError otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(repo_id or "").strip()
    try:
        validate_repo_id(text)
        if text.count("/") != 1:
            raise HFValidationError("no namespace")
    except HFValidationError:
        raise ProdStError(f"invalid Hub repository id {str(repo_id)!r}: use `user/name` (or `org/name`) with "
                          "letters, digits, '-', '_' and '.', no '--' or '..', at most 96 characters") from None
    return text


def _typed(exc: BaseException) -> BaseException:
    """The first huggingface_hub or network error in `exc`'s chain (`exc` itself when there is none)."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        if type(current).__module__.startswith("huggingface_hub") or is_network_error(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return exc


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hub_error(exc: BaseException, what: str, repo_id: str | None = None) -> ProdStError:
    """One line for a failure while doing `what` ("loading model 'x'", "the upload", ...) with repo `repo_id`."""
    from huggingface_hub import errors as e

    err = _typed(exc)
    repo = repo_id or getattr(err, "repo_id", None) or "the repository"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, e.LocalTokenNotFoundError) or status == 401:
        return ProdStError(f"{what}: no valid Hugging Face token: {LOGIN}")
    if isinstance(err, e.GatedRepoError):
        return ProdStError(f"{what}: {repo} is gated: ask for access on its Hub page, then {LOGIN}")
    if isinstance(err, e.RepositoryNotFoundError) or status == 404:
        return ProdStError(f"{what}: {repo} not found on the Hub (or private: {LOGIN})")
    if isinstance(err, e.RevisionNotFoundError):
        return ProdStError(f"{what}: no such revision of {repo}")
    if isinstance(err, (e.OfflineModeIsEnabled, e.LocalEntryNotFoundError)):
        return ProdStError(f"{what}: {OFFLINE}: HF_HUB_OFFLINE is set or the network is down, and it is not in "
                           "the local Hub cache")
    if status == 403:
        return ProdStError(f"{what}: your Hugging Face token cannot write to {repo.split('/')[0]!r} (403): use a "
                           f"token with write access ({LOGIN}) or your own namespace")
    if status == 409:
        return ProdStError(f"{what}: {repo} already exists: pass --exist-ok to push a new commit to it")
    if isinstance(status, int) and status >= 500:
        return ProdStError(f"{what}: the Hugging Face Hub failed (HTTP {status}): try again later")
    if isinstance(err, e.HfHubHTTPError):
        return ProdStError(f"{what}: the Hub refused (HTTP {status}): {_one_line(err)}")
    if is_network_error(err):
        return ProdStError(f"{what}: {OFFLINE} ({type(err).__name__}: {_one_line(err, 100)})")
    return ProdStError(f"{what}: {type(err).__name__}: {_one_line(err)}")


def is_network_error(exc: BaseException) -> bool:
    """A connection that failed: the standard library's, httpx's (huggingface_hub's HTTP client) or requests'."""
    if isinstance(exc, (ConnectionError, TimeoutError)) or getattr(exc, "errno", None) in UNREACHABLE:
        return True
    names = {c.__module__.split(".")[0] + "." + c.__name__ for c in type(exc).__mro__}
    return bool(names & {"httpx.TransportError", "httpx2.TransportError", "requests.ConnectionError",
                         "requests.Timeout", "urllib3.HTTPError"})


HUB = "https://huggingface.co"


def hub_api(token: str | None = None):
    """An HfApi with `token` (or the saved one); a one-line ProdStError, before any work, when there is none."""
    import huggingface_hub

    if not token and not huggingface_hub.get_token():
        raise ProdStError(f"no Hugging Face token: {LOGIN}")
    return huggingface_hub.HfApi(token=token)


def upload_folder(folder, repo_id: str, *, api, repo_type: str, private: bool = False, exist_ok: bool = False,
                  message: str) -> str:
    """Create the Hub repository `repo_id` (`repo_type`: model or dataset) and upload `folder` to it in one
    commit with `api` (an HfApi, `hub_api()`); return its URL. Every failure is one ProdStError line
    (`hub_error`), saying what to do: --dry-run when offline, --exist-ok when the repository was created before
    the upload failed."""
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    url = f"{str(getattr(api, 'endpoint', HUB) or HUB).rstrip('/')}/{prefix}{repo_id}"
    created, step = False, "creating the repository"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=exist_ok, repo_type=repo_type)
        created, step = True, "the upload"
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, commit_message=message)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        error = str(hub_error(e, f"pushing to {repo_id} ({step})", repo_id=repo_id))
        if OFFLINE in error:
            error += "; --dry-run writes the upload folder without the Hub"
        if created and not exist_ok:
            error += f"; the repository {repo_id} was created: rerun with --exist-ok"
        raise ProdStError(error) from None
    return str(repo_url) if isinstance(repo_url, str) and repo_url.startswith("http") else url
