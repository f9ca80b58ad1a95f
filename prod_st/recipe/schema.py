"""The recipe schema: one pydantic model per block of a recipe (data, student, teachers, stages, DPD, eval,
output, publish, training, distributed) and `Recipe`, which checks their cross-references. Loading, `--set`
and error lines: `prod_st.recipe.loading`; the embedded recipes: `prod_st.recipe.catalogue`."""


from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    model_serializer,
    model_validator,
)

from prod_st.util.errors import ProdStError
from prod_st.util.hub import check_repo_id

STUDENT = "student"  # the reserved miner / negatives_from name: the current student
NAME_PATTERN = r"^[a-z0-9_-]+$"  # stage and teacher names (they become folder names)
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"  # the recipe name: the default run folder name


def _no_bool(value: Any) -> Any:
    # YAML turns `yes`/`no`/`true` into booleans, which pydantic's lax mode would accept as 1/0.
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# Integers are strict (no bools, no "3", no 2.0); floats are lax only so that YAML's `1e-5` (read by PyYAML
# as a string: YAML 1.1 wants a dot in the mantissa) still works, but booleans are refused.
Int = Annotated[int, Strict()]
PosInt = Annotated[int, Strict(), Field(ge=1)]
PosFloat = Annotated[float, BeforeValidator(_no_bool), Field(gt=0)]
NonNegFloat = Annotated[float, BeforeValidator(_no_bool), Field(ge=0)]
WarmupRatio = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, lt=1)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)


# ----------------------------------------------------------------------------------------------- sections
class Data(_Model):
    """The benchmark and the (seeded) subsets a quick recipe uses."""

    dataset: NonEmptyStr = Field(description="embedded name (wordnet-gloss), BEIR folder or BEIR name")
    train_split: Optional[NonEmptyStr] = Field("train", description="null only in an evaluate-only recipe")
    dev_split: Optional[NonEmptyStr] = Field(
        "dev", description="measured after every stage; null only in an evaluate-only recipe"
    )
    test_split: NonEmptyStr = "test"
    seed: Optional[Int] = Field(
        None, description="seed of the query and corpus subsets (None = the recipe's seed): fix it to vary only "
        "training across seeds, on the same data"
    )
    train_queries: Optional[PosInt] = Field(None, description="seeded subset of the training queries (None = all)")
    dev_queries: Optional[PosInt] = None
    test_queries: Optional[PosInt] = None
    corpus_size: Optional[PosInt] = Field(
        None, description="the evaluation slice: every document judged for the dev/test queries + seeded random ones "
        "up to this size; the training queries' judged documents are added to it (None = all)"
    )
    relevance_level: PosInt = Field(1, description="qrels grades >= this are relevant (TREC DL: 2)")
    positives: Literal["qrels", "answers"] = Field(
        "qrels", description="what makes a training passage relevant (positives, mined negatives, DPD ranks): "
        "the qrels, or for question answering (NQ) also any passage containing an answer string, as PROD and DPR"
    )
    test_relevance_level: Optional[PosInt] = Field(
        None, description="relevance level of the test split when it differs (TREC DL test, MS MARCO dev: 2 vs 1)"
    )


class Student(_Model):
    """The student dual encoder: the first `num_layers` layers of `init`."""

    init: NonEmptyStr = Field(description="path, run folder (its final student/), Hub id or packaged name")
    num_layers: Optional[PosInt] = Field(None, description="keep the first k layers (None = all)")
    pooling: Optional[Literal["cls", "mean"]] = Field(
        None, description="set the pooling (PROD: cls); None keeps the model's own"
    )
    similarity: Optional[Literal["dot", "cosine"]] = Field(
        None, description="set the similarity (PROD: dot, no normalisation); None keeps the model's own"
    )
    max_query_length: PosInt = Field(
        32, description="queries are cut at this many tokens wherever the student reads them (training, evaluation, "
        "mining, DPD); PROD: 32"
    )
    max_doc_length: PosInt = Field(144, description="documents are cut at this many tokens; PROD: 144 (passages)")


