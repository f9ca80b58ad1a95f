"""The run's last step: the final student (and the untrained one, and every teacher the run used) on the test
split, zero-shot BEIR if the recipe asks, into final.json."""

from __future__ import annotations

import logging
from pathlib import Path

from prod_st.retrieval.evaluation import evaluate_beir, evaluate_model
from prod_st.run.records import fmt, write_json
from prod_st.teachers.strength import teachers_on_test
from prod_st.util import cost

logger = logging.getLogger("prod_st.run")


def final_evaluation(recipe, data, pool, load_student, last: Path, init: Path | None, *, fingerprint: str,
                     seconds: float, search: dict, out: Path) -> dict:
    """Test metrics of the student in `last` (and of the untrained one in `init`, if the run trained), of the
    teachers its stages and DPD used, and BEIR's; written to `out` (final.json) with the run's `fingerprint`
    (what `prod_st.run.run_folder` compares on a rerun) and seconds. `load_student(folder)`: a step's student."""
    e, test = recipe.eval, data.test
    level = recipe.data.test_relevance_level or recipe.data.relevance_level
    kwargs = dict(top_k=e.top_k, relevance_level=level, **search)
    timing: dict = {}
    student = load_student(last)
    cost.search_cost("final: test evaluation", student, len(test.corpus), len(test.qrels or test.answers), e.top_k)
    with cost.step("final: test evaluation", timing, "test"):
        final = evaluate_model(student, test, keep_run=True, **kwargs)
        tested = {"student": final.metrics}
        if init is not None:
            tested["student_before_training"] = evaluate_model(load_student(init), test, **kwargs).metrics
        used = [s.teacher for s in recipe.stages if s.teacher] + ([recipe.dpd.teacher] if recipe.dpd else [])
        teachers = teachers_on_test(pool, used, test, data, final.run, depth=e.teacher_rerank_depth, **kwargs)
    beir = {}
    if e.beir:
        with cost.step(f"final: zero-shot BEIR ({', '.join(e.beir)})", timing, "beir"):
            beir = evaluate_beir(load_student(last), list(e.beir), **kwargs | {"relevance_level": 1})
    payload = {
        "recipe": recipe.name,
        "fingerprint": fingerprint,
        "beir": beir,
        "test": tested | {"teachers": teachers},
        "num_test_queries": final.num_queries,
        "num_docs": final.num_docs,
        "seconds": {"run": round(seconds + sum(timing.values()), 1), **timing},
    }
    write_json(out, payload)
    before = tested.get("student_before_training")
    logger.info("final test: student %s%s", fmt(final.metrics), f" (before training {fmt(before)})" if before else "")
    return payload
