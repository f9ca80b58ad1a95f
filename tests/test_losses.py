"""PROD loss maths and PRODLoss against hand-computed values (formulas of the PROD paper, arXiv:2209.13335)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import numpy as np
import torch
import torch.multiprocessing as mp
from conftest import as_torchrun_starts, free_port
from torch import nn

from prod_st.training.losses import PRODLoss, prod_distill_loss
from prod_st.util import distributed

INF = math.inf


# ---- reference maths, written from the paper with plain floats -------------------------------------------------


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hard_ref(s: list[float], pos: int) -> float:
    return -math.log(softmax(s)[pos])


def kd_ref(t: list[float], s: list[float], temperature: float) -> float:
    return temperature**2 * kl(softmax([x / temperature for x in t]), softmax([x / temperature for x in s]))


def expected(student, teacher, positives, temperature=4.0, previous=None, weights=(0.1, 0.9, 1.0)):
    n = len(student)
    hard = sum(hard_ref(s, p) for s, p in zip(student, positives)) / n
    kd = sum(kd_ref(t, s, temperature) for t, s in zip(teacher, student)) / n
    reg = 0.0 if previous is None else sum(kd_ref(r, s, temperature) for r, s in zip(previous, student)) / n
    return {"hard": weights[0] * hard, "kd": weights[1] * kd, "reg": weights[2] * reg}


def assert_components(got: dict[str, torch.Tensor], want: dict[str, float]) -> None:
    assert set(got) == {"hard", "kd", "reg"}
    for name, value in want.items():
        assert got[name].ndim == 0
        assert got[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7), name


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ---- prod_distill_loss ---------------------------------------------------------------------------------------


def test_hard_component_matches_hand_value():
    out = prod_distill_loss(t([[1.0, 2.0, 0.0]]), t([[0.0, 0.0, 0.0]]), hard_weight=1.0)
    # -log(e^1 / (e^1 + e^2 + e^0))
    assert out["hard"].item() == pytest.approx(-(1.0 - math.log(math.e + math.e**2 + 1.0)), rel=1e-6)
    default = prod_distill_loss(t([[1.0, 2.0, 0.0]]), t([[0.0, 0.0, 0.0]]))
    assert default["hard"].item() == pytest.approx(0.1 * (math.log(math.e + math.e**2 + 1.0) - 1.0), rel=1e-6)


def test_kd_component_matches_hand_value():
    student, teacher = [1.0, 0.0, -1.0], [2.0, 0.0, 1.0]
    out = prod_distill_loss(t([student]), t([teacher]), temperature=2.0, kd_weight=1.0)
    p = [math.exp(1.0), 1.0, math.exp(0.5)]  # exp(teacher / 2)
    q = [math.exp(0.5), 1.0, math.exp(-0.5)]  # exp(student / 2)
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    want = 4.0 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert out["kd"].item() == pytest.approx(want, rel=1e-5)
    assert out["reg"].item() == 0.0


def test_kd_temperature_squared_scaling():
    student, teacher = [[3.0, 1.0, 0.0, -2.0]], [[0.0, 2.0, 1.0, 4.0]]
    kd2 = prod_distill_loss(t(student), t(teacher), temperature=2.0, kd_weight=1.0)["kd"].item()
    kd4 = prod_distill_loss(t(student), t(teacher), temperature=4.0, kd_weight=1.0)["kd"].item()
    want2, want4 = kd_ref(teacher[0], student[0], 2.0), kd_ref(teacher[0], student[0], 4.0)
    assert kd2 == pytest.approx(want2, rel=1e-5)
    assert kd4 == pytest.approx(want4, rel=1e-5)
    # The T^2 factor: doubling T multiplies the prefactor by 4, times the ratio of the two KLs.
    kl2 = kl(softmax([x / 2 for x in teacher[0]]), softmax([x / 2 for x in student[0]]))
    kl4 = kl(softmax([x / 4 for x in teacher[0]]), softmax([x / 4 for x in student[0]]))
    assert kd4 / kd2 == pytest.approx(4.0 * kl4 / kl2, rel=1e-5)


def test_reg_component_and_defaults_on_a_batch():
    student = [[1.0, 0.5, -0.5], [0.0, 2.0, 1.0]]
    teacher = [[4.0, 1.0, 0.0], [3.0, 2.5, -1.0]]
    previous = [[2.0, 0.0, 0.0], [1.0, 1.0, 1.5]]
    out = prod_distill_loss(t(student), t(teacher), t(previous))
    assert_components(out, expected(student, teacher, [0, 0], previous=previous))


def test_reg_is_zero_without_previous_or_weight():
    student, teacher = t([[1.0, 0.0]]).double(), t([[0.0, 1.0]]).double()
    for out in (
        prod_distill_loss(student, teacher),
        prod_distill_loss(student, teacher, t([[5.0, -5.0]]), reg_weight=0.0),
    ):
        assert out["reg"].item() == 0.0
        assert out["reg"].ndim == 0
        assert out["reg"].dtype == torch.float64
        assert out["reg"].device == student.device


def test_weights_scale_each_component():
    student, teacher, previous = [[1.0, -1.0, 0.5]], [[0.0, 1.0, 2.0]], [[1.0, 1.0, 0.0]]
    weights = (0.3, 2.0, 0.7)
    out = prod_distill_loss(
        t(student), t(teacher), t(previous), temperature=3.0, hard_weight=0.3, kd_weight=2.0, reg_weight=0.7
    )
    assert_components(out, expected(student, teacher, [0], 3.0, previous, weights))


def test_per_row_positive_index():
    student = [[0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [1.0, 1.0, 0.0]]
    teacher = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0]]
    positives = [2, 0, 1]
    out = prod_distill_loss(t(student), t(teacher), positive_index=torch.tensor(positives))
    assert_components(out, expected(student, teacher, positives))


def test_missing_candidate_equals_dropping_its_column():
    # Row 0 has only 2 of 3 candidates (teacher -inf); the student's score there is arbitrary.
    student = t([[1.0, 0.0, 7.0], [0.5, 1.5, -1.0]]).requires_grad_()
    teacher = t([[2.0, 1.0, -INF], [1.0, 0.0, 2.0]])
    previous = t([[0.0, 1.0, 9.0], [1.0, 1.0, 1.0]])
    out = prod_distill_loss(student, teacher, previous, hard_weight=1.0, kd_weight=1.0)
    want = expected(
        [[1.0, 0.0], [0.5, 1.5, -1.0]],
        [[2.0, 1.0], [1.0, 0.0, 2.0]],
        [0, 0],
        previous=[[0.0, 1.0], [1.0, 1.0, 1.0]],
        weights=(1.0, 1.0, 1.0),
    )
    assert_components(out, want)
    sum(out.values()).backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[0, 2].item() == 0.0

    # Row by row, the masked row gives exactly what its two-column version gives.
    row = prod_distill_loss(student[:1].detach(), teacher[:1], previous[:1])
    dropped = prod_distill_loss(t([[1.0, 0.0]]), t([[2.0, 1.0]]), t([[0.0, 1.0]]))
    for name in row:
        assert row[name].item() == pytest.approx(dropped[name].item(), rel=1e-6)


def test_all_negatives_missing_gives_zero_loss_and_no_nan():
    student = t([[1.0, 2.0, 3.0]]).requires_grad_()
    out = prod_distill_loss(student, t([[1.0, -INF, -INF]]), t([[0.0, 1.0, 2.0]]))
    total = sum(out.values())
    assert total.item() == pytest.approx(0.0, abs=1e-7)
    total.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_gradients_reach_the_student_only():
    student = t([[1.0, 0.0, -1.0]]).double().requires_grad_()
    teacher = t([[0.0, 1.0, 0.0]]).double().requires_grad_()
    previous = t([[2.0, 0.0, 0.0]]).double().requires_grad_()
    out = prod_distill_loss(student, teacher, previous)
    sum(out.values()).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert teacher.grad is None
    assert previous.grad is None
    # d/ds of hard + kd + reg: softmax(s) - onehot, then T * (softmax(s/T) - softmax(r/T)) per KL term.
    s, tt, r, temperature = [1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0], 4.0
    ps, pst = softmax(s), softmax([x / temperature for x in s])
    pt, pr = softmax([x / temperature for x in tt]), softmax([x / temperature for x in r])
    want = [
        0.1 * (ps[i] - (i == 0)) + 0.9 * temperature * (pst[i] - pt[i]) + 1.0 * temperature * (pst[i] - pr[i])
        for i in range(3)
    ]
    assert student.grad[0].tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"teacher_scores": t([[0.0] * 8] * 4)},
            r"teacher_scores has shape \(4, 8\) but student_scores has \(4, 16\): pass one score per candidate",
        ),
        ({"previous_scores": t([[0.0] * 16] * 3)}, r"previous_scores has shape \(3, 16\)"),
        ({"student_scores": t([0.0] * 16), "teacher_scores": t([0.0] * 16)}, "batch_size, num_candidates"),
        ({"positive_index": 16}, r"positive_index must lie in \[0, 15\]"),
        ({"positive_index": torch.tensor([0, 1])}, r"integer tensor of shape \(4,\)"),
        ({"temperature": 0.0}, "temperature must be a positive"),
        ({"kd_weight": -1.0}, "kd_weight must be a non-negative"),
        ({"teacher_scores": t([[float("nan")] * 16] * 4)}, "NaN"),
    ],
)
def test_input_errors_say_what_to_do(kwargs, message):
    args = {"student_scores": t([[0.0] * 16] * 4), "teacher_scores": t([[0.0] * 16] * 4), **kwargs}
    with pytest.raises(ValueError, match=message):
        prod_distill_loss(**args)


def test_no_value_is_read_back_from_an_accelerator():
    """Value checks read tensors back to the host: on a GPU that is a sync at every step, so they run on CPU
    tensors only (the runner checks its labels where it writes them). Meta tensors have no values: any read
    would raise here."""
    meta = lambda rows: t(rows).to("meta")
    for positive in (0, torch.zeros(4, dtype=torch.long, device="meta")):
        parts = prod_distill_loss(meta([[0.0] * 16] * 4), meta([[float("nan")] * 16] * 4), meta([[0.0] * 16] * 4),
                                  positive_index=positive)
        assert {k: v.device.type for k, v in parts.items()} == {"hard": "meta", "kd": "meta", "reg": "meta"}
    with pytest.raises(ValueError, match=r"positive_index must lie in \[0, 15\]"):  # an int is checked anywhere
        prod_distill_loss(meta([[0.0] * 16] * 4), meta([[0.0] * 16] * 4), positive_index=16)


def test_missing_positive_is_an_error():
    with pytest.raises(ValueError, match=r"-inf at the positive column of rows \[1\].*finite teacher score"):
        prod_distill_loss(t([[0.0, 1.0], [0.0, 1.0]]), t([[0.0, -INF], [-INF, 1.0]]))


# ---- PRODLoss ------------------------------------------------------------------------------------------------


class FakeModel(nn.Module):
    """Maps {'input_ids': (B, L)} to {'sentence_embedding': mean token embedding}, like a SentenceTransformer."""

    def __init__(self, vocab: int = 10, dim: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(vocab, dim)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features["sentence_embedding"] = self.embedding(features["input_ids"]).mean(dim=1)
        return features


def test_list_mode_from_embeddings():
    # 2 queries, positive + 2 negatives each; D = 2, dot product, scale 2.
    queries = t([[1.0, 0.0], [0.0, 1.0]])
    positives = t([[1.0, 1.0], [0.0, 2.0]])
    negatives_1 = t([[0.5, 0.0], [1.0, 0.0]])
    negatives_2 = t([[-1.0, 3.0], [1.0, 1.0]])
    # Student scores by hand: scale * q . d  -> row 0: 2*[1, 0.5, -1], row 1: 2*[2, 0, 1]
    student = [[2.0, 1.0, -2.0], [4.0, 0.0, 2.0]]
    teacher = [[5.0, 1.0, 0.0], [3.0, -INF, 2.0]]  # row 1 lacks its first negative
    loss = PRODLoss(nn.Identity(), scale=2.0)
    total = sum(loss.compute_loss_from_embeddings([queries, positives, negatives_1, negatives_2], t(teacher)).values())
    # The masked column behaves as if dropped.
    want = expected([student[0], [4.0, 2.0]], [teacher[0], [3.0, 2.0]], [0, 0])
    assert total.item() == pytest.approx(sum(want.values()), rel=1e-5)
    assert loss.last_components == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_list_mode_previous_embeddings():
    queries, positives, negatives = t([[1.0, 0.0]]), t([[2.0, 0.0]]), t([[0.0, 1.0]])
    previous = [t([[0.0, 1.0]]), t([[1.0, 1.0]]), t([[0.0, 3.0]])]  # scores [1, 3]
    loss = PRODLoss(nn.Identity())
    loss.compute_loss_from_embeddings([queries, positives, negatives], t([[1.0, 0.0]]), previous)
    want = expected([[2.0, 0.0]], [[1.0, 0.0]], [0], previous=[[1.0, 3.0]])
    assert loss.last_components == pytest.approx(want, rel=1e-5)


def test_in_batch_mode_3x3_from_embeddings():
    # 3 queries, 1 positive each, no negatives: every query scores the 3 positives of the batch.
    queries = t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positives = t([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # Student S[i][j] = q_i . p_j
    student = [[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [1.0, 1.0, 1.0]]
    # Teacher embeddings per row: [query, positive]; D_t = 3 differs from the student's D.
    labels = t(
        [
            [[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
            [[0.0, 2.0, 0.0], [0.0, 1.0, 0.0]],
            [[1.0, 1.0, 1.0], [1.0, 1.0, 2.0]],
        ]
    )
    # Teacher T[i][j] = tq_i . tp_j
    teacher = [[2.0, 0.0, 2.0], [0.0, 2.0, 2.0], [1.0, 1.0, 4.0]]
    loss = PRODLoss(nn.Identity(), candidate_mode="in_batch", reg_weight=0.0)
    total = sum(loss.compute_loss_from_embeddings([queries, positives], labels).values())
    want = expected(student, teacher, [0, 1, 2])
    assert total.item() == pytest.approx(sum(want.values()), rel=1e-5)
    assert loss.last_components == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_in_batch_mode_orders_positives_then_negatives():
    """(gather_across_devices without a process group is a no-op, as documented: one process's batch is the
    global one. Under a real group: test_gathered_in_batch_loss_on_two_ranks_is_the_global_batch_loss.)"""
    # B = 2, N = 1: candidate columns are [p_0, p_1, n_0, n_1]; query i's positive is column i.
    queries = t([[1.0, 0.0], [0.0, 1.0]])
    positives, negatives = t([[1.0, 0.0], [0.0, 2.0]]), t([[3.0, 0.0], [1.0, 1.0]])
    student = [[1.0, 0.0, 3.0, 1.0], [0.0, 2.0, 0.0, 1.0]]
    labels = t([[[1.0], [1.0], [2.0]], [[2.0], [3.0], [-1.0]]])  # D_t = 1: [q, p, n]
    teacher = [[1.0, 3.0, 2.0, -1.0], [2.0, 6.0, 4.0, -2.0]]
    previous = [queries * 0.5, positives, negatives]
    previous_scores = [[0.5 * x for x in row] for row in student]
    loss = PRODLoss(nn.Identity(), candidate_mode="in_batch", scale=2.0, gather_across_devices=True)
    total = sum(loss.compute_loss_from_embeddings([queries, positives, negatives], labels, previous).values())
    scaled = [[2.0 * x for x in row] for row in student]
    want = expected(scaled, teacher, [0, 1], previous=[[2.0 * x for x in row] for row in previous_scores])
    assert total.item() == pytest.approx(sum(want.values()), rel=1e-5)



# ---- PRODLoss's gathered in-batch candidates on 2 real gloo ranks ----------------------------------------------

GLOBAL_ROWS, WORLD = 6, 2  # a global batch of 6 queries: 3 per rank


def _global_batch() -> dict[str, torch.Tensor]:
    """A fixed global batch: student embeddings of [query, positive, negative_1, negative_2] (D = 4), the
    teacher's embeddings of the same texts (D_t = 3), and the frozen stage-start student's embeddings."""
    g = torch.Generator().manual_seed(0)
    return {"student": torch.randn(4, GLOBAL_ROWS, 4, generator=g), "teacher": torch.randn(GLOBAL_ROWS, 4, 3, generator=g),
            "previous": torch.randn(4, GLOBAL_ROWS, 4, generator=g)}


def _gathered_loss_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank's PRODLoss (in-batch, gathered) on its contiguous slice of the global batch: its components and
    the gradients of its sum with respect to its own embeddings."""
    as_torchrun_starts(rank, world, port)
    assert distributed.init_if_launched()
    batch, per_rank = _global_batch(), GLOBAL_ROWS // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    columns = [column[mine].clone().requires_grad_(True) for column in batch["student"]]
    loss = PRODLoss(nn.Identity(), candidate_mode="in_batch", scale=2.0, gather_across_devices=True)
    components = loss.compute_loss_from_embeddings(columns, batch["teacher"][mine], list(batch["previous"][:, mine]))
    sum(components.values()).backward()
    Path(out, f"loss{rank}.json").write_text(json.dumps({
        "components": {k: float(v) for k, v in components.items()}, "grads": [c.grad.tolist() for c in columns]}))
    distributed.leave_group()


