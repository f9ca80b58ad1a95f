"""The recipe schema and its loading: fast, no models."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from prod_st.recipe import Recipe, embedded_recipes, load_recipe, parse_recipe
from prod_st.util.errors import ProdStError

MINIMAL = {
    "name": "mini",
    "data": {"dataset": "wordnet-gloss"},
    "student": {"init": "all-MiniLM-L6-v2", "num_layers": 3},
    "teachers": {
        "bi": {"kind": "bi-encoder", "model": "all-MiniLM-L6-v2"},
        "ce": {"kind": "cross-encoder", "train": {"backbone": "all-MiniLM-L6-v2", "negatives_from": "bi"}},
    },
    "stages": [
        {"name": "warmup", "kind": "warmup"},
        {"name": "bi", "kind": "distill", "teacher": "bi", "candidates": "in_batch"},
        {"name": "ce", "kind": "distill", "teacher": "ce", "loss": {"reg_weight": 1.0}},
    ],
    "dpd": {"teacher": "ce"},
}


def recipe_dict(**changes) -> dict:
    data = copy.deepcopy(MINIMAL)
    data.update(changes)
    return data


def write(tmp_path: Path, data, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(tmp_path: Path, data) -> str:
    with pytest.raises(ProdStError) as info:
        load_recipe(write(tmp_path, data))
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ embedded recipes
@pytest.mark.parametrize("name", ["quickstart", "wordnet-full"])
def test_embedded_recipes_load(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert name in embedded_recipes()


def test_embedded_file_path_loads_too():
    from prod_st.recipe import recipes_folder

    assert load_recipe(recipes_folder() / "quickstart.yaml").fingerprint() == load_recipe("quickstart").fingerprint()


# ------------------------------------------------------------------------------------------ defaults, dump, hash
def test_defaults_filled():
    recipe = parse_recipe(MINIMAL)
    assert recipe.seed == 13
    assert recipe.stages[0].loss.temperature == 4.0
    assert (recipe.stages[1].loss.hard_weight, recipe.stages[1].loss.kd_weight) == (0.1, 0.9)
    assert recipe.stages[1].loss.reg_weight == 0.0
    assert recipe.stages[0].negatives.miner == "student"
    assert (recipe.stages[0].negatives.start, recipe.stages[0].negatives.end) == (1, 100)
    assert recipe.stages[0].lr == 5e-5 and recipe.stages[0].batch_size == 64
    assert recipe.dpd.loss.reg_weight == 1.0 and recipe.dpd.lr == 1e-5 and recipe.dpd.rerank_depth == 50
    assert recipe.dpd.rule.student_max == 15 and recipe.dpd.rule.variant == "msmarco"
    assert recipe.student.max_query_length == 32 and recipe.student.max_doc_length == 144
    assert recipe.teachers["ce"].train.lr == 2e-5 and recipe.teachers["ce"].batch_size == 64
    assert recipe.eval.top_k == 1000 and recipe.eval.beir == []
    assert "temperature: 4.0" in recipe.resolved_yaml()


def test_fingerprint_stable_and_sensitive(tmp_path):
    path = write(tmp_path, MINIMAL)
    first, second = load_recipe(path), load_recipe(path)
    assert first.fingerprint() == second.fingerprint()
    assert first.resolved_yaml() == second.resolved_yaml()
    changed = recipe_dict()
    changed["stages"][2]["lr"] = 4e-5
    assert parse_recipe(changed).fingerprint() != first.fingerprint()
    # Spelling out a default changes nothing.
    explicit = recipe_dict(seed=13)
    explicit["stages"][0]["loss"] = {"temperature": 4.0}
    assert parse_recipe(explicit).fingerprint() == first.fingerprint()


def test_list_stages_and_dpd_get_prods_regulariser_unless_the_recipe_sets_one():
    """PROD regularises its cross-encoder stages and DPD (list candidates) with weight 1.0 and not its stage 1
    (in-batch): a recipe that leaves reg_weight out gets that, one that gives it (0 included) keeps its own."""
    data = recipe_dict(dpd={"teacher": "ce", "loss": {"temperature": 2.0}})
    data["stages"][2]["loss"] = {"temperature": 2.0}  # no reg_weight
    data["stages"].append({"name": "ce-again", "teacher": "ce"})  # no loss block at all
    data["stages"].append({"name": "bi-again", "teacher": "bi", "candidates": "in_batch", "loss": {"kd_weight": 1.0}})
    data["stages"].append({"name": "ce-off", "teacher": "ce", "loss": {"reg_weight": 0}})
    recipe = parse_recipe(data)
    assert [s.loss.reg_weight for s in recipe.stages] == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]  # warmup, bi, ce, ..
    assert recipe.dpd.loss.reg_weight == 1.0 and recipe.dpd.loss.temperature == 2.0
    assert parse_recipe(recipe.model_dump(mode="json")).fingerprint() == recipe.fingerprint()  # written out as 1.0
    data["stages"][2]["candidates"] = "in_batch"  # the same stage in batch mode: no regulariser
    data["stages"][2]["teacher"] = "bi"
    assert parse_recipe(data).stages[2].loss.reg_weight == 0.0


def test_shipped_recipes_spell_out_every_list_stages_reg_weight():
    """The shipped recipes do not lean on the default: their fingerprints are those of before it existed."""
    for path in sorted(RECIPES.rglob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        for stage in data["stages"]:
            if stage.get("kind", "distill") == "distill":
                assert "reg_weight" in stage.get("loss", {}), (path.name, stage["name"])
        if data.get("dpd") and "loss" in data["dpd"]:
            assert "reg_weight" in data["dpd"]["loss"], path.name


@pytest.mark.parametrize("name", ["quickstart", "wordnet-full"])
def test_resolved_yaml_round_trips(tmp_path, name):
    recipe = load_recipe(name)
    again = load_recipe(write(tmp_path, recipe.resolved_yaml()))
    assert again == recipe
    assert again.resolved_yaml() == recipe.resolved_yaml()
    assert again.fingerprint() == recipe.fingerprint()


def test_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads `1e-5` as a string (YAML 1.1); the schema still takes it as a float.
    text = write(tmp_path, MINIMAL).read_text().replace("name: warmup", "name: warmup\n  lr: 1e-5", 1)
    assert load_recipe(write(tmp_path, text)).stages[0].lr == 1e-5


def test_run_dir():
    recipe = parse_recipe(MINIMAL)
    assert recipe.run_dir() == Path("runs") / "mini"
    assert recipe.run_dir(Path("/tmp/x")) == Path("/tmp/x")
    assert parse_recipe(recipe_dict(output={"dir": "elsewhere/run"})).run_dir() == Path("elsewhere/run")


# ------------------------------------------------------------------------------------------ schema errors
def test_typo_key_is_named(tmp_path):
    data = recipe_dict()
    data["stages"][0]["lrr"] = 1e-5
    message = error_of(tmp_path, data)
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}: ")
    assert "stages.0.lrr: unknown key (did you mean 'lr'?)" in message


def test_typo_top_level_and_nested(tmp_path):
    data = recipe_dict(stagse=[])
    data["teachers"]["ce"]["train"]["backbon"] = "x"
    message = error_of(tmp_path, data)
    assert "stagse: unknown key (did you mean 'stages'?)" in message
    assert "teachers.ce.train.backbon: unknown key" in message


def test_wrong_types_all_reported(tmp_path):
    data = recipe_dict()
    data["data"]["train_queries"] = "many"
    data["stages"][1]["batch_size"] = True
    message = error_of(tmp_path, data)
    assert "data.train_queries: Input should be a valid integer" in message
    assert "stages.1.batch_size: Input should be a valid integer" in message
    assert "; " in message


def test_missing_required(tmp_path):
    data = recipe_dict()
    del data["student"]
    assert "student: required key missing" in error_of(tmp_path, data)


@pytest.mark.parametrize(
    "where, value, expected",
    [
        (("stages", 1, "lr"), 0, "stages.1.lr: Input should be greater than 0"),
        (("stages", 1, "batch_size"), 0, "stages.1.batch_size: Input should be greater than or equal to 1"),
        (("stages", 1, "epochs"), -1.0, "stages.1.epochs: Input should be greater than 0"),
        (("stages", 1, "candidates"), "batch", "stages.1.candidates: Input should be 'list' or 'in_batch'"),
        (("stages", 1, "name"), "Bad Name", "stages.1.name: 'Bad Name' is not a valid name: use lowercase"),
        (("teachers", "Big"), {"kind": "bi-encoder", "model": "x"}, "teachers.Big: 'Big' is not a valid name"),
        (("stages", 1, "loss"), {"temperature": 0}, "stages.1.loss.temperature: Input should be greater than 0"),
        (("stages", 1, "negatives"), {"start": 50, "end": 10}, "stages.1.negatives: the rank window needs start"),
        (("dpd", "rule"), {"student_max": 60}, "dpd: rerank_depth (50) must be >= rule.student_max (60)"),
        (("teachers", "bi", "train"), {"backbone": "x", "lr": -1}, "teachers.bi.train.lr: Input should be greater"),
        (("teachers", "bi", "train"), {"backbone": "x", "num_negatives": 31},
         "teachers.bi.train: num_negatives 31 is more than the miner's top 30 (negatives_window)"),
        (("teachers", "bi", "train"), {"backbone": "x", "num_negatives": 12, "negatives_window": 10},
         "teachers.bi.train: num_negatives 12 is more than the miner's top 10"),
        (("dpd", "num_negatives"), 50, "dpd: num_negatives (50) must be < rerank_depth (50)"),
    ],
)
def test_value_constraints(tmp_path, where, value, expected):
    data = recipe_dict()
    target = data
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    if where == ("teachers", "bi", "train"):
        del data["teachers"]["bi"]["model"]
    assert expected in error_of(tmp_path, data)


def test_teacher_negatives_window_default_and_field():
    train = parse_recipe(MINIMAL).teachers["ce"].train
    assert train.negatives_window == 30 and train.num_negatives == 7
    data = recipe_dict()
    data["teachers"]["ce"]["train"] |= {"num_negatives": 40, "negatives_window": 40}
    assert parse_recipe(data).teachers["ce"].train.negatives_window == 40


def test_unknown_teacher_in_stage(tmp_path):
    data = recipe_dict()
    data["stages"][2]["teacher"] = "ce2"
    assert "stages.2.teacher: unknown teacher 'ce2' (defined: bi, ce)" in error_of(tmp_path, data)


def test_distill_needs_teacher_and_warmup_refuses_one(tmp_path):
    data = recipe_dict()
    del data["stages"][1]["teacher"]
    data["stages"][0]["teacher"] = "bi"
    message = error_of(tmp_path, data)
    assert "stages.1.teacher: a distill stage needs a teacher" in message
    assert "stages.0.teacher: a warmup stage" in message


def test_in_batch_needs_bi_encoder_teacher(tmp_path):
    data = recipe_dict()
    data["stages"][2]["candidates"] = "in_batch"
    message = error_of(tmp_path, data)
    assert "stages.2.candidates: in_batch needs a bi-encoder teacher, 'ce' is a cross-encoder" in message


def test_in_batch_warmup_is_fine():
    data = recipe_dict()
    data["stages"][0]["candidates"] = "in_batch"
    assert parse_recipe(data).stages[0].candidates == "in_batch"


def test_teacher_with_both_model_and_train(tmp_path):
    data = recipe_dict()
    data["teachers"]["bi"]["train"] = {"backbone": "all-MiniLM-L6-v2"}
    message = error_of(tmp_path, data)
    assert "teachers.bi: give exactly one of `model`" in message and "got both" in message


def test_teacher_with_neither(tmp_path):
    data = recipe_dict()
    del data["teachers"]["bi"]["model"]
    assert "teachers.bi: give exactly one of `model`" in error_of(tmp_path, data)


def test_duplicate_stage_names(tmp_path):
    data = recipe_dict()
    data["stages"][2]["name"] = "bi"
    assert "stages.2.name: duplicate stage name 'bi' (also stages.1)" in error_of(tmp_path, data)


def test_miner_names(tmp_path):
    data = recipe_dict()
    data["stages"][1]["negatives"] = {"miner": "bi"}
    data["stages"][2]["negatives"] = {"miner": "sentence-transformers/msmarco-MiniLM-L6-cos-v5"}
    recipe = parse_recipe(data)  # a bi-encoder teacher, or any model path / id
    assert recipe.stages[2].negatives.miner.startswith("sentence-transformers/")
    data["stages"][1]["negatives"] = {"miner": "ce"}
    assert "stages.1.negatives.miner: 'ce' is a cross-encoder teacher" in error_of(tmp_path, data)


def test_negatives_from(tmp_path):
    data = recipe_dict()
    data["teachers"]["ce"]["train"]["negatives_from"] = "nope"
    assert "teachers.ce.train.negatives_from: unknown teacher 'nope'" in error_of(tmp_path, data)
    data["teachers"]["ce"]["train"]["negatives_from"] = "student"
    parse_recipe(data)
    data["teachers"]["bi"] = {"kind": "bi-encoder", "train": {"backbone": "x", "negatives_from": "ce"}}
    assert "teachers.bi.train.negatives_from: 'ce' is a cross-encoder" in error_of(tmp_path, data)


def test_reserved_teacher_name_and_cycles(tmp_path):
    data = recipe_dict()
    data["teachers"]["student"] = {"kind": "bi-encoder", "model": "x"}
    assert "teachers.student: the name 'student' is reserved" in error_of(tmp_path, data)
    data = recipe_dict()
    data["teachers"]["b2"] = {"kind": "bi-encoder", "train": {"backbone": "x", "negatives_from": "bi"}}
    data["teachers"]["bi"] = {"kind": "bi-encoder", "train": {"backbone": "x", "negatives_from": "b2"}}
    assert "teachers: negatives_from goes round in a circle (bi -> b2 -> bi)" in error_of(tmp_path, data)


def test_dpd_teacher_must_exist(tmp_path):
    message = error_of(tmp_path, recipe_dict(dpd={"teacher": "big"}))
    assert "dpd.teacher: unknown teacher 'big' (defined: bi, ce)" in message


def evaluate_only(**data) -> dict:
    return {"name": "dl19", "data": {"dataset": "wordnet-gloss", **data}, "student": {"init": "runs/x/student"},
            "stages": []}


def test_evaluate_only_recipe_needs_no_train_or_dev_split():
    recipe = parse_recipe(evaluate_only(train_split=None, dev_split=None))
    assert not recipe.trains and recipe.stages == [] and recipe.teachers == {} and recipe.dpd is None
    assert (recipe.data.train_split, recipe.data.dev_split, recipe.data.test_split) == (None, None, "test")
    assert parse_recipe(evaluate_only()).data.dev_split == "dev"  # a dev split may still be given
    assert parse_recipe(MINIMAL).trains


def test_null_splits_need_an_evaluate_only_recipe(tmp_path):
    data = recipe_dict()
    data["data"] |= {"train_split": None, "dev_split": None}
    message = error_of(tmp_path, data)
    assert "data.train_split: the stages train on it; null only in an evaluate-only recipe (stages: [], no dpd)" \
        in message
    assert "data.dev_split: every stage is measured on it; null only" in message
    # DPD alone trains too
    dpd_only = recipe_dict(stages=[])
    dpd_only["data"]["train_split"] = None
    assert "data.train_split: the stages train on it" in error_of(tmp_path, dpd_only)
    assert parse_recipe(recipe_dict(stages=[])).trains  # DPD alone, with its splits: fine


def test_stages_key_is_still_required(tmp_path):
    data = evaluate_only()
    del data["stages"]
    assert "stages: required key missing" in error_of(tmp_path, data)


# ------------------------------------------------------------------------------------------ file errors
def test_yaml_syntax_error_has_line(tmp_path):
    text = "name: broken\ndata:\n  dataset: wordnet-gloss\nstages: [\n  {name: a\n"
    message = error_of(tmp_path, text)
    assert "invalid YAML at line" in message


def test_yaml_syntax_error_line_number(tmp_path):
    text = "name: x\nseed: 1\ndata:\n  dataset: wordnet-gloss\n   bad: indent\n"
    message = error_of(tmp_path, text)
    assert "invalid YAML at line 5" in message


def test_duplicate_yaml_key(tmp_path):
    text = "name: x\nseed: 1\nseed: 2\n"
    message = error_of(tmp_path, text)
    assert "line 3" in message and "duplicate key 'seed' (first given at line 2)" in message


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("", "an empty file"), ("just text\n", "a str")])
def test_top_level_must_be_mapping(tmp_path, text, kind):
    message = error_of(tmp_path, text)
    assert "top level must be a mapping" in message and kind in message


def test_missing_file(tmp_path):
    with pytest.raises(ProdStError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(ProdStError, match="recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))


def test_unknown_embedded_name():
    with pytest.raises(ProdStError, match=r"recipe 'no-such-recipe' not found.*embedded: .*quickstart"):
        load_recipe("no-such-recipe")


def test_parse_recipe_direct():
    assert isinstance(parse_recipe(MINIMAL), Recipe)
    with pytest.raises(ProdStError, match="^my-source: "):
        parse_recipe(recipe_dict(seed="x"), source="my-source")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert (recipe.stages or path.stem.startswith("trec-dl19")) and recipe.eval.top_k >= 100


RECIPES = Path(__file__).parents[1] / "recipes"  # this checkout's (an embedded name may resolve elsewhere)


@pytest.mark.parametrize("kind", ["passage", "doc"])
def test_trec_dl19_recipes_evaluate_the_msmarco_student(kind):
    """DL19 is a test set: its recipes evaluate the student that the MS MARCO recipe trained, nothing more."""
    recipe, msmarco = load_recipe(RECIPES / f"trec-dl19-{kind}.yaml"), load_recipe(RECIPES / f"msmarco-{kind}.yaml")
    assert not recipe.trains and recipe.teachers == {} and recipe.dpd is None
    assert recipe.student.init == str(msmarco.run_dir() / "student")
    assert recipe.data.dataset == msmarco.data.dataset
    assert recipe.student.max_doc_length == msmarco.student.max_doc_length


# ------------------------------------------------------------------------------------------ embedded listing
def test_embedded_recipes_include_subfolders_and_summaries():
    from prod_st.recipe import embedded_recipe_file, recipe_summary

    names = embedded_recipes()
    assert {"quickstart", "msmarco-passage", "ablations/prod"} <= set(names)
    assert names.index("ablations/prod") > names.index("wordnet-full")  # top-level ones first
    assert load_recipe("ablations/prod").name == yaml.safe_load(embedded_recipe_file("ablations/prod").read_text())["name"]
    for name in names:
        summary = recipe_summary(name)
        assert summary and "\n" not in summary and len(summary) <= 110 and not summary.startswith(f"{name}:")
    assert recipe_summary("quickstart").startswith("PROD's whole schedule on a small slice of wordnet-gloss")
    assert embedded_recipe_file("../pyproject") is None and embedded_recipe_file("nope") is None


# ------------------------------------------------------------------------------------------ --set overrides
def test_overrides_set_fields_with_yaml_values(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["stages.1.lr=3e-5", "data.train_queries=2000", "stages.2.loss.reg_weight=0",
                                "eval.beir=[scifact, nfcorpus]", "publish.repo_id=me/mini", "dpd.rule.variant=nq"])
    assert recipe.stages[1].lr == 3e-5 and recipe.data.train_queries == 2000
    assert recipe.stages[2].loss.reg_weight == 0.0 and recipe.eval.beir == ["scifact", "nfcorpus"]
    assert recipe.publish.repo_id == "me/mini" and recipe.dpd.rule.variant == "nq"
    assert recipe.overrides[0] == "stages.1.lr=3e-5"
    assert recipe.run_yaml().startswith("# --set stages.1.lr=3e-5\n# --set data.train_queries=2000\n")
    assert yaml.safe_load(recipe.run_yaml()) == yaml.safe_load(recipe.resolved_yaml())
    plain = load_recipe(path)
    assert plain.overrides == [] and plain.run_yaml() == plain.resolved_yaml()
    assert load_recipe(path, ["seed=13"]).fingerprint() == plain.fingerprint()  # the default, spelled out


@pytest.mark.parametrize("override, message", [
    ("stages.1.lrr=1e-4", "with --set: stages.1.lrr: unknown key (did you mean 'lr'?)"),
    ("stages.1.lr=fast", "with --set: stages.1.lr: "),
    ("stages.1.batch_size=true", "stages.1.batch_size"),
    ("stages.7.lr=1e-4", "stages.7: stages is a list with 3 entries (0..2); give an existing index"),
    ("stages.first.lr=1e-4", "stages.first: stages is a list"),
    ("name.x=1", "name is a value ('mini'), not a section or list"),
    ("seed.x=1", "with --set: seed: Input should be a valid integer"),  # absent: made a section, then refused
    ("lr", "expected FIELD=VALUE"),
    ("stages..lr=1", "expected FIELD=VALUE"),
    ("eval.beir=[unclosed", "the value is not valid YAML"),
    ("training.precision=fp8", "training.precision: Input should be 'fp32', 'bf16', 'fp16' or 'auto'"),
])
def test_bad_overrides_are_one_line_naming_the_field(tmp_path, override, message):
    with pytest.raises(ProdStError) as info:
        load_recipe(write(tmp_path, MINIMAL), [override])
    assert message in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ training: block
# Recipe.fingerprint and every step fingerprint of MINIMAL as computed before the `training:` block existed
# (commit 9626e0d): a recipe without the block keeps the run folders it already has.
FINGERPRINT_BEFORE_TRAINING = "dc8e2ba38e8da40bbb4aad969326d18b"
STEPS_BEFORE_TRAINING = {
    "00-init": "6ab385afaa2fdb5cda59f2c0158fe960", "01-warmup": "40f93473dc289e5551ea82d6f2e0d9c4",
    "02-bi": "77e2abf67757c3e3f0747cb886906772", "03-ce": "6a643ab87fcdc1ad6f769650c4fb2e26",
    "04-dpd-1": "d523557a035eeb390f9a6a711a1e5061",
}
# issue 20: DPD's negatives are drawn afresh from the near-miss pool every epoch (`dpd.negatives: sample`, the
# default): the DPD step trains on other rows, so it (and the final evaluation) is redone; `hardest` keeps them
STEPS_SINCE_ISSUE_20 = STEPS_BEFORE_TRAINING | {"04-dpd-1": "0e77f71f59154700bb2f5ca0c9d622e5"}


def test_default_training_block_changes_no_fingerprint():
    from prod_st.run.run_folder import plan

    defaults = {"precision": "fp32", "gradient_accumulation_steps": 1, "dataloader_num_workers": "auto",
                "report_to": "none"}
    for data in (MINIMAL, recipe_dict(training={}), recipe_dict(training=defaults)):
        recipe = parse_recipe(data)
        assert recipe.fingerprint() == FINGERPRINT_BEFORE_TRAINING
        assert plan(recipe).steps == STEPS_SINCE_ISSUE_20 and plan(recipe).final == "6b4babe13f4854c990149ca86d6542c6"
        assert "training" not in recipe.resolved_yaml()
        hardest = parse_recipe(data | {"dpd": {"teacher": "ce", "negatives": "hardest"}})
        assert plan(hardest).steps == STEPS_BEFORE_TRAINING and plan(hardest).final == "e7391d25a04e00924e632ed352d8f39e"

    speed_only = parse_recipe(recipe_dict(training={"dataloader_num_workers": 4, "report_to": "tensorboard"}))
    assert plan(speed_only).steps == STEPS_SINCE_ISSUE_20  # recorded in recipe.yaml, no step redone
    assert "dataloader_num_workers: 4" in speed_only.resolved_yaml()
    for change in ({"precision": "bf16"}, {"gradient_accumulation_steps": 2}, {"tf32": False}):
        steps = plan(parse_recipe(recipe_dict(training=change))).steps
        assert steps["00-init"] == STEPS_SINCE_ISSUE_20["00-init"]  # the untrained student is not trained
        assert all(steps[k] != v for k, v in STEPS_SINCE_ISSUE_20.items() if k != "00-init")


def test_corpus_dtype_is_validated_and_changes_what_it_changes(tmp_path):
    from prod_st.run.run_folder import plan

    def with_dtype(dtype: str) -> dict:
        return recipe_dict(eval=MINIMAL.get("eval", {}) | {"corpus_dtype": dtype})

    full, half = parse_recipe(with_dtype("float32")), parse_recipe(with_dtype("float16"))
    assert plan(full).steps == STEPS_SINCE_ISSUE_20 and "corpus_dtype" not in full.resolved_yaml()  # the default
    assert half.eval.corpus_dtype == "float16" and "corpus_dtype: float16" in half.resolved_yaml()
    assert all(v != STEPS_SINCE_ISSUE_20[k] for k, v in plan(half).steps.items())  # dev evaluation and mining read it
    assert "eval.corpus_dtype: Input should be 'float32' or 'float16'" in error_of(tmp_path, with_dtype("int8"))


def test_search_and_index_train_size_keep_fingerprints_at_their_defaults(tmp_path):
    """`eval.search` changes how fast, not what, the search finds: no step is redone for it. `eval.index_train_size`
    changes what a trained index finds: every step that searches is redone; neither is written at its default."""
    from prod_st.run.run_folder import plan

    def with_eval(**fields) -> Recipe:
        return parse_recipe(recipe_dict(eval=MINIMAL.get("eval", {}) | fields))

    default = with_eval()
    assert plan(default).steps == STEPS_SINCE_ISSUE_20
    assert default.eval.search == "auto" and default.eval.index_train_size == 32768
    assert "search" not in default.resolved_yaml() and "index_train_size" not in default.resolved_yaml()
    for backend in ("torch", "faiss"):
        forced = with_eval(search=backend)
        assert f"search: {backend}" in forced.resolved_yaml()  # recorded in the run folder's recipe.yaml ...
        assert plan(forced) == plan(default)  # ... but nothing is redone
    bigger = with_eval(index="IVF16,Flat", index_train_size=65536)
    assert "index_train_size: 65536" in bigger.resolved_yaml()
    assert all(v != plan(with_eval(index="IVF16,Flat")).steps[k] for k, v in plan(bigger).steps.items())
    assert "eval: search: torch is exact search only (index Flat or SQfp16), not 'HNSW32'" in error_of(
        tmp_path, recipe_dict(eval={"index": "HNSW32", "search": "torch"}))
    assert "eval.search: Input should be 'auto', 'torch' or 'faiss'" in error_of(tmp_path, recipe_dict(
        eval={"search": "gpu"}))
    assert "eval.index_train_size" in error_of(tmp_path, recipe_dict(eval={"index_train_size": 0}))


def test_training_block_is_validated(tmp_path):
    recipe = parse_recipe(recipe_dict(training={"precision": "bf16", "report_to": ["tensorboard", "wandb"]}))
    assert recipe.training.precision == "bf16" and recipe.training.report_list() == ["tensorboard", "wandb"]
    assert "training.precision" in error_of(tmp_path, recipe_dict(training={"precision": "half"}))
    assert "training.gradient_accumulation_steps" in error_of(tmp_path, recipe_dict(
        training={"gradient_accumulation_steps": 0}))
    assert "training.report_to" in error_of(tmp_path, recipe_dict(training={"report_to": "tensorbord"}))
    assert "'none' and 'all' stand alone" in error_of(tmp_path, recipe_dict(training={"report_to": ["none", "wandb"]}))
    assert "training.workers: unknown key" in error_of(tmp_path, recipe_dict(training={"workers": 2}))


def test_preflight_checks_precision_and_loggers(monkeypatch):
    import prod_st.run.preflight as preflight

    monkeypatch.setattr(preflight, "gpu_visible", lambda: False)
    fp16 = parse_recipe(recipe_dict(training={"precision": "fp16"}))
    assert any(p.startswith("training.precision: fp16 needs a CUDA GPU") for p in preflight.check_recipe(fp16))
    bf16 = parse_recipe(recipe_dict(training={"precision": "bf16"}))
    assert not [p for p in preflight.check_recipe(bf16) if p.startswith("training")]
    monkeypatch.setattr(preflight, "gpu_visible", lambda: True)
    assert not [p for p in preflight.check_recipe(fp16) if p.startswith("training")]
    monkeypatch.setitem(preflight.REPORT_PACKAGES, "wandb", ("no_such_package_xyz",))
    logged = parse_recipe(recipe_dict(training={"report_to": "wandb"}))
    assert "training.report_to: 'wandb' needs the no_such_package_xyz package" in " ".join(preflight.check_recipe(logged))


def test_shipped_files_point_at_nothing_outside_the_repository():
    """Recipes, code, scripts, docs and the README name no file outside the repository (the notes a developer had
    beside it are not shipped): the facts are written where they are used."""
    root = Path(__file__).parents[1]
    files = [root / "README.md", *root.glob("recipes/**/*.yaml"), *root.glob("prod_st/**/*.py"),
             *root.glob("cli/**/*.py"), *root.glob("scripts/*.py"), *root.glob("docs/*.md"), *root.glob("tests/*.py")]
    outside = ("shared/", "CALIBRATION", "PROD.md", "DESIGN.md", "../")
    found = [f"{path.relative_to(root)}: {word}" for path in files for word in outside
             if word in path.read_text(encoding="utf-8") and path.name != "test_recipe.py"]
    assert found == []
def test_ensemble_teacher(tmp_path):
    data = recipe_dict()
    data["teachers"]["ens"] = {"kind": "ensemble", "members": {"bi": 0.5, "ce": 0.5}}
    data["stages"].append({"name": "ens", "kind": "distill", "teacher": "ens"})
    assert parse_recipe(data).teachers["ens"].members == {"bi": 0.5, "ce": 0.5}
    data["teachers"]["ens"]["members"] = {"bi": 0.5, "big": 0.5}
    assert "teachers.ens.members.big: unknown teacher 'big'" in error_of(tmp_path, data)
    data["teachers"]["ens"] = {"kind": "ensemble"}
    assert "teachers.ens: an ensemble teacher needs `members`" in error_of(tmp_path, data)
    data["teachers"]["ens"] = {"kind": "ensemble", "model": "x", "members": {"bi": 1.0}}
    assert "teachers.ens: an ensemble teacher takes `members`, not `model`" in error_of(tmp_path, data)
    data["teachers"]["ens"] = {"kind": "ensemble", "members": {"bi": 0.5, "ce": 0.5}}
    data["teachers"]["e2"] = {"kind": "ensemble", "members": {"ens": 1.0}}
    assert "teachers.e2.members.ens: an ensemble's members must be" in error_of(tmp_path, data)
    data = recipe_dict()
    data["teachers"]["bi"]["members"] = {"ce": 1.0}
    assert "teachers.bi: `members` is for kind: ensemble only" in error_of(tmp_path, data)
    data = recipe_dict()
    data["teachers"]["ens"] = {"kind": "ensemble", "members": {"bi": 1.0}}
    data["stages"][2]["candidates"] = "in_batch"
    data["stages"][2]["teacher"] = "ens"
    assert "in_batch needs a bi-encoder teacher, 'ens' is a ensemble" in error_of(tmp_path, data)


def test_drawn_subsets_change_every_fingerprint_whole_splits_none():
    """Issue 20 item 1: the seeded subsets are drawn one RNG per subset, so a recipe that draws one (of queries or
    corpus) trains and evaluates on other data than before: every step is redone. Whole splits are the same
    data: a recipe drawing no subset keeps its fingerprints."""
    from prod_st.run.run_folder import plan

    assert plan(parse_recipe(MINIMAL)).steps == STEPS_SINCE_ISSUE_20
    init_before = {"train_queries": "b1aec262af1b3d05c05f7625d31a0683", "test_queries": "9ee1d5d641393e919fcf7be1669dc9b0",
                   "corpus_size": "5c95f380c9ba1ae5cf19a965385b1a1b"}  # 00-init under the one-RNG draw
    for field, value in (("train_queries", 800), ("test_queries", 400), ("corpus_size", 4000)):
        assert plan(parse_recipe(recipe_dict(data={"dataset": "wordnet-gloss", field: value}))).steps["00-init"] not in (
            init_before[field], STEPS_SINCE_ISSUE_20["00-init"])
    assert "subsets" not in parse_recipe(recipe_dict(data={"dataset": "wordnet-gloss", "corpus_size": 9})).resolved_yaml()
