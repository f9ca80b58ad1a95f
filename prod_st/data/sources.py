"""Turn a dataset name or path into a local BEIR-format folder."""

from __future__ import annotations

from pathlib import Path

from prod_st.util.errors import ProdStError
from prod_st.util.paths import cache_dir, cache_path

EMBEDDED = {"wordnet-gloss": Path(__file__).parent / "wordnet_gloss"}

# The public BEIR datasets (beir's README); the four non-public ones need a local folder.
BEIR_DATASETS = (
    "msmarco", "trec-covid", "nfcorpus", "nq", "hotpotqa", "fiqa", "arguana", "webis-touche2020",
    "cqadupstack", "quora", "dbpedia-entity", "scidocs", "fever", "climate-fever", "scifact",
)
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


def resolve_source(source: str | Path) -> Path:
    """A folder as is; an embedded name to its packaged folder; a BEIR name to its cached (or freshly
    downloaded) folder. Anything else is a one-line error saying what is accepted."""
    return local_source(source) or download_beir(str(source))


def local_source(source: str | Path) -> Path | None:
    """`resolve_source` without downloading: None for a BEIR name that is not in the cache yet."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text in EMBEDDED:
        return EMBEDDED[text]
    if text in BEIR_DATASETS:
        cached = cache_path("beir", text)
        return cached if (cached / "qrels").is_dir() else None
    if path.exists() or "/" in text or text.startswith("."):
        raise ProdStError(f"dataset folder {text!r} does not exist (or is not a folder)")
    raise ProdStError(
        f"unknown dataset {text!r}: give a BEIR-format folder, an embedded name ({', '.join(EMBEDDED)}) "
        f"or a BEIR name ({', '.join(BEIR_DATASETS)})"
    )


def download_beir(name: str) -> Path:
    """Download BEIR dataset `name` once with beir's utility into `<cache>/beir/<name>`."""
    root = cache_dir("beir")
    folder = root / name
    if (folder / "qrels").is_dir():
        return folder
    from beir import util  # imported late: beir pulls in heavy modules

    try:
        return Path(util.download_and_unzip(BEIR_URL.format(name=name), str(root)))
    except Exception as e:  # requests' errors, zip errors: all mean "not here, not reachable"
        raise ProdStError(
            f"could not download BEIR dataset {name!r} ({type(e).__name__}); offline? download "
            f"{BEIR_URL.format(name=name)} elsewhere, unzip it and pass the folder instead"
        ) from None