@pytest.mark.slow
def test_gathered_in_batch_loss_on_two_ranks_is_the_global_batch_loss(tmp_path):
    """PRODLoss with gather_across_devices on 2 gloo ranks, each holding 3 of a global batch of 6 queries: every
    rank scores its queries against all 18 passages of the global batch (positives, then each negative column),
    its positive at its global row, with the teacher's and the frozen student's scores over the same 18; so each
    rank's loss is, component by component, the hand-computed loss of its rows of the one-process score matrices
    over the concatenated batch. Each rank's gradient (the gather's backward sums every rank's share into the
    passages it owns; DDP then averages over the 2 ranks) is 2 x the one-process gradient of the global loss."""
    mp.spawn(_gathered_loss_rank, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [json.loads((tmp_path / f"loss{r}.json").read_text()) for r in range(WORLD)]

    batch = _global_batch()
    leaves = [column.clone().requires_grad_(True) for column in batch["student"]]
    passages = torch.cat(leaves[1:])  # (18, D): every positive, then every negative_1, then every negative_2
    student = 2.0 * leaves[0] @ passages.T
    teacher = batch["teacher"][:, 0] @ batch["teacher"][:, 1:].transpose(0, 1).reshape(-1, 3).T
    previous = 2.0 * batch["previous"][0] @ torch.cat(list(batch["previous"][1:])).T
    rows = list(range(GLOBAL_ROWS))
    per_rank = GLOBAL_ROWS // WORLD
    for rank, got in enumerate(ranks):
        mine = rows[rank * per_rank:(rank + 1) * per_rank]
        want = expected(student[mine].tolist(), teacher[mine].tolist(), mine, previous=previous[mine].tolist())
        assert got["components"] == pytest.approx(want, rel=1e-5, abs=1e-7), rank
        assert want["reg"] > 0 and want["hard"] > 0
    whole = prod_distill_loss(student, teacher, previous, positive_index=torch.arange(GLOBAL_ROWS))
    sum(whole.values()).backward()
    for column, leaf in enumerate(leaves):
        from_ranks = torch.cat([torch.tensor(r["grads"][column]) for r in ranks]) / WORLD  # DDP's average
        torch.testing.assert_close(from_ranks, leaf.grad, rtol=1e-4, atol=1e-6, msg=f"column {column}")


@pytest.mark.parametrize(
    ("mode", "columns", "labels", "message"),
    [
        ("list", 3, None, r"labels of shape \(batch_size, N\+1\) = \(2, 2\).*got no labels"),
        ("list", 3, torch.zeros(2, 3), r"\(2, 2\).*got labels of shape \(2, 3\)"),
        ("list", 2, torch.zeros(2, 1), "at least 3 columns"),
        ("in_batch", 2, torch.zeros(2, 2), r"\(batch_size, N\+2, D_t\) = \(2, 2, D_t\)"),
        ("in_batch", 3, None, "no labels and no teacher module"),
    ],
)
def test_prodloss_label_errors(mode, columns, labels, message):
    loss = PRODLoss(nn.Identity(), candidate_mode=mode)
    with pytest.raises(ValueError, match=message):
        loss.compute_loss_from_embeddings([torch.ones(2, 2)] * columns, labels)


def _features(*rows: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.tensor(column)} for column in rows]