class TeacherTrain(_Model):
    """How prod-st trains a teacher from a backbone (PROD trains its own teachers on the training data).

    A bi-encoder is trained contrastively (in-batch + hard negatives), a cross-encoder with a listwise
    softmax cross-entropy over 1 positive + `num_negatives` hard negatives."""

    backbone: NonEmptyStr
    epochs: PosFloat = 1.0
    max_steps: Optional[PosInt] = Field(None, description="overrides epochs")
    lr: PosFloat = 2.0e-5
    batch_size: PosInt = 32
    num_negatives: PosInt = 7
    train_queries: Optional[PosInt] = Field(None, description="seeded subset of the training queries")
    max_length: Optional[PosInt] = Field(
        None, description="truncation while training: the (query, doc) pair for a cross-encoder, each text for "
        "a bi-encoder (None = the model's)"
    )
    seed: Optional[Int] = Field(
        None, description="seed of this teacher's training (query subset, negatives, head init); None = the recipe's"
    )
    negatives_from: Optional[NonEmptyStr] = Field(
        None, description="'student' or another bi-encoder teacher that mines the negatives (None = the backbone)"
    )
    negatives_window: PosInt = Field(
        30, description="the negatives are sampled from the miner's top this many (positives included)"
    )

    @model_validator(mode="after")
    def _window(self) -> TeacherTrain:
        if self.num_negatives > self.negatives_window:
            raise ValueError(
                f"num_negatives {self.num_negatives} is more than the miner's top {self.negatives_window} "
                "(negatives_window) it samples them from"
            )
        return self


class Teacher(_Model):
    """A teacher: pretrained (`model`) or trained by prod-st (`train`), exactly one of the two; or an
    `ensemble` of other teachers of the recipe (`members`: name -> weight; its logits are the weighted sum of
    theirs)."""

    kind: Literal["bi-encoder", "cross-encoder", "ensemble"]
    model: Optional[NonEmptyStr] = Field(None, description="pretrained path / Hub id / packaged name")
    train: Optional[TeacherTrain] = None
    members: Optional[dict[Name, PosFloat]] = Field(
        None, description="ensemble only: member teacher name -> weight (weights summing to 1 keep the scale)"
    )
    max_length: Optional[PosInt] = Field(None, description="scoring truncation (cross-encoder pair length)")
    batch_size: PosInt = Field(64, description="scoring batch size")

    @model_serializer(mode="wrap")
    def _omit_no_members(self, handler):
        """`members` is written only for an ensemble: other teachers dump (and fingerprint) as before it existed."""
        return omit_at_default(handler(self), self, "members")

    @model_validator(mode="after")
    def _model_or_train(self) -> Teacher:
        if self.kind == "ensemble":
            if self.model is not None or self.train is not None:
                raise ValueError("an ensemble teacher takes `members`, not `model` or `train`")
            if not self.members:
                raise ValueError("an ensemble teacher needs `members`: teacher name -> weight, e.g. {bi: 0.5, ce: 0.5}")
            return self
        if self.members is not None:
            raise ValueError(f"`members` is for kind: ensemble only (this teacher is a {self.kind})")
        if (self.model is None) == (self.train is None):
            got = "both" if self.model is not None else "neither"
            raise ValueError(
                f"give exactly one of `model` (a pretrained teacher) or `train` (a training spec), got {got}"
            )
        return self


class Negatives(_Model):
    """Hard negatives, refreshed before each stage: `count` of the miner's 1-based ranks `start..end`
    (positives removed), sampled or hardest first."""

    miner: NonEmptyStr = Field(
        STUDENT, description="'student' (the current student), a bi-encoder teacher's name, or a model path/id"
    )
    start: PosInt = 1
    end: PosInt = 100
    count: PosInt = 15
    strategy: Literal["sample", "hardest"] = "sample"

    @model_validator(mode="after")
    def _window(self) -> Negatives:
        if self.start > self.end:
            raise ValueError(f"the rank window needs start <= end, got start {self.start} > end {self.end}")
        if self.count > self.end - self.start + 1:
            raise ValueError(
                f"count {self.count} is more than the {self.end - self.start + 1} ranks of the window "
                f"{self.start}..{self.end}"
            )
        return self


class Loss(_Model):
    """L = hard_weight * L_hard + kd_weight * T^2 KL(teacher || student) + reg_weight * T^2 KL(frozen || student).

    A warm-up stage ignores this block: it trains on L_hard alone."""

    temperature: PosFloat = 4.0
    hard_weight: NonNegFloat = 0.1
    kd_weight: NonNegFloat = 0.9
    reg_weight: NonNegFloat = Field(
        0.0, description="left out: 1.0 (PROD's) in a list-candidates distill stage and in DPD, 0.0 elsewhere (PROD's "
        "stage 1 has no regulariser)"
    )


