"""Model-free PROD loss maths on score matrices (the PROD paper's losses, arXiv:2209.13335).

For every query ``b`` with candidate set ``C_b`` (one row of a ``(B, C)`` score matrix):

- hard: ``-log softmax(s_b)[pos_b]``
- kd:   ``T^2 * KL(softmax(t_b / T) || softmax(s_b / T))``
- reg:  same form as kd with the frozen stage-start student's scores in place of the teacher's

Each component is averaged over the batch and multiplied by its weight
(PROD: 0.1 hard, 0.9 kd, 1.0 reg, T = 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["prod_distill_loss"]


def _check_scores(name: str, scores: Tensor, student_scores: Tensor) -> None:
    if scores.shape != student_scores.shape:
        raise ValueError(
            f"{name} has shape {tuple(scores.shape)} but student_scores has {tuple(student_scores.shape)}: "
            "pass one score per candidate, in the same (batch, candidate) order as the student, positive first."
        )


def _positive_columns(
    positive_index: int | Tensor, batch_size: int, num_candidates: int, device: torch.device
) -> Tensor:
    """Return the positive column of every row as a ``(B, 1)`` LongTensor, validating it."""
    if isinstance(positive_index, Tensor):
        if positive_index.shape != (batch_size,) or positive_index.is_floating_point():
            raise ValueError(
                f"positive_index must be an int or an integer tensor of shape ({batch_size},) holding each row's "
                f"positive column, got a {positive_index.dtype} tensor of shape {tuple(positive_index.shape)}."
            )
        columns = positive_index.to(device=device, dtype=torch.long)
        if batch_size and _on_host(columns) and (columns.min() < 0 or columns.max() >= num_candidates):
            _positive_range_error(num_candidates, int(columns.min()), int(columns.max()))
    else:
        if batch_size and not 0 <= int(positive_index) < num_candidates:
            _positive_range_error(num_candidates, int(positive_index), int(positive_index))
        columns = torch.full((batch_size,), int(positive_index), dtype=torch.long, device=device)
    return columns.unsqueeze(1)


def _positive_range_error(num_candidates: int, low: int, high: int) -> None:
    raise ValueError(
        f"positive_index must lie in [0, {num_candidates - 1}] (one column per candidate), "
        f"got values in [{low}, {high}]."
    )


def _on_host(tensor: Tensor) -> bool:
    """Whether checking `tensor`'s values is free: on a GPU, reading a value back waits for every queued kernel
    (a host sync per check and step), so value checks run on CPU tensors only. The runner's teacher scores are
    checked once, where their training rows are written (`prod_st.training.stage_data`)."""
    return tensor.device.type == "cpu"


def _masked_log_softmax(scores: Tensor, missing: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-softmax over the present candidates; missing ones get log-probability 0 (and zero gradient).

    Filling with 0 instead of -inf keeps ``p * (log p - log q)`` finite (p is 0 there), so neither the
    forward nor the backward pass can produce NaN.
    """
    log_probs = torch.log_softmax(scores.masked_fill(missing, -math.inf) / temperature, dim=-1)
    return log_probs.masked_fill(missing, 0.0)


def _distill_kl(target_scores: Tensor, student_log_probs: Tensor, missing: Tensor, temperature: float) -> Tensor:
    """``T^2 * mean_b KL(softmax(target_b / T) || student_b)`` over the present candidates."""
    target_log_probs = _masked_log_softmax(target_scores, missing, temperature)
    target_probs = target_log_probs.exp().masked_fill(missing, 0.0)
    kl = (target_probs * (target_log_probs - student_log_probs)).sum(dim=-1)
    return temperature**2 * kl.mean()


def prod_distill_loss(
    student_scores: Tensor,
    teacher_scores: Tensor,
    previous_scores: Tensor | None = None,
    *,
    temperature: float = 4.0,
    hard_weight: float = 0.1,
    kd_weight: float = 0.9,
    reg_weight: float = 1.0,
    positive_index: int | Tensor = 0,
) -> dict[str, Tensor]:
    """Weighted PROD loss components for ``(B, C)`` candidate score matrices.

    Args:
        student_scores: the trained student's scores; the only input that receives gradients.
        teacher_scores: the teacher's scores over the same candidates (detached here). ``-inf`` marks a
            missing candidate (e.g. a query with fewer negatives): it is dropped from every softmax.
        previous_scores: the frozen stage-start student's scores (detached here), or None to skip reg.
        temperature: distillation temperature ``T`` of kd and reg (the hard loss uses ``T = 1``).
        hard_weight, kd_weight, reg_weight: weights of the three components.
        positive_index: the positive's column, one int for all rows or a ``(B,)`` LongTensor per row.

    Returns:
        ``{"hard", "kd", "reg"}``: weighted scalar batch means. ``reg`` is a zero tensor when
        ``previous_scores`` is None or ``reg_weight == 0``.
    """
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}.")
    for name, weight in (("hard_weight", hard_weight), ("kd_weight", kd_weight), ("reg_weight", reg_weight)):
        if not 0 <= weight < math.inf:
            raise ValueError(f"{name} must be a non-negative finite number, got {weight}.")
    if student_scores.ndim != 2:
        raise ValueError(
            f"student_scores must have shape (batch_size, num_candidates), got {tuple(student_scores.shape)}."
        )
    _check_scores("teacher_scores", teacher_scores, student_scores)
    if previous_scores is not None:
        _check_scores("previous_scores", previous_scores, student_scores)

    # Compute in at least float32: fp16 softmaxes over T-scaled scores lose the teacher's tail.
    dtype = torch.promote_types(student_scores.dtype, torch.float32)
    student = student_scores.to(dtype)
    teacher = teacher_scores.detach().to(device=student.device, dtype=dtype)
    batch_size, num_candidates = student.shape

    host = _on_host(teacher)
    if host and (torch.isnan(teacher).any() or torch.isposinf(teacher).any()):
        raise ValueError("teacher_scores contain NaN or +inf: only -inf (a missing candidate) is allowed.")
    missing = torch.isneginf(teacher)
    positives = _positive_columns(positive_index, batch_size, num_candidates, student.device)
    missing_positive = missing.gather(1, positives).squeeze(1)
    if host and missing_positive.any():
        rows = missing_positive.nonzero().squeeze(1).tolist()
        raise ValueError(
            f"teacher_scores is -inf at the positive column of rows {rows}: -inf marks a missing candidate, "
            "but every query needs its positive. Give the positive a finite teacher score "
            "(positive first in list mode), or drop those queries."
        )

    hard = -_masked_log_softmax(student, missing).gather(1, positives).mean()
    student_log_probs_t = _masked_log_softmax(student, missing, temperature)
    kd = _distill_kl(teacher, student_log_probs_t, missing, temperature)
    if previous_scores is None or reg_weight == 0:
        reg = student.new_zeros(())
    else:
        previous = previous_scores.detach().to(device=student.device, dtype=dtype)
        reg = reg_weight * _distill_kl(previous, student_log_probs_t, missing, temperature)
    return {"hard": hard_weight * hard, "kd": kd_weight * kd, "reg": reg}
