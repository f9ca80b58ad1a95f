"""The pool of a run's teachers: each recipe teacher entry turned into a ready teacher, a pretrained one
loaded or PROD's own trained from a backbone (negatives mined by the model the entry names), both cached so a
rerun never retrains."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from sentence_transformers import SentenceTransformer

from prod_st.retrieval.corpus_index import TRAIN_SIZE
from prod_st.retrieval.mining import NegativeWindow, draw_negatives, mine_pools
from prod_st.teachers.bi_encoder import BiEncoderTeacher
from prod_st.teachers.cross_encoder import CrossEncoderTeacher
from prod_st.teachers.ensemble import EnsembleTeacher
from prod_st.teachers.training import train_bi_encoder, train_cross_encoder
from prod_st.training.losses import score_scale
from prod_st.training.stage_data import RunData, build_rows
from prod_st.util.distributed import barrier, is_main
from prod_st.util.models import load_model

logger = logging.getLogger(__name__)


class TeacherPool:
    """The recipe's teachers by name, built on first use and kept for the run. A teacher trained in the run is
    saved under `<folder>/<name>/model/`, so a resumed run loads it from there without re-mining its data."""

    def __init__(
        self, specs: dict, data: RunData, *, folder: Path, seed: int, eval_batch_size: int = 64, index: str = "Flat",
        corpus_dtype: str = "float32", precision: str = "fp32", index_train_size: int = TRAIN_SIZE,
        search_backend: str = "auto",
    ):
        self.specs = specs
        self.folder = folder
        self.data = data
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.index, self.corpus_dtype = index, corpus_dtype
        self.index_train_size, self.search_backend = index_train_size, search_backend
        self.precision = precision  # resolved (not auto): teachers train and score under it
        self._built: dict[str, BiEncoderTeacher | CrossEncoderTeacher | EnsembleTeacher] = {}

    def get(self, name: str, student: SentenceTransformer | None = None):
        if name not in self._built:
            self._built[name] = self._build(name, student)
        return self._built[name]

    def cache_folders(self) -> set[Path]:
        """The cache folders of the teachers built so far (an ensemble has none of its own: its members do)."""
        return {teacher.cache_folder for teacher in self._built.values() if not isinstance(teacher, EnsembleTeacher)}

    def scale(self, name: str) -> float:
        """Multiplier turning the teacher's scores into logits (cosine x 20 for a cosine bi-encoder; a
        cross-encoder's raw logits as they are)."""
        teacher = self._built[name]
        return score_scale(teacher.model) if isinstance(teacher, BiEncoderTeacher) else 1.0

    def miner_model(self, miner: str, student: SentenceTransformer) -> SentenceTransformer:
        """The model a `negatives.miner` entry names: the student, a bi-encoder teacher, or a model id/path."""
        if miner == "student":
            return student
        if miner in self.specs:
            return self.get(miner, student).model
        return load_model(miner)

    def _build(self, name: str, student: SentenceTransformer | None):
        spec = self.specs[name]
        if spec.kind == "ensemble":
            members = [(self.get(m, student), weight, self.scale(m)) for m, weight in spec.members.items()]
            logger.info("teacher %r: ensemble of %s", name, ", ".join(f"{w:g} x {m}" for m, w in spec.members.items()))
            return EnsembleTeacher(members, name=name)
        bi = spec.kind == "bi-encoder"
        saved = self.folder / name / "model"
        if spec.model is not None:
            logger.info("teacher %r: pretrained %s", name, spec.model)
            model = spec.model
        elif (saved / "DONE").exists():
            logger.info("teacher %r: trained earlier in this run, loaded from %s", name, saved)
            model = str(saved)
        else:
            model = self._train(name, spec, student)
            if is_main():
                model.save(str(saved))
                (saved / "DONE").write_text("")
            barrier()
        if bi:
            return BiEncoderTeacher(model, batch_size=spec.batch_size, name=name, precision=self.precision)
        return CrossEncoderTeacher(model, batch_size=spec.batch_size, max_length=spec.max_length, name=name,
                                   precision=self.precision)

    def _train(self, name: str, spec, student: SentenceTransformer | None):
        train = spec.train
        miner_name = train.negatives_from
        miner = self.miner_model(miner_name, student) if miner_name else load_model(train.backbone)
        seed = self.seed if train.seed is None else train.seed
        query_ids = sorted(self.data.train.qrels)
        if train.train_queries is not None and train.train_queries < len(query_ids):
            query_ids = sorted(random.Random(seed).sample(query_ids, train.train_queries))
        window = NegativeWindow(1, train.negatives_window, train.num_negatives, "sample")
        pools, qrels = mine_pools(miner, self.data.train, window, query_ids=query_ids, relevance=self.data.relevance,
                                  index_factory=self.index, batch_size=self.eval_batch_size, dtype=self.corpus_dtype,
                                  index_train_size=self.index_train_size, search_backend=self.search_backend)
        negatives = draw_negatives(pools, window, seed=seed)
        rows = build_rows(self.data, negatives, train.num_negatives, drop_incomplete=True, qrels=qrels)
        queries, positives, negatives = rows.texts()
        triples = list(zip(queries, positives, negatives))
        logger.info("teacher %r: a %s from %s on %d queries (trained once, then cached)", name, spec.kind,
                    train.backbone, len(triples))
        common = dict(epochs=train.epochs, max_steps=train.max_steps, batch_size=train.batch_size, lr=train.lr,
                      seed=seed, precision=self.precision)
        if spec.kind == "bi-encoder":
            return train_bi_encoder(train.backbone, triples, max_length=train.max_length, **common)
        return train_cross_encoder(train.backbone, triples, max_length=train.max_length or 256, **common)
