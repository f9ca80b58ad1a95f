"""Shared fixtures: nothing here touches the network (HF_HUB_OFFLINE is forced), and every model is either
the packaged all-MiniLM-L6-v2 or a tiny randomly initialised BERT built from its tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test session gets its own prod-st cache, so no test trusts another run's files."""
    monkeypatch.setenv("PROD_ST_CACHE", str(tmp_path_factory.getbasetemp() / "prod-st-cache"))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from prod_st.util.models import resolve_model_path

    return resolve_model_path("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path) -> str:
    """A 2-layer, 32-wide BERT SentenceTransformer (mean pooling) with MiniLM's tokenizer: fast to run."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    raw = folder / "raw"
    BertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=64)
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    model = SentenceTransformer(modules=[transformer, pooling])
    model.save(str(folder / "st"))
    return str(folder / "st")


def write_beir(folder: Path, corpus: dict, queries: dict, qrels: dict, split: str = "test") -> Path:
    """Write a BEIR-format folder: corpus {id: (title, text)}, queries {id: text}, qrels {qid: {did: grade}}."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id, (title, text) in corpus.items():
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, text in queries.items():
            f.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, judged in qrels.items():
            for doc_id, grade in judged.items():
                f.write(f"{qid}\t{doc_id}\t{grade}\n")
    return folder


TOY_CORPUS = {
    "d1": ("bank", "a financial institution that accepts deposits"),
    "d2": ("bank", "sloping land beside a body of water"),
    "d3": ("cat", "a small domesticated feline animal"),
    "d4": ("dog", "a domesticated canine kept as a pet"),
    "d5": ("piano", "a keyboard instrument with hammers striking strings"),
    "d6": ("violin", "a bowed string instrument with four strings"),
}
TOY_QUERIES = {
    "q1": "I deposited my salary at the bank",
    "q2": "we sat on the river bank",
    "q3": "the cat purred on my lap",
    "q4": "she played the piano at the concert",
}
TOY_QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}, "q4": {"d5": 1}}


def free_port() -> int:
    """A TCP port nobody listens on now: the rendezvous port of a process group spawned by a test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun_starts(rank: int, world: int, port: int, **env: str) -> None:
    """Give this process the environment torchrun gives rank `rank` of `world` (for a rank a test spawns with
    torch.multiprocessing; `distributed.init_if_launched` then joins a gloo group on CPUs)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), **env)


@pytest.fixture
def toy_beir(tmp_path) -> Path:
    """A six-document BEIR folder with four judged test queries."""
    return write_beir(tmp_path / "toy", TOY_CORPUS, TOY_QUERIES, TOY_QRELS)
