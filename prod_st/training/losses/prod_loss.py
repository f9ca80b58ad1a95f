"""PRODLoss: the PROD distillation objective as a sentence-transformers loss module."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from sentence_transformers.util import all_gather, all_gather_with_grad, dot_score, get_rank, similarity_fct_name
from torch import Tensor, nn

from prod_st.retrieval.encoding import similarity_fct as own_similarity
from prod_st.util.citation import PROD_BIBTEX

from .contrastive import score_scale
from .length_buckets import embed_columns_by_length
from .prod_distill import prod_distill_loss


__all__ = ["PRODLoss"]

CandidateMode = Literal["list", "in_batch"]
_MODE_ALIASES = {"list": "list", "in_batch": "in_batch", "in-batch": "in_batch", "inbatch": "in_batch"}


class PRODLoss(nn.Module):
    def __init__(
        self,
        model: nn.Module,
        *,
        candidate_mode: CandidateMode = "list",
        temperature: float = 4.0,
        hard_weight: float = 0.1,
        kd_weight: float = 0.9,
        reg_weight: float = 1.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] | None = None,
        scale: float | None = None,
        previous_model: nn.Module | None = None,
        teacher: nn.Module | None = None,
        gather_across_devices: bool = False,
        length_buckets: int = 4,
    ) -> None:
        """PROD loss (Lin et al., WWW 2023): ``hard_weight * L_hard + kd_weight * L_KD + reg_weight * L_reg``.

        Student scores are ``scale * similarity_fct(query, passage)``; the maths lives in
        :func:`prod_st.training.losses.prod_distill_loss`.

        Args:
            model: the student (SentenceTransformer) being trained.
            candidate_mode: which candidates each query is scored against.

                - ``"list"`` (cross-encoder stages, DPD): the query's own ``[positive, neg_1..neg_N]``.
                  ``labels`` is the teacher's ``(B, N+1)`` score matrix, positive first; ``-inf`` marks
                  a missing candidate (its text column still needs a filler passage).
                - ``"in_batch"`` (dual-encoder stage 1): every passage of the batch (all positives,
                  then all first negatives, ...; ``B*(N+1)`` columns), query ``i``'s positive is column
                  ``i``. ``labels`` is a ``(B, N+2, D_t)`` tensor of the teacher's embeddings of
                  ``[query, positive, neg_1..neg_N]`` per row (cacheable); teacher scores are their dot
                  products, arranged like the student's. With ``labels=None`` the ``teacher`` module
                  embeds the same features online instead.
            temperature: distillation temperature ``T`` (PROD: 4).
            hard_weight: weight of the hard (contrastive) loss (PROD: 0.1).
            kd_weight: weight of the teacher distillation loss (PROD: 0.9).
            reg_weight: weight of the regularisation towards ``previous_model`` (PROD: 1.0).
            similarity_fct: student similarity, ``(B, D) x (M, D) -> (B, M)``. None (the default) takes the
                student's own (``model.similarity_fn_name``: ``cos_sim`` for cosine models, ``dot_score`` for
                dot-product ones, PROD's choice), so training scores candidates exactly as evaluation does.
            scale: multiplier of the student (and previous-model) similarities; None: 20 for cosine, 1 for dot.
            previous_model: frozen copy of the student taken at the start of the stage, for the
                regularisation loss; None disables it. Frozen here and run under ``no_grad`` in eval mode.
            teacher: in ``"in_batch"`` mode only, a bi-encoder sharing the student's tokenizer that embeds
                the batch online when ``labels`` is None. Frozen here and run under ``no_grad`` in eval mode.
            gather_across_devices: in ``"in_batch"`` mode, make every passage of the global (all-rank) batch
                a candidate; needs the same batch size and column count on every rank. A no-op when
                torch.distributed is not initialised.
            length_buckets: the candidate columns run in up to this many forward passes of similar-length
                documents, each padded to its own longest (``prod_st.training.losses.length_buckets``); 1 = one
                merged pass padded to the longest document, as sentence-transformers' ``embed_columns``.

        Inputs:
            +---------------------------------------------+----------------+------------------------------------+
            | Inputs                                      | candidate_mode | Labels                             |
            +=============================================+================+====================================+
            | (query, positive, negative_1, ..., neg_N)   | "list"         | teacher scores, (B, N+1)           |
            +---------------------------------------------+----------------+------------------------------------+
            | (query, positive[, negative_1, ..., neg_N]) | "in_batch"     | teacher embeddings, (B, N+2, D_t)  |
            +---------------------------------------------+----------------+------------------------------------+

        After every call, :attr:`last_components` holds the weighted ``hard``/``kd``/``reg`` values.
        """
        super().__init__()
        if candidate_mode not in _MODE_ALIASES:
            raise ValueError(f"candidate_mode must be 'list' or 'in_batch', got {candidate_mode!r}.")
        if similarity_fct is None:
            similarity_fct = own_similarity(model) if hasattr(model, "similarity_fn_name") else dot_score
        if scale is None:
            scale = score_scale(model) if hasattr(model, "similarity_fn_name") else 1.0
        if not 0 < scale < math.inf:
            raise ValueError(f"scale must be a positive finite number, got {scale}.")
        self.model = model
        self.candidate_mode: CandidateMode = _MODE_ALIASES[candidate_mode]  # type: ignore[assignment]
        self.temperature = temperature
        self.hard_weight = hard_weight
        self.kd_weight = kd_weight
        self.reg_weight = reg_weight
        self.similarity_fct = similarity_fct
        self.scale = scale
        self.gather_across_devices = gather_across_devices
        self.length_buckets = length_buckets
        # Registered as submodules so the trainer moves them to the model's device; frozen so that
        # the trainer's optimizer (which collects the loss's trainable parameters) never updates them.
        self.previous_model = previous_model.requires_grad_(False) if previous_model is not None else None
        self.teacher = teacher.requires_grad_(False) if teacher is not None else None
        self._last_components: dict[str, Tensor] = {}

    @classmethod
    def for_stage(cls, student: nn.Module, candidates: str, spec, *, gather_across_devices: bool = False) -> PRODLoss:
        """The loss of a stage from its recipe block (`spec`: temperature and the three weights), scoring with the
        student's own similarity and scale. In-batch mode with a regulariser runs the frozen stage-start student
        online (a copy of `student` now); list mode gets those scores precomputed in the labels."""
        previous = copy.deepcopy(student) if spec.reg_weight > 0 and candidates == "in_batch" else None
        return cls(student, candidate_mode=candidates, temperature=spec.temperature, hard_weight=spec.hard_weight,
                   kd_weight=spec.kd_weight, reg_weight=spec.reg_weight, previous_model=previous,
                   gather_across_devices=gather_across_devices)

    @property
    def last_components(self) -> dict[str, float]:
        """Weighted ``hard``, ``kd`` and ``reg`` of the last call, as floats (for logging callbacks)."""
        return {name: float(value) for name, value in self._last_components.items()}

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> dict[str, Tensor]:
        """The weighted components {"hard", "kd", "reg"}: the trainer sums them into the loss and logs each."""
        features = list(sentence_features)
        # Models write their outputs into the feature dicts: give the frozen models clean copies.
        pristine = [dict(column) for column in features]
        embeddings = embed_columns_by_length(self.model, features, self.length_buckets)
        previous_embeddings = None
        precomputed = self.candidate_mode == "list" and labels is not None and labels.ndim == 3
        if self.previous_model is not None and self.reg_weight > 0 and not precomputed:
            previous_embeddings = self._embed_frozen(self.previous_model, pristine)
        if labels is None and self.candidate_mode == "in_batch" and self.teacher is not None:
            labels = torch.stack(self._embed_frozen(self.teacher, pristine), dim=1)
        return self.compute_loss_from_embeddings(embeddings, labels, previous_embeddings)

    def _embed_frozen(self, model: nn.Module, features: list[dict[str, Tensor]]) -> list[Tensor]:
        model.eval()
        with torch.no_grad():
            return embed_columns_by_length(model, [dict(column) for column in features], self.length_buckets)

    def compute_loss_from_embeddings(
        self,
        embeddings: list[Tensor],
        labels: Tensor | None,
        previous_embeddings: list[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """PROD loss components from per-column ``(B, D)`` embeddings ``[query, positive, neg_1..neg_N]``;
        the total loss is their sum."""
        if previous_embeddings is not None and len(previous_embeddings) != len(embeddings):
            raise ValueError(
                f"previous_embeddings has {len(previous_embeddings)} columns but embeddings has {len(embeddings)}: "
                "embed the same [query, positive, negatives...] columns with the previous model."
            )
        if self.candidate_mode == "list":
            student, teacher, previous, positive_index = self._list_scores(embeddings, labels, previous_embeddings)
        else:
            student, teacher, previous, positive_index = self._in_batch_scores(embeddings, labels, previous_embeddings)
        components = prod_distill_loss(
            student,
            teacher,
            previous,
            temperature=self.temperature,
            hard_weight=self.hard_weight,
            kd_weight=self.kd_weight,
            reg_weight=self.reg_weight,
            positive_index=positive_index,
        )
        self._last_components = {name: value.detach() for name, value in components.items()}
        return components

    def _own_candidate_scores(self, queries: Tensor, docs: list[Tensor]) -> Tensor:
        """``scale * sim(q_b, [pos_b, neg_b1..neg_bN])`` as a ``(B, N+1)`` matrix."""
        batch_size = queries.size(0)
        all_scores = self.similarity_fct(queries, torch.cat(docs, dim=0))  # (B, (N+1)*B), column-major
        rows = torch.arange(batch_size, device=queries.device).unsqueeze(1)
        columns = torch.arange(len(docs), device=queries.device).unsqueeze(0) * batch_size + rows
        return self.scale * all_scores.gather(1, columns)

    def _list_scores(
        self, embeddings: list[Tensor], labels: Tensor | None, previous_embeddings: list[Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor | None, int]:
        if len(embeddings) < 3:
            raise ValueError(
                f"candidate_mode='list' needs at least 3 columns (query, positive, negative_1, ...), got "
                f"{len(embeddings)}: a softmax over one candidate is constant. Add negative columns, or use "
                "candidate_mode='in_batch'."
            )
        batch_size, num_candidates = embeddings[0].size(0), len(embeddings) - 1
        # labels: teacher scores (B, N+1), or (B, 2, N+1) = [teacher scores, frozen stage-start student scores]
        # precomputed from cached embeddings, which spares the frozen model's forward pass at every step.
        if labels is None or labels.shape not in ((batch_size, num_candidates), (batch_size, 2, num_candidates)):
            got = "no labels" if labels is None else f"labels of shape {tuple(labels.shape)}"
            raise ValueError(
                f"candidate_mode='list' needs the teacher's scores as labels of shape (batch_size, N+1) = "
                f"({batch_size}, {num_candidates}) (or (batch_size, 2, N+1) with the frozen student's scores "
                f"second), positive first and -inf for missing candidates, but got {got}. "
                "Add a 'label' column with one teacher score per candidate column."
            )
        student = self._own_candidate_scores(embeddings[0], embeddings[1:])
        if labels.ndim == 3:
            return student, labels[:, 0], labels[:, 1], 0
        previous = None
        if previous_embeddings is not None:
            previous = self._own_candidate_scores(previous_embeddings[0], previous_embeddings[1:])
        return student, labels, previous, 0

    def _gather_docs(self, docs: list[Tensor], with_grad: bool) -> list[Tensor]:
        if not self.gather_across_devices:
            return docs
        gather = all_gather_with_grad if with_grad else all_gather
        return [gather(doc) for doc in docs]

    def _in_batch_scores(
        self, embeddings: list[Tensor], labels: Tensor | None, previous_embeddings: list[Tensor] | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        if len(embeddings) < 2:
            raise ValueError(
                f"candidate_mode='in_batch' needs at least 2 columns (query, positive[, negatives...]), "
                f"got {len(embeddings)}."
            )
        queries = embeddings[0]
        batch_size, num_columns = queries.size(0), len(embeddings)
        if labels is None or labels.ndim != 3 or labels.shape[:2] != (batch_size, num_columns):
            got = "no labels and no teacher module" if labels is None else f"labels of shape {tuple(labels.shape)}"
            raise ValueError(
                f"candidate_mode='in_batch' needs the teacher's embeddings of [query, positive, negatives...] as "
                f"labels of shape (batch_size, N+2, D_t) = ({batch_size}, {num_columns}, D_t), but got {got}. "
                "Add a 'label' column holding the teacher's embeddings for every text column of the row, "
                "or pass teacher= to embed them online."
            )
        offset = get_rank() * batch_size if self.gather_across_devices else 0

        docs = self._gather_docs(embeddings[1:], with_grad=True)
        student = self.scale * self.similarity_fct(queries, torch.cat(docs, dim=0))

        teacher_labels = labels.detach()
        teacher_docs = self._gather_docs(list(teacher_labels[:, 1:].unbind(1)), with_grad=False)
        teacher = dot_score(teacher_labels[:, 0], torch.cat(teacher_docs, dim=0))

        previous = None
        if previous_embeddings is not None:
            previous_docs = self._gather_docs(previous_embeddings[1:], with_grad=False)
            previous = self.scale * self.similarity_fct(previous_embeddings[0], torch.cat(previous_docs, dim=0))

        positive_index = torch.arange(offset, offset + batch_size, device=queries.device)
        return student, teacher, previous, positive_index

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "candidate_mode": self.candidate_mode,
            "temperature": self.temperature,
            "hard_weight": self.hard_weight,
            "kd_weight": self.kd_weight,
            "reg_weight": self.reg_weight,
            "scale": self.scale,
            "similarity_fct": similarity_fct_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "length_buckets": self.length_buckets,
        }

    @property
    def citation(self) -> str:
        return PROD_BIBTEX