PROD_REG_WEIGHT = 1.0  # PROD's regulariser weight in its cross-encoder stages and DPD (list candidates)


def prod_regulariser(loss: Loss) -> Loss:
    """`loss` with PROD's `reg_weight` when the recipe left it out: a list-candidates stage (PROD's cross-encoder
    stages) or DPD without it would otherwise train with no regulariser at all. Given explicitly (0 included), it
    is kept. A copy, so a Loss shared between stages is never changed under another one."""
    if "reg_weight" in loss.model_fields_set:
        return loss
    return loss.model_copy(update={"reg_weight": PROD_REG_WEIGHT})


class Stage(_Model):
    """One step of the schedule. `warmup`: contrastive training on the hard loss only, no teacher (the loss
    block is ignored). `distill`: PROD's loss against `teacher`."""

    name: Name
    kind: Literal["warmup", "distill"] = "distill"
    teacher: Optional[NonEmptyStr] = Field(None, description="required for distill, forbidden for warmup")
    candidates: Literal["list", "in_batch"] = Field(
        "list", description="list: the query's positive + its negatives; in_batch: every passage of the batch"
    )
    negatives: Negatives = Field(default_factory=Negatives)
    loss: Loss = Field(default_factory=Loss)
    lr: PosFloat = 5.0e-5
    epochs: PosFloat = 1.0
    max_steps: Optional[PosInt] = Field(None, description="overrides epochs")
    batch_size: PosInt = 64
    warmup_ratio: WarmupRatio = 0.1

    @model_validator(mode="after")
    def _prod_regulariser(self) -> Stage:
        if self.kind == "distill" and self.candidates == "list":
            self.loss = prod_regulariser(self.loss)
        return self


class DPDRule(_Model):
    """Keep a training query when the student's first relevant document is at rank student_min..student_max
    and the teacher ranks a relevant one within teacher_max (nq: better than the student, <= student_max)."""

    student_min: PosInt = 2
    student_max: PosInt = 15
    teacher_max: PosInt = 1
    variant: Literal["msmarco", "nq"] = "msmarco"

    @model_validator(mode="after")
    def _order(self) -> DPDRule:
        if self.student_min > self.student_max:
            raise ValueError(f"student_min ({self.student_min}) must be <= student_max ({self.student_max})")
        return self


class DPD(_Model):
    """Data progressive distillation: `rounds` rounds of re-selecting near-miss queries and distilling on them."""

    rounds: PosInt = 1
    teacher: NonEmptyStr
    rerank_depth: PosInt = Field(50, description="the student's top-k reranked by the teacher")
    rule: DPDRule = Field(default_factory=DPDRule)
    num_negatives: PosInt = Field(15, description="negatives per kept query, from its near-miss pool (the student's "
                                  "top rerank_depth without the relevant documents)")
    negatives: Literal["sample", "hardest"] = Field(
        "sample", description="sample: num_negatives drawn afresh from the pool every epoch, as PROD's release "
        "reads them; hardest: the pool's first num_negatives in rank order, the same every epoch (before issue 20)"
    )
    loss: Loss = Field(default_factory=lambda: Loss(reg_weight=PROD_REG_WEIGHT), description="reg_weight left out: 1.0")
    lr: PosFloat = 1.0e-5
    epochs: PosFloat = 1.0
    max_steps: Optional[PosInt] = Field(None, description="overrides epochs")
    batch_size: PosInt = 64
    warmup_ratio: WarmupRatio = 0.1

    @model_serializer(mode="wrap")
    def _omit_default_negatives(self, handler):
        """`negatives` is written only when not at its default: recipes dump as before it existed (the DPD step's
        fingerprint counts it: `prod_st.run.run_folder.plan`)."""
        return omit_at_default(handler(self), self, "negatives")

    @model_validator(mode="after")
    def _depth(self) -> DPD:
        self.loss = prod_regulariser(self.loss)
        if self.rerank_depth < self.rule.student_max:
            raise ValueError(
                f"rerank_depth ({self.rerank_depth}) must be >= rule.student_max ({self.rule.student_max}): the "
                "teacher must see every near miss the rule can keep"
            )
        if self.num_negatives >= self.rerank_depth:
            raise ValueError(
                f"num_negatives ({self.num_negatives}) must be < rerank_depth ({self.rerank_depth}): the negatives "
                "are the student's top rerank_depth without the relevant document(s)"
            )
        return self