def test_forward_delegates_and_previous_model_gets_no_gradient():
    model = FakeModel()
    previous = copy.deepcopy(model)
    with torch.no_grad():
        previous.embedding.weight.add_(0.5)
    previous.train()
    loss = PRODLoss(model, previous_model=previous)
    assert not any(p.requires_grad for p in previous.parameters())
    trainable = [p for p in loss.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is model.embedding.weight

    features = _features([[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 1], [2, 3]])
    labels = t([[2.0, 0.0], [1.0, 0.5]])
    total = sum(loss(features, labels).values())
    total.backward()

    with torch.no_grad():
        embed = [model.embedding(f["input_ids"]).mean(1) for f in features]
        previous_embed = [previous.embedding(f["input_ids"]).mean(1) for f in features]
    reference = sum(PRODLoss(nn.Identity()).compute_loss_from_embeddings(embed, labels, previous_embed).values())
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)
    assert loss.last_components["reg"] > 0
    assert model.embedding.weight.grad is not None
    assert previous.embedding.weight.grad is None
    assert not previous.training


def test_forward_in_batch_with_online_teacher():
    model, teacher = FakeModel(seed=0), FakeModel(vocab=10, dim=4, seed=1)
    loss = PRODLoss(model, candidate_mode="in_batch", teacher=teacher)
    features = _features([[1, 2], [3, 4], [5, 5]], [[6, 7], [8, 9], [0, 1]])
    total = sum(loss(features, None).values())
    total.backward()
    with torch.no_grad():
        labels = torch.stack([teacher.embedding(f["input_ids"]).mean(1) for f in features], dim=1)
        embed = [model.embedding(f["input_ids"]).mean(1) for f in features]
    reference = sum(PRODLoss(nn.Identity(), candidate_mode="in_batch").compute_loss_from_embeddings(embed, labels).values())
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)
    assert teacher.embedding.weight.grad is None


