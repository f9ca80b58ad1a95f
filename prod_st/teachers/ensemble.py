"""A teacher made of other teachers: the weighted sum of their logits (each member's scores in its own logit
scale), i.e. a product of the members' softmax distributions. With weights summing to 1 it is their
log-linear (geometric) mean, sharp as a single member; it is the cheap third step of the teacher chain when
no bigger cross-encoder is at hand, since every member's scores come from that member's own cache."""

from __future__ import annotations

from prod_st.util.errors import ProdStError

from .base import check_rows


class EnsembleTeacher:
    """`members`: (teacher, weight, scale) triples; the score of a candidate is sum(weight * scale * score)."""

    kind = "ensemble"

    def __init__(self, members: list[tuple[object, float, float]], *, name: str = "ensemble") -> None:
        if not members:
            raise ProdStError(f"ensemble teacher {name!r} has no members")
        self.members = members
        self.name = name

    def score(
        self, queries: list[str], candidate_lists: list[list[str]], *, progress: bool = True
    ) -> list[list[float]]:
        check_rows(queries, candidate_lists)
        total = [[0.0] * len(row) for row in candidate_lists]
        for teacher, weight, scale in self.members:
            for summed, row in zip(total, teacher.score(queries, candidate_lists, progress=progress)):
                for j, value in enumerate(row):
                    summed[j] += weight * scale * value
        return total

    def __repr__(self) -> str:
        parts = ", ".join(f"{weight:g} x {teacher.name}" for teacher, weight, _ in self.members)
        return f"EnsembleTeacher({self.name!r}: {parts})"