def omit_at_default(data, model: BaseModel, *names: str):
    """`data` (the dump of `model`) without the fields `names` where `model` has them at their defaults: a field
    added to the recipe later leaves the dumps, and so the step fingerprints, of recipes that do not set it as
    they were before it existed."""
    if isinstance(data, dict):
        for name in names:
            if getattr(model, name) == type(model).model_fields[name].get_default(call_default_factory=True):
                data.pop(name, None)
    return data


EXACT_INDEXES = ("Flat", "SQfp16")  # the exact indexes torch can search (prod_st.retrieval.exact_search.EXACT)


class Evaluation(_Model):
    top_k: PosInt = 1000
    index: NonEmptyStr = Field("Flat", description="faiss index factory string")
    corpus_dtype: Literal["float32", "float16"] = Field(
        "float32", description="the corpus embeddings cached per checkpoint (float16: half the disk and memory; "
        "with index: SQfp16 the index is float16 too)"
    )
    index_train_size: PosInt = Field(
        32768, description="vectors a trained index (IVF, PQ) learns from, drawn at random across the corpus: at "
        "least 39 per centroid (IVF65536 needs 2555904; `prod-st validate` checks it)"
    )
    search: Literal["auto", "torch", "faiss"] = Field(
        "auto", description="auto: exact search (index Flat or SQfp16) with torch on a GPU, faiss otherwise; torch "
        "(also on CPU) or faiss to force one. Same top-k either way (ties aside): not part of any fingerprint"
    )
    batch_size: PosInt = 64
    teacher_rerank_depth: PosInt = Field(
        50, description="dev: teachers rerank the student's top-k (teacher strength for a cross-encoder, and the gap)"
    )
    beir: list[NonEmptyStr] = Field(default_factory=list, description="BEIR names or folders, zero-shot at the end")
    metric: Literal[
        "nDCG@10", "MRR@10", "R@10", "R@50", "R@100", "R@1000", "MAP@1000", "Acc@5", "Acc@20", "Acc@100"
    ] = Field("nDCG@10", description="the dev metric that compares teachers with students (warnings, plot)")

    @model_serializer(mode="wrap")
    def _omit_default_dtype(self, handler):
        """`corpus_dtype`, `index_train_size` and `search` are written only when not at their defaults: recipes
        dump (and fingerprint) as before they existed."""
        return omit_at_default(handler(self), self, "corpus_dtype", "index_train_size", "search")

    @model_validator(mode="after")
    def _torch_is_exact(self) -> Evaluation:
        if self.search == "torch" and self.index not in EXACT_INDEXES:
            raise ValueError(f"search: torch is exact search only (index {' or '.join(EXACT_INDEXES)}), not "
                             f"{self.index!r}: use search: auto or faiss")
        return self


class Output(_Model):
    dir: Optional[Path] = Field(None, description="the run folder (None = runs/<name>)")


def _hub_repo_id(value: str) -> str:
    """huggingface_hub's own check of a repository id (`user/name`), as a validation error."""
    try:
        return check_repo_id(value)
    except ProdStError as e:
        raise ValueError(str(e)) from None


class Publish(_Model):
    """Push the final student to the Hugging Face Hub at the end of a run (`prod-st push` does it later)."""

    repo_id: Annotated[str, AfterValidator(_hub_repo_id)]
    private: bool = False
    exist_ok: bool = False
    dry_run: bool = Field(False, description="only write the upload folder (<run>/hub-upload/)")


# Integrations transformers' `report_to` knows (prod-st checks the package of the common ones before a run).
REPORT_TO = ("none", "all", "tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "neptune", "dvclive",
             "codecarbon", "azure_ml", "dagshub", "flyte", "swanlab", "trackio")
ReportTo = Literal[REPORT_TO]  # type: ignore[valid-type]


