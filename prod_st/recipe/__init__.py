"""The recipe: a YAML file that says what to train, validated by a pydantic v2 schema.

A recipe is one record per step of PROD's schedule (Lin et al., WWW 2023): the data, the student, the teachers
(pretrained, or trained by prod-st from a backbone), an ordered list of stages (a warm-up, then one
distillation stage per teacher), an optional DPD step, the evaluation and the output folder. With no stages
and no DPD a recipe only evaluates its student (e.g. another run's, `student.init: runs/<name>/student`) on
the test split: it needs no train or dev split.

- Every model forbids unknown keys, so a typo (``stages.0.lrr``) is an error, not a silently ignored key.
- Cross-references are checked: stages and DPD name defined teachers, ``in_batch`` candidates need a
  bi-encoder teacher, a negative miner named like a teacher must be a bi-encoder, a training recipe has train
  and dev splits.
- What needs the disk (models, dataset folders and their split files) is checked by `prod_st.run.preflight`.
- Every problem is reported with its dotted field path, all of them on one line (:class:`ProdStError`).

``load_recipe`` reads a YAML path or an embedded recipe name (``quickstart``, ``wordnet-full``, ...);
``Recipe.resolved_yaml`` is the recipe with every default filled in (what a run folder stores) and
``Recipe.fingerprint`` its hash (a run folder refuses a different recipe).

The schema is `prod_st.recipe.schema`, loading, `--set` and error lines `prod_st.recipe.loading`, the embedded
recipes `prod_st.recipe.catalogue`; this package's names are theirs.

This module knows nothing of torch: it can be imported and tested without any model.
"""

from prod_st.recipe.catalogue import embedded_recipe_file, embedded_recipes, recipe_summary, recipes_folder
from prod_st.recipe.loading import apply_overrides, data_origin, load_recipe, parse_override, parse_recipe
from prod_st.recipe.schema import (
    DPD,
    EXACT_INDEXES,
    STUDENT,
    Data,
    DPDRule,
    Evaluation,
    Loss,
    Negatives,
    Output,
    Recipe,
    Stage,
    Student,
    Teacher,
    TeacherTrain,
    Training,
)

__all__ = [
    "EXACT_INDEXES",
    "STUDENT",
    "parse_override",
    "Data",
    "DPD",
    "DPDRule",
    "Evaluation",
    "Loss",
    "Negatives",
    "Output",
    "Recipe",
    "Stage",
    "Student",
    "Teacher",
    "TeacherTrain",
    "Training",
    "apply_overrides",
    "data_origin",
    "embedded_recipe_file",
    "embedded_recipes",
    "load_recipe",
    "parse_recipe",
    "recipe_summary",
    "recipes_folder",
]
