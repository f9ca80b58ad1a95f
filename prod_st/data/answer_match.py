"""Answer matching for open-domain QA retrieval (Natural Questions), as DPR evaluates it.

DPR (`dpr/data/qa_validation.py`, match type "string") counts a retrieved passage as a hit when one of the
question's answers occurs in the passage text as a contiguous sequence of tokens, after unicode NFD
normalisation and lowercasing, with DPR's SimpleTokenizer: tokens are runs of letters, digits and combining
marks, or any single other non-space character (`[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}]`). That pattern needs the
`regex` module, a dependency of transformers, and is used verbatim when it imports; otherwise Python's `re`
approximates it (letters and digits via `[^\\W_]`, combining marks via the main Unicode combining blocks, and
`\\S` for the rest, so control characters count as symbols there). As in DPR, accents are kept (NFD splits them
off as marks inside the token): "Röntgen" matches "Röntgen" whatever its composition, but not "Rontgen".

The paper's "R@k" on NQ is this top-k accuracy: the share of questions with at least one answer-bearing passage
among the first k retrieved. DPR matches against the passage text only, not its title: `texts_of` should give
the passage bodies.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence

_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"  # the combining-mark blocks
# Python `re` approximation of DPR's SimpleTokenizer, used only when `regex` is missing
RE_TOKEN = re.compile(rf"((?:[^\W_]|[{_MARKS}])+)|(\S)", flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
try:
    import regex

    _TOKEN = regex.compile(  # DPR's pattern and flags, verbatim
        r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
    )
except ImportError:  # pragma: no cover - regex comes with transformers
    _TOKEN = RE_TOKEN


def tokens(text: str) -> list[str]:
    """DPR's normalised word tokens of `text`: NFD, SimpleTokenizer, lowercased."""
    return [m.group().lower() for m in _TOKEN.finditer(unicodedata.normalize("NFD", text))]


def has_answer(passage_text: str, answers: Iterable[str]) -> bool:
    """Whether any of `answers` occurs in `passage_text` as a contiguous token sequence (DPR "string" match).
    An answer with no tokens matches nothing (DPR would count an empty answer as found everywhere)."""
    words = tokens(passage_text)
    for answer in answers:
        wanted = tokens(answer)
        n = len(wanted)
        if n and any(words[i:i + n] == wanted for i in range(len(words) - n + 1)):
            return True
    return False


def top_k_accuracy(
    ranked: dict[str, Sequence[str]],
    answers: dict[str, list[str]],
    texts_of: Callable[[list[str]], list[str]],
    ks: Sequence[int] = (5, 20, 100),
) -> dict[str, float]:
    """{"Acc@k": share of the questions in `answers` with an answer-bearing passage among their first k
    `ranked` doc ids} for each k in `ks`. A question missing from `ranked` counts as a miss. `texts_of(doc_ids)`
    returns the passage texts of those ids, in order (called once per question, with its top max(ks) ids)."""
    depth = max(ks)
    first_hits = []  # rank (0-based) of each question's first answer-bearing passage, or None
    for qid, question_answers in answers.items():
        doc_ids = list(ranked.get(qid, ()))[:depth]
        texts = texts_of(doc_ids) if doc_ids else []
        first_hits.append(next((rank for rank, text in enumerate(texts) if has_answer(text, question_answers)), None))
    total = len(first_hits)
    return {
        f"Acc@{k}": (sum(1 for rank in first_hits if rank is not None and rank < k) / total if total else 0.0)
        for k in ks
    }