class Training(_Model):
    """Trainer settings for every student stage and DPD round (SentenceTransformerTrainingArguments), and the
    precision teachers score in. The defaults train as a recipe without this block did."""

    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="student and teacher training (the trainer's bf16 / fp16 mixed precision) and teacher "
        "scoring (torch.autocast; cached scores and trained teachers are kept per precision); fp16 needs a GPU, "
        "bf16 also runs on CPU; auto = bf16 where the hardware has it natively (a bf16 GPU, a CPU with AMX or "
        "AVX512-BF16), else fp32. Evaluation always encodes in fp32"
    )
    tf32: bool = Field(
        True, description="on a CUDA GPU, fp32 matrix products in TF32 (what stays fp32: evaluation encodings, fp32 "
        "training): about 2x faster on Ampere and later; false keeps full fp32. No effect on CPU"
    )
    gradient_accumulation_steps: PosInt = Field(
        1, description="batches per optimizer step: the stage's batch_size x this rows per step (in-batch "
        "candidates still come from one batch of batch_size)"
    )
    dataloader_num_workers: Union[Annotated[int, Strict(), Field(ge=0)], Literal["auto"]] = Field(
        "auto", description="processes that tokenise and collate the next batches while the student trains; auto = "
        "up to 4 per process on a GPU (its share of the cores less one), 0 on the CPU"
    )
    report_to: Union[ReportTo, list[ReportTo]] = Field(  # type: ignore[valid-type]
        "none", description="where the trainer logs: none, tensorboard, wandb, ... (a list for several)"
    )

    @model_validator(mode="after")
    def _none_alone(self) -> Training:
        if isinstance(self.report_to, list) and len(self.report_to) > 1 and {"none", "all"} & set(self.report_to):
            raise ValueError("report_to: 'none' and 'all' stand alone, not in a list with others")
        return self

    def report_list(self) -> list[str]:
        return list(self.report_to) if isinstance(self.report_to, list) else [self.report_to]

    def results_key(self) -> dict:
        """The fields that change what training computes, where they differ from the defaults ({} = as before);
        `auto` precision as this machine resolves it (so a run resumed on other hardware is not mixed)."""
        from prod_st.util.precision import resolve_precision

        values = {k: getattr(self, k) for k in TRAINING_RESULTS}
        if values["precision"] == "auto":
            values["precision"] = resolve_precision("auto")
        return {k: v for k, v in values.items() if v != Training.model_fields[k].default}


# Training fields that change what a step computes (the others only change speed or where logs go): a step's
# fingerprint includes them when they differ from the default.
TRAINING_RESULTS = ("precision", "gradient_accumulation_steps", "tf32")

class Distributed(_Model):
    """Runs under torchrun / accelerate launch."""

    timeout_minutes: PosFloat = Field(
        180.0, description="how long a rank may wait for the others (process-group timeout; NCCL's default is 10)"
    )


