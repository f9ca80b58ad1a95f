"""prod-st's retrieval evaluation (faiss search + pytrec_eval, `prod_st.retrieval.evaluation.evaluate_model`) as a
sentence-transformers evaluator: given to SentenceTransformerTrainer it evaluates during training (with an
`eval_strategy`), and like every evaluator it records its metrics in the model's card data, so they reach the
trainer's logs, the card's evaluation tables and its model-index.

sentence-transformers 6 has one evaluator base class for every model type, `BaseEvaluator`
(the `SentenceTransformerEvaluator` role); this subclasses it."""

from __future__ import annotations

from pathlib import Path

from sentence_transformers.base.evaluation import BaseEvaluator

from prod_st.util.errors import ProdStError


class RetrievalEvaluator(BaseEvaluator):
    """Retrieval metrics (nDCG@10, MRR@10, R@k, MAP, Acc@k with answers) of a model on one split.

    `data` is a `prod_st.data.RetrievalData`; `metric` (the recipe's eval.metric) is the primary metric. Metrics
    are returned and recorded under "<name>_<metric>", name defaulting to "<dataset (folder name)>-<split>".
    After a call, `last_result` holds the `EvalResult` (with the run: the ranked documents per query)."""

    def __init__(self, data=None, *, name: str | None = None, metric: str = "nDCG@10", top_k: int = 1000,
                 index_factory: str = "Flat", batch_size: int = 64, dtype: str = "float32", relevance_level: int = 1,
                 max_queries: int | None = None, progress: bool = False, index_train_size: int | None = None,
                 search_backend: str = "auto") -> None:
        super().__init__()
        if data is None and name is None:
            raise ProdStError("a RetrievalEvaluator needs its data or, to describe recorded metrics, a name")
        self.data, self.name = data, name or f"{Path(str(data.name)).name}-{data.split}"
        self.primary_metric = metric
        self.top_k, self.index_factory, self.batch_size, self.dtype = top_k, index_factory, batch_size, dtype
        self.relevance_level, self.max_queries, self.progress = relevance_level, max_queries, progress
        self.index_train_size, self.search_backend = index_train_size, search_backend  # (None: evaluate_model's)
        self.last_result = None

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        from prod_st.retrieval.evaluation import evaluate_model

        if self.data is None:
            raise ProdStError(f"evaluator {self.name!r} has no data: it only describes metrics measured earlier")
        self.last_result = evaluate_model(
            model, self.data, top_k=self.top_k, index_factory=self.index_factory, batch_size=self.batch_size,
            dtype=self.dtype, relevance_level=self.relevance_level, max_queries=self.max_queries, keep_run=True,
            progress=self.progress, search_backend=self.search_backend,
            **({"index_train_size": self.index_train_size} if self.index_train_size is not None else {}),
        )
        return self.record(model, self.last_result.metrics, epoch=epoch, steps=steps)

    def record(self, model, metrics: dict[str, float], *, epoch: int = 0, steps: int = 0) -> dict[str, float]:
        """Record `metrics` (unprefixed, as evaluate_model gives them) in `model`'s card data; return them
        prefixed with this evaluator's name."""
        prefixed = self.prefix_name_to_metrics(dict(metrics), self.name)
        self.store_metrics_in_model_card_data(model, prefixed, max(epoch, 0), max(steps, 0))
        return prefixed

    @property
    def description(self) -> str:
        return "Retrieval"

    def get_config_dict(self) -> dict:
        config = {"top_k": self.top_k, "index_factory": self.index_factory, "relevance_level": self.relevance_level}
        config |= {"dtype": self.dtype} if self.dtype != "float32" else {}
        return config | ({"max_queries": self.max_queries} if self.max_queries else {})