def test_config_and_citation():
    loss = PRODLoss(nn.Identity(), candidate_mode="in-batch", temperature=2.0, scale=3.0)
    config = loss.get_config_dict()
    assert config == {
        "candidate_mode": "in_batch",
        "temperature": 2.0,
        "hard_weight": 0.1,
        "kd_weight": 0.9,
        "reg_weight": 1.0,
        "scale": 3.0,
        "similarity_fct": "dot_score",
        "gather_across_devices": False,
        "length_buckets": 4,
    }
    assert "@inproceedings{lin2023prod" in loss.citation
    assert "2209.13335" in loss.citation
    with pytest.raises(ValueError, match="candidate_mode"):
        PRODLoss(nn.Identity(), candidate_mode="pairs")


def test_precomputed_previous_scores_equal_the_online_frozen_model():
    """labels (B, 2, N+1) = [teacher, frozen student] give the same loss as running the frozen model, and
    the frozen model is then never called."""
    model = FakeModel()
    previous = copy.deepcopy(model)
    with torch.no_grad():
        previous.embedding.weight.add_(0.3)
    features = _features([[1, 2], [3, 4]], [[5, 6], [7, 8]], [[9, 1], [2, 3]])
    teacher = t([[2.0, 0.0], [1.0, 0.5]])
    online = PRODLoss(model, previous_model=previous)
    want = sum(online([dict(f) for f in features], teacher).values())
    with torch.no_grad():
        q, p, n = (previous.embedding(f["input_ids"]).mean(1) for f in features)
    previous_scores = torch.stack([(q * p).sum(1), (q * n).sum(1)], dim=1)  # dot products by hand
    calls = []
    previous.register_forward_hook(lambda *args: calls.append(1))
    precomputed = PRODLoss(model, previous_model=previous)
    got = sum(precomputed([dict(f) for f in features], torch.stack([teacher, previous_scores], dim=1)).values())
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert precomputed.last_components["reg"] > 0 and calls == []


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_student_is_scored_with_its_own_similarity(tiny_model_dir, similarity):
    """A raw encoder (no Normalize module) declared cosine trains on cosine x 20, as it is evaluated and as its
    teacher's labels are scaled; a dot-product student trains on the raw dot product."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(tiny_model_dir)
    model.similarity_fn_name = similarity
    assert not any(type(m).__name__ == "Normalize" for m in model)
    loss = PRODLoss(model, reg_weight=0.0)
    q, p, n = (model.encode(texts, convert_to_tensor=True) for texts in (["a query", "b query"], ["pa", "pb"], ["na", "nb"]))
    teacher = t([[2.0, 0.0], [1.0, 0.5]])
    got = loss.compute_loss_from_embeddings([q, p, n], teacher)
    scale = 20.0 if similarity == "cosine" else 1.0
    student = scale * torch.stack([model.similarity_pairwise(q, p), model.similarity_pairwise(q, n)], dim=1)
    want = prod_distill_loss(student, teacher, temperature=4.0, hard_weight=0.1, kd_weight=0.9, reg_weight=0.0)
    for name in ("hard", "kd"):
        assert got[name].item() == pytest.approx(want[name].item(), rel=1e-5)
    raw_dot = torch.stack([(q * p).sum(1), (q * n).sum(1)], dim=1) * scale
    if similarity == "cosine":  # the old behaviour (dot x 20 on unnormalised vectors) gives another loss
        wrong = prod_distill_loss(raw_dot, teacher, temperature=4.0, hard_weight=0.1, kd_weight=0.9, reg_weight=0.0)
        assert wrong["kd"].item() != pytest.approx(want["kd"].item(), rel=1e-3)


def test_length_buckets_give_the_merged_forward_embeddings_and_gradients(tiny_model_dir):
    """Candidates run in length-sorted groups, each trimmed to its own longest row: the embeddings and the
    gradients of one merged pass padded to the longest document (sentence-transformers' embed_columns), with
    fewer padded tokens through the model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.losses.merged_forward import embed_columns

    from prod_st.training.losses import length_buckets

    model = SentenceTransformer(tiny_model_dir, device="cpu").eval()  # no dropout: the two paths are comparable
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "tree"], n))
    columns = [[words(3) for _ in range(8)]] + [[words(int(rng.integers(2, 50))) for _ in range(8)] for _ in range(16)]
    widths = []
    model[0].register_forward_pre_hook(lambda module, args: widths.append(tuple(args[0]["input_ids"].shape)))

    def run(embed):
        model.zero_grad()
        features = [model.preprocess(texts) for texts in columns]
        embeddings = embed(model, features)
        torch.stack(embeddings).pow(2).sum(dim=-1).sqrt().sum().backward()  # a loss of every row
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        return torch.stack(embeddings).detach(), grads

    merged, merged_grads = run(embed_columns)
    merged_widths, widths[:] = list(widths), []
    bucketed, bucketed_grads = run(lambda m, f: length_buckets.embed_columns_by_length(m, f, buckets=4))
    assert bucketed.shape == merged.shape == (17, 8, 32)
    torch.testing.assert_close(bucketed, merged, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bucketed_grads, merged_grads, atol=1e-4, rtol=1e-3)
    assert len(merged_widths) == 2 and len(widths) == 5  # queries + one merged pass; queries + 4 groups
    assert [w[0] for w in widths[1:]] == [32] * 4 and widths[1][1] == merged_widths[1][1]
    assert sum(r * c for r, c in widths[1:]) < 0.8 * merged_widths[1][0] * merged_widths[1][1]  # less padding