# ----------------------------------------------------------------------------------------------- recipe
class Recipe(_Model):
    name: Annotated[str, Field(pattern=RUN_NAME_PATTERN)]
    seed: Int = 13
    data: Data
    student: Student
    teachers: dict[Name, Teacher] = Field(default_factory=dict)
    stages: list[Stage] = Field(description="the schedule; empty (and no dpd): only evaluate the student")
    dpd: Optional[DPD] = None
    eval: Evaluation = Field(default_factory=Evaluation)
    output: Output = Field(default_factory=Output)
    publish: Optional[Publish] = None
    training: Training = Field(default_factory=Training)

    _overrides: list[str] = PrivateAttr(default_factory=list)

    @model_serializer(mode="wrap")
    def _omit_default_training(self, handler):
        """A `training:` or `distributed:` block left at its defaults is not written out: a recipe that never had
        one dumps (and fingerprints) exactly as before the blocks existed."""
        return omit_at_default(handler(self), self, "training", "distributed")

    @property
    def overrides(self) -> list[str]:
        """The `--set FIELD=VALUE` overrides applied when the recipe was loaded (empty for a plain file)."""
        return list(self._overrides)
    distributed: Distributed = Field(default_factory=lambda: Distributed())

    @model_validator(mode="after")
    def _cross_references(self) -> Recipe:
        problems = self._problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _problems(self) -> list[str]:
        problems: list[str] = []
        defined = ", ".join(self.teachers) if self.teachers else "none"

        def unknown(path: str, name: str) -> None:
            problems.append(f"{path}: unknown teacher {name!r} (defined: {defined})")

        if STUDENT in self.teachers:
            problems.append(f"teachers.{STUDENT}: the name {STUDENT!r} is reserved for the student")

        for name, teacher in self.teachers.items():
            source = teacher.train.negatives_from if teacher.train else None
            path = f"teachers.{name}.train.negatives_from"
            if source is None or source == STUDENT:
                continue
            if source == name:
                problems.append(f"{path}: a teacher cannot mine its own training negatives")
            elif source not in self.teachers:
                unknown(path, source)
            elif self.teachers[source].kind != "bi-encoder":
                problems.append(f"{path}: {source!r} is a {self.teachers[source].kind}; only a bi-encoder or 'student' "
                                "can mine")
        for name, teacher in self.teachers.items():
            for member in teacher.members or {}:
                path = f"teachers.{name}.members.{member}"
                if member not in self.teachers:
                    unknown(path, member)
                elif self.teachers[member].kind == "ensemble":
                    problems.append(f"{path}: an ensemble's members must be bi-encoder or cross-encoder teachers")
        cycle = None if problems else self._negatives_from_cycle()
        if cycle:
            problems.append(f"teachers: negatives_from goes round in a circle ({' -> '.join(cycle)})")

        seen: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            path = f"stages.{i}"
            if stage.name in seen:
                problems.append(f"{path}.name: duplicate stage name {stage.name!r} (also stages.{seen[stage.name]})")
            seen.setdefault(stage.name, i)
            teacher = None
            if stage.kind == "warmup":
                if stage.teacher is not None:
                    problems.append(f"{path}.teacher: a warmup stage trains on the hard loss only and takes no "
                                    f"teacher (got {stage.teacher!r}); use kind: distill")
            elif stage.teacher is None:
                problems.append(f"{path}.teacher: a distill stage needs a teacher (defined: {defined})")
            elif stage.teacher not in self.teachers:
                unknown(f"{path}.teacher", stage.teacher)
            else:
                teacher = self.teachers[stage.teacher]
            if stage.kind == "distill" and teacher is not None and stage.candidates == "in_batch" \
                    and teacher.kind != "bi-encoder":
                problems.append(f"{path}.candidates: in_batch needs a bi-encoder teacher, {stage.teacher!r} is a "
                                f"{teacher.kind} (use candidates: list)")
            miner = stage.negatives.miner
            if miner in self.teachers and self.teachers[miner].kind != "bi-encoder":
                problems.append(f"{path}.negatives.miner: {miner!r} is a {self.teachers[miner].kind} teacher; only 'student', a "
                                "bi-encoder teacher or a bi-encoder model path/id can mine negatives")

        if self.dpd is not None and self.dpd.teacher not in self.teachers:
            unknown("dpd.teacher", self.dpd.teacher)
        if self.trains:
            needs = (("train_split", "the stages train on it"), ("dev_split", "every stage is measured on it"))
            for split, why in needs:
                if getattr(self.data, split) is None:
                    problems.append(f"data.{split}: {why}; null only in an evaluate-only recipe (stages: [], no dpd)")
        return problems

    @property
    def trains(self) -> bool:
        """False for an evaluate-only recipe (no stages, no DPD): it builds the student and tests it."""
        return bool(self.stages) or self.dpd is not None

    def _negatives_from_cycle(self) -> list[str] | None:
        for start in self.teachers:
            chain = [start]
            current = start
            while True:
                train = self.teachers[current].train
                nxt = train.negatives_from if train else None
                if nxt is None or nxt == STUDENT or nxt not in self.teachers or nxt == current:
                    break
                if nxt in chain:
                    return chain[chain.index(nxt):] + [nxt]
                chain.append(nxt)
                current = nxt
        return None

    # ------------------------------------------------------------------------------------------- helpers
    def resolved_yaml(self) -> str:
        """The recipe with every default filled in, keys in schema order (what a run folder stores)."""
        return yaml.safe_dump(
            self.model_dump(mode="json"), sort_keys=False, default_flow_style=False, allow_unicode=True, width=120
        )

    def run_yaml(self) -> str:
        """What a run folder's recipe.yaml holds: :meth:`resolved_yaml`, after a comment naming the `--set`
        overrides when there were any (their values are in the YAML itself)."""
        header = "".join(f"# --set {o}\n" for o in self._overrides)
        return header + self.resolved_yaml()

    def fingerprint(self) -> str:
        """A hash of :meth:`resolved_yaml` (32 hex characters): two recipes that would run the same match."""
        return hashlib.sha256(self.resolved_yaml().encode("utf-8")).hexdigest()[:32]

    def run_dir(self, override: Path | str | None = None) -> Path:
        """The run folder: `override` if given, else `output.dir`, else `runs/<name>` (relative to the cwd)."""
        if override is not None:
            return Path(override).expanduser()
        if self.output.dir is not None:
            return self.output.dir.expanduser()
        return Path("runs") / self.name
