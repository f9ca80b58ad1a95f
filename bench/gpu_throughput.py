"""MS MARCO-shaped throughput of prod-st's own code paths (issue 19): corpus encoding, cross-encoder teacher
scoring and student training steps, with random-init models of recipes/msmarco-passage.yaml's shapes (6-layer 768
student, 12 x 768 and 24 x 1024 cross-encoders) on synthetic texts of MS MARCO length (passages ~75 WordPiece
tokens, queries ~9), built from BertConfigs with the packaged all-MiniLM-L6-v2's tokenizer: nothing is downloaded.

    python bench/gpu_throughput.py --size full --out bench/out/gpu_throughput.json    # on a GPU (a few minutes)
    python bench/gpu_throughput.py --size small --device cpu --threads 1 --out /tmp/tp.json  # tiny, CPU, ~10 s
    python bench/gpu_throughput.py --size host --device cpu --profile 15 --out /tmp/host.json  # CPU, ~40 s

host mode: the full texts, batch sizes and counts of full mode through one-layer 32-wide models, so that the rates
are (nearly) what the host allows: tokenising, collating, dispatching; a GPU cannot go faster than its host feeds
it. --profile N records each measurement's N functions with the most own time on the main thread (cProfile);
batch_wait_ms is, per training step, the main thread's wait for its next batch (tokenising and collating unless
dataloader workers did it ahead): time in which a GPU has nothing to do. --host-workers N takes prod-st's GPU
paths on any device (inference by prod_st.util.batched_inference.run_batches, training with N dataloader workers;
`off`: the paths before issue 19, sentence-transformers' own loops, also on a GPU);
--length-buckets N sets PRODLoss.length_buckets (1: one merged pass padded to the longest candidate, as before
issue 19); --only KEY runs the measurements whose key contains KEY; --steps N overrides the timed steps.

What each rate runs (the functions a run calls, with the recipe's lengths and batch sizes):
- encode_{fp32,bf16,tf32}_docs_per_s: `corpus_embeddings` (init, every dev evaluation, mining), eval batch 512,
  float16 blocks; bf16 under `precision_context` (how a bi-encoder teacher encodes); tf32 (CUDA only) with
  torch.set_float32_matmul_precision("high"): what a run's fp32 evaluation gets from `training.tf32` (default on;
  the bench's other fp32 rows run with TF32 off, torch's default).
- ce{12,24}_{bf16,fp32}_pairs_per_s: `CrossEncoderTeacher.score` (cold cache, 16 candidates per query).
- train_{list_x8,list,inbatch}_{bf16,fp32}_steps_per_s: `train_stage` (the runner's call, through
  `train_student` and its SentenceTransformerTrainer) with `PRODLoss.for_stage` of the ce12 / de stage on
  `labelled_dataset` rows: list = 1 positive + 15 negatives with precomputed teacher and stage-start scores, batch
  64 (list_x8: PROD's global batch on one device) and 8 (the recipe's per device); inbatch = 1 negative with
  teacher embeddings, batch 16 (per device); meta.train_batch says which batches ran (small mode: smaller). Each
  optimizer step is timed after a CUDA sync, warm-up steps left out; checkpoint saving is off while timing.
  Training runs where prod-st's trainer puts it (the GPU whenever one is visible): meta.train_device.

FLOP shares (GPU only; --peak-tflops, default 790: an H200's dense bf16 limit, ~990 for an H100 SXM): useful FLOPs
per item are APPROXIMATED as 2 x P x T for a forward pass and 6 x P x T for a training step, where P counts the
model's parameters outside its embeddings and T the mean unpadded tokens of an item after truncation (attention's
own T^2 term and padding are not counted). The share is rate x FLOPs per item / peak, against the bf16 limit
for every precision.

The projection is arithmetic, not a measurement: the msmarco-passage schedule's GPU-hours on 8 GPUs as written
(per-device batches) from these rates, GPU work only (faiss-cpu search, query encodings and teacher reranks of
dev/test are not counted); the idea of ../shared/gpu-check/projection.py, much simplified.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import math
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from harness import Timer, write_json

# (hidden, layers, heads, intermediate); host: one-layer 32-wide models, so that what is timed is the host's share
TINY = (32, 1, 2, 64)
SHAPES = {"full": {"student": (768, 6, 12, 3072), "ce12": (768, 12, 12, 3072), "ce24": (1024, 24, 16, 4096)},
          "small": {"student": (32, 2, 2, 64), "ce12": (32, 2, 2, 64), "ce24": (32, 3, 2, 64)},
          "host": {"student": TINY, "ce12": TINY, "ce24": TINY}}
# Text lengths in tokens (mean, sd, clip low, high): MS MARCO's (assumed) in full, short ones in small. Training
# batches: None = the recipe's (list_x8: the ce12 stage's per-device 8 x 8 GPUs, PROD's global 64, on one device;
# list: the per-device 8; inbatch: the de stage's per-device 16); small mode's own otherwise.
SIZES = {"full": {"docs": 30_000, "warm_docs": 2048, "ce12_bf16": 16_000, "ce12_fp32": 8_000, "ce24_bf16": 8_000,
                  "ce24_fp32": 3_000, "warm_steps": 3, "steps": 30, "big_steps": 12,
                  "doc_len": (75, 28, 12, 220), "query_len": (9, 3, 3, 32), "batches": None},
         "small": {"docs": 48, "warm_docs": 8, "ce12_bf16": 32, "ce12_fp32": 32, "ce24_bf16": 32, "ce24_fp32": 32,
                   "warm_steps": 1, "steps": 2, "big_steps": 2,
                   "doc_len": (16, 4, 8, 24), "query_len": (6, 2, 3, 10),
                   "batches": {"list_x8": 8, "list": 2, "inbatch": 4}, "eval_batch": 8},
         # full texts and batches through tiny models: the rates a host (tokenising, collating, dispatching) allows
         "host": {"docs": 8192, "warm_docs": 1024, "ce12_bf16": 4096, "ce12_fp32": 4096, "ce24_bf16": 2048,
                  "ce24_fp32": 2048, "warm_steps": 2, "steps": 12, "big_steps": 6,
                  "doc_len": (75, 28, 12, 220), "query_len": (9, 3, 3, 32), "batches": None}}
PER_QUERY = 16  # candidates per query in the cross-encoder stages: 1 positive + 15 negatives
# msmarco-passage's sizes, for the projection
D, Q, GPUS = 8_841_823, 502_939, 8  # passages, judged training queries, GPUs the recipe's batches are written for
DPD_ASKED = 0.45  # ASSUMED share of training queries whose positive the student ranks 2..15 (DPD asks the teacher)


def flops_per_item(params: int, tokens: float, train: bool = False) -> float:
    """Approximate useful FLOPs of one item: 2 x params x tokens forward, 6 x for a training step."""
    return (6 if train else 2) * params * tokens


def peak_share(rate: float, flops: float, peak_tflops: float) -> float:
    """Share of a `peak_tflops` FLOP/s limit that `rate` items/s of `flops` FLOPs each use."""
    return rate * flops / (peak_tflops * 1e12)


def top_functions(profiler: cProfile.Profile, n: int) -> list[str]:
    """The `n` functions with the most own time: "own s | with callees s | calls | function (file:line)"."""
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [f"{tt:8.3f} | {ct:8.3f} | {nc:7d} | {func} ({Path(file).name}:{line})"
            for (file, line, func), (_, nc, tt, ct, _) in rows]


def dense_params(model: torch.nn.Module) -> int:
    """Parameters outside the embedding tables (what matmuls touch per token)."""
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Texts:
    """Synthetic MS MARCO-length texts: random whole-word WordPiece vocabulary entries (one token each), so a text
    of n words is n + 2 tokens with [CLS] and [SEP]."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.words = np.array([w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and w.islower()
                               and len(w) > 2], dtype=object)
        self.rng = np.random.default_rng(seed)

    def make(self, n: int, spec) -> list[str]:
        mean, sd, low, high = spec
        lengths = np.clip(self.rng.normal(mean, sd, n), low, high).astype(int) - 2
        return [" ".join(self.words[self.rng.integers(0, len(self.words), k)]) for k in lengths]


def bert_folder(folder: Path, shape, tokenizer, device: str, classifier: bool = False) -> Path:
    """A random-init BERT (or 1-logit BertForSequenceClassification) of `shape` with `tokenizer`, saved."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    hidden, layers, heads, inter = shape
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=inter, max_position_embeddings=512,
                        **({"num_labels": 1} if classifier else {}))
    with torch.device(device):  # random init on the GPU is fast
        model = (BertForSequenceClassification if classifier else BertModel)(config)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


class Bench:
    def __init__(self, args, work: Path) -> None:
        from transformers import AutoTokenizer

        from prod_st.recipe import load_recipe
        from prod_st.util.models import resolve_model_path

        self.args, self.work, self.device = args, work, args.device
        self.recipe = load_recipe("msmarco-passage")
        self.sizes, self.shapes = dict(SIZES[args.size]), SHAPES[args.size]
        if args.steps:
            self.sizes.update(steps=args.steps, big_steps=args.steps)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
        self.texts = Texts(self.tokenizer)
        self.doc_len, self.query_len = self.sizes["doc_len"], self.sizes["query_len"]
        self.out = {"meta": {"size": args.size, "device": self.device_name(), "torch": torch.__version__,
                             "cpu_threads": torch.get_num_threads(), "peak_tflops": args.peak_tflops,
                             "shapes": self.shapes, "sizes": self.sizes},
                    "rates": {}, "flop_per_item": {}, "peak_share": {}, "seconds": {}, "errors": {}}
        self.tokens = self.token_means()
        self.out["meta"]["tokens"] = {k: round(v, 1) for k, v in self.tokens.items()}

    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.device.startswith("cuda") else "cpu"

    def token_means(self) -> dict[str, float]:
        """Mean tokens of a sample of docs, queries and (query, doc) pairs after the recipe's truncation."""
        s, ce = self.recipe.student, self.recipe.teachers["ce12"]
        count = lambda texts: np.array([len(ids) for ids in self.tokenizer(texts)["input_ids"]])
        docs, queries = count(self.texts.make(500, self.doc_len)), count(self.texts.make(500, self.query_len))
        return {"doc": float(np.minimum(docs, s.max_doc_length).mean()),
                "query": float(np.minimum(queries, s.max_query_length).mean()),
                "pair": float(np.minimum(queries + docs - 1, ce.max_length).mean())}

    def record(self, key: str, rate: float, flops: float) -> None:
        self.out["rates"][key] = round(rate, 3)
        self.out["flop_per_item"][key] = flops
        gpu = self.device.startswith("cuda")
        self.out["peak_share"][key] = round(peak_share(rate, flops, self.args.peak_tflops), 4) if gpu else None
        print(f"{key:36s} {rate:12,.2f}" + (f"   {self.out['peak_share'][key]:.1%} of peak" if gpu else ""),
              flush=True)

    def measure(self, key: str, fn) -> None:
        """Run one measurement; an error is recorded (and printed) and the next one runs. With --profile, the main
        thread's top functions by own time go into out["profile"][key]."""
        profiler = cProfile.Profile() if self.args.profile else None
        with Timer() as t:
            try:
                if profiler:
                    profiler.runcall(fn)
                else:
                    fn()
            except Exception as e:  # noqa: BLE001
                self.out["errors"][key] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
                print(f"{key}: ERROR {self.out['errors'][key]}", file=sys.stderr, flush=True)
        self.out["seconds"][key] = round(t.seconds, 1)
        if profiler:
            self.out.setdefault("profile", {})[key] = top_functions(profiler, self.args.profile)

    # ---- models ----------------------------------------------------------------------------------------------
    def build_student(self):
        """The recipe's student as the runner builds it (build_student, set_lengths) from a random-init BERT."""
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

        from prod_st.util.models import build_student, set_lengths

        s = self.recipe.student
        folder = bert_folder(self.work / "student", self.shapes["student"], self.tokenizer, self.device)
        transformer = Transformer(str(folder))
        base = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())])
        student = build_student(base, self.shapes["student"][1], pooling=s.pooling, similarity=s.similarity)
        set_lengths(student, s.max_query_length, s.max_doc_length)
        self.student = student.to(self.device)
        self.out["meta"]["student_params"] = self.student_params = dense_params(self.student)

    # ---- corpus encoding -------------------------------------------------------------------------------------
    def encode(self, precision: str) -> None:
        import datasets

        from prod_st.retrieval.corpus_index import corpus_embeddings
        from prod_st.retrieval.encoding import encode_texts
        from prod_st.teachers.base import precision_context

        docs = self.texts.make(self.sizes["docs"], self.doc_len)  # fresh texts: never in the corpus cache
        corpus = datasets.Dataset.from_dict({"_id": [str(i) for i in range(len(docs))], "title": [""] * len(docs),
                                             "text": docs})
        batch = self.sizes.get("eval_batch", self.recipe.eval.batch_size)  # small: several batches, as in full
        dtype = self.recipe.eval.corpus_dtype
        before = torch.get_float32_matmul_precision()
        with precision_context("bf16" if precision == "bf16" else "fp32", self.device):
            try:
                if precision == "tf32":
                    torch.set_float32_matmul_precision("high")
                encode_texts(self.student, self.texts.make(self.sizes["warm_docs"], self.doc_len), "document", batch)
                sync(self.device)
                with Timer() as t:
                    corpus_embeddings(self.student, corpus, batch_size=batch, dtype=dtype, progress=False)
                    sync(self.device)
            finally:
                torch.set_float32_matmul_precision(before)
        self.record(f"encode_{precision}_docs_per_s", len(docs) / t.seconds,
                    flops_per_item(self.student_params, self.tokens["doc"]))

    # ---- cross-encoder scoring -------------------------------------------------------------------------------
    def cross_encoder(self, name: str, precision: str) -> None:
        from prod_st.teachers.cross_encoder import CrossEncoderTeacher, load_cross_encoder

        spec = self.recipe.teachers[name]
        if getattr(self, "ce_name", None) != name:  # one cross-encoder in memory at a time
            self.ce = None
            folder = bert_folder(self.work / name, self.shapes[name], self.tokenizer, self.device, classifier=True)
            self.ce = load_cross_encoder(str(folder), max_length=spec.max_length).to(self.device)
            self.ce_name = name
        teacher = CrossEncoderTeacher(self.ce, batch_size=spec.batch_size, max_length=spec.max_length,
                                      cache_root=self.work / f"teacher-{name}-{precision}", precision=precision)
        queries = self.texts.make(max(1, self.sizes[f"{name}_{precision}"] // PER_QUERY), self.query_len)
        lists = [self.texts.make(PER_QUERY, self.doc_len) for _ in queries]
        teacher._predict([(q, d) for q, docs in zip(queries[:4], lists[:4]) for d in docs])  # warm-up, uncached
        sync(self.device)
        with Timer() as t:
            scores = teacher.score(queries, lists, progress=False)
            sync(self.device)
        assert len(scores) == len(queries)
        self.record(f"{name}_{precision}_pairs_per_s", len(queries) * PER_QUERY / t.seconds,
                    flops_per_item(dense_params(self.ce), self.tokens["pair"]))

    # ---- training steps --------------------------------------------------------------------------------------
    def train(self, label: str, stage_name: str, batch: int, steps: int, precision: str) -> None:
        from transformers import TrainerCallback

        from prod_st.training import student_training
        from prod_st.training.losses import PRODLoss
        from prod_st.training.stage_data import TrainingRows, labelled_dataset

        stage = next(s for s in self.recipe.stages if s.name == stage_name)
        in_batch = stage.candidates == "in_batch"
        count, warm = stage.negatives.count, self.sizes["warm_steps"]
        total = warm + steps
        n = total * batch + (batch if in_batch else 0)
        docs = self.texts.make(n * (1 + count), self.doc_len)
        rows = TrainingRows.from_texts([f"q{i}" for i in range(n)], self.texts.make(n, self.query_len), docs[:n],
                                       [docs[n + i * count: n + (i + 1) * count] for i in range(n)])
        rng = np.random.default_rng(1)
        if in_batch:  # the de teacher's embeddings of [query, positive, negatives]
            dim = self.student.get_embedding_dimension()
            labels = rng.standard_normal((n, 2 + count, dim), dtype=np.float32) / math.sqrt(dim)
        else:  # [teacher scores, stage-start student scores] over [positive, negatives]
            labels = rng.standard_normal((n, 2, 1 + count), dtype=np.float32) * 3
        folder = self.work / f"train-{label}-{precision}"
        dataset = labelled_dataset(folder / "train_data", rows, [labels])
        loss = PRODLoss.for_stage(self.student, stage.candidates, stage.loss)
        if self.args.length_buckets is not None:
            loss.length_buckets = self.args.length_buckets
        spec = stage.model_copy(update={"max_steps": total, "batch_size": batch})
        training = self.recipe.training.model_copy(update={"precision": precision})
        stamps: list[float] = []
        begins: list[float] = []
        device = self.device

        class TimedSteps(TrainerCallback):  # after the run's checkpointing callback: a clock, and no saves
            def on_step_begin(self, args, state, control, **kwargs):  # the step's batch has been fetched
                begins.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                sync(device)
                stamps.append(time.perf_counter())
                control.should_save = False
                return control

        student_training.train_stage(self.student, dataset, loss, folder, spec, label, {}, training=training,
                                     seed=self.recipe.seed, no_duplicates=in_batch, progress=False,
                                     callbacks=[TimedSteps()])
        self.out["meta"]["train_device"] = str(self.student.device)
        if len(stamps) < warm + 2:
            raise RuntimeError(f"only {len(stamps)} steps timed")
        rate = (len(stamps) - warm) / (stamps[-1] - stamps[warm - 1])
        # the main thread's wait for each next batch (tokenising and collating, unless workers did it ahead): time
        # in which a GPU has nothing to do
        waits = [begin - end for begin, end in zip(begins[warm:], stamps[warm - 1:])]
        self.out.setdefault("batch_wait_ms", {})[f"train_{label}_{precision}"] = round(1000 * float(np.mean(waits)), 1)
        step_tokens = batch * (self.tokens["query"] + (1 + count) * self.tokens["doc"])
        self.record(f"train_{label}_{precision}_steps_per_s", rate,
                    flops_per_item(self.student_params, step_tokens, train=True))

    # ---- the plan --------------------------------------------------------------------------------------------
    def plan(self) -> list[tuple[str, object]]:
        s, gpu = self.sizes, self.device.startswith("cuda")
        bf16 = not gpu or torch.cuda.is_bf16_supported()
        precisions = ["bf16", "fp32"] if bf16 else ["fp32"]
        stages = {st.name: st for st in self.recipe.stages}
        b8, b16 = stages["ce12"].batch_size, stages["de"].batch_size
        plan = [(f"encode_{p}", lambda p=p: self.encode(p)) for p in ["fp32", *(["tf32"] if gpu else []),
                                                                        *(["bf16"] if bf16 else [])]]
        plan += [(f"{ce}_{p}", lambda ce=ce, p=p: self.cross_encoder(ce, p)) for ce in ("ce12", "ce24")
                 for p in precisions]
        batches = s["batches"] or {"list_x8": GPUS * b8, "list": b8, "inbatch": b16}
        self.out["meta"]["train_batch"] = batches
        for p in precisions:
            plan += [(f"train_{label}_{p}", lambda label=label, stage=stage, steps=steps, p=p:
                      self.train(label, stage, batches[label], steps, p))
                     for label, stage, steps in (("list_x8", "ce12", s["big_steps"]), ("list", "ce12", s["steps"]),
                                                 ("inbatch", "de", s["steps"]))]
        return plan

    def run(self) -> dict:
        self.measure("build_student", self.build_student)
        for key, fn in self.plan():
            if self.args.only and self.args.only not in key:
                continue
            self.measure(key, fn)
            write_json(self.args.out, self.out, indent=1)  # a kill keeps what finished
        self.out["projection"] = projection(self.out["rates"], self.recipe)
        return self.out


def projection(rates: dict, recipe) -> dict:
    """GPU-hours of the msmarco-passage schedule on 8 GPUs as written, per training precision (evaluation encodes
    in fp32 either way), from the measured rates; None where a rate is missing. GPU work only."""
    from prod_st.training.steps import plan_steps

    stages = {s.name: s for s in recipe.stages}

    def pairs(stage) -> float:  # distinct (query, passage) pairs: the positive + the distinct negatives drawn
        draws = plan_steps(Q, stage.batch_size, max_steps=stage.max_steps, world_size=GPUS).draws  # epochs read
        window = stage.negatives.end - stage.negatives.start  # candidates in the mining window, less the positive
        return Q * (1 + window * (1 - (1 - stage.negatives.count / window) ** draws))

    ce12, ce24, de, warmup, dpd = stages["ce12"], stages["ce24"], stages["de"], stages["warmup"], recipe.dpd
    out = {}
    evaluation = "encode_tf32_docs_per_s" if rates.get("encode_tf32_docs_per_s") else "encode_fp32_docs_per_s"
    for p in ("fp32", "bf16"):
        work = [  # (what, count, rate key): seconds = count / rate
            ("encode: 6 student corpus encodings + the de teacher's, fp32 (TF32 on a GPU: training.tf32; 12 layers: "
             "2 x the student's work)", (6 + 2) * D, evaluation),
            ("teacher: de embeddings of stage 1's distinct passages (2 x the student's work)", 2 * pairs(de),
             f"encode_{p}_docs_per_s"),
            ("teacher: ce12 scores of stage 2's distinct pairs", pairs(ce12), f"ce12_{p}_pairs_per_s"),
            (f"teacher: ce24 scores of stage 3's distinct pairs + DPD's top-{dpd.rerank_depth} of {DPD_ASKED:.0%}",
             pairs(ce24) + DPD_ASKED * Q * dpd.rerank_depth, f"ce24_{p}_pairs_per_s"),
            ("train: warm-up + de, 8 GPUs (warm-up's contrastive step assumed = in-batch PROD's)",
             GPUS * (warmup.max_steps + de.max_steps), f"train_inbatch_{p}_steps_per_s"),
            ("train: ce12 + ce24 + DPD, 8 GPUs", GPUS * (ce12.max_steps + ce24.max_steps + dpd.max_steps),
             f"train_list_{p}_steps_per_s"),
        ]
        hours = {what: round(count / rates[key] / 3600, 2) if rates.get(key) else None for what, count, key in work}
        total = None if None in hours.values() else round(sum(hours.values()), 1)
        out[f"training_{p}"] = {"gpu_hours": hours, "total_gpu_hours": total}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full", "host"), default="full",
                        help="host: full texts and batches through tiny models (what the host allows)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="record each measurement's N functions with the most own time (cProfile, main thread)")
    parser.add_argument("--only", default=None, help="run only the measurements whose key contains this")
    parser.add_argument("--length-buckets", type=int, default=None, metavar="N",
                        help="PRODLoss.length_buckets for the training steps (1: one merged pass, as before)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default: the size's)")
    parser.add_argument("--host-workers", type=lambda v: v if v == "off" else int(v), default=None, metavar="N",
                        help="take prod-st's GPU paths on any device: inference by run_batches and training with N "
                             "prepare-ahead worker processes (0: one thread; default: what prod-st picks here; off: "
                             "sentence-transformers' own loops and no dataloader workers, as before issue 19)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense FLOP/s limit (H200: ~790)")
    parser.add_argument("--out", type=Path, default=Path("bench/out/gpu_throughput.json"))
    parser.add_argument("--workdir", type=Path, default=None, help="models and caches (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is much faster on a CPU busy with other work)")
    args = parser.parse_args(argv)
    before, threads = os.environ.get("PROD_ST_CACHE"), torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prod-st-tp-")))
        os.environ["PROD_ST_CACHE"] = str(work / "cache")  # corpus blocks and teacher scores of this bench only
        if args.host_workers is not None:  # what host_workers() gives on a GPU, here
            from prod_st.retrieval import encoding
            from prod_st.teachers import cross_encoder
            from prod_st.training import student_training

            workers = None if args.host_workers == "off" else args.host_workers
            for module in (encoding, cross_encoder, student_training):
                stack.enter_context(mock.patch.object(module, "host_workers", lambda workers=workers: workers))
        try:
            with Timer() as t:
                out = Bench(args, work).run()
        finally:
            torch.set_num_threads(threads)
            if before is None:
                del os.environ["PROD_ST_CACHE"]
            else:
                os.environ["PROD_ST_CACHE"] = before
    out["meta"]["seconds"] = round(t.seconds, 1)
    out["meta"]["host_workers"] = args.host_workers
    write_json(args.out, out, indent=1)
    for name, proj in out["projection"].items():
        print(f"projection, {name}: {proj['total_gpu_hours']} GPU-h (GPU work only, 8 GPUs as written"
              + (f"; {args.size} mode: meaningless)" if args.size != "full" else ")"))
    print(f"{len(out['rates'])} rates, {len(out['errors'])} errors in {t.seconds:.0f}s -> {args.out}")
    return out


if __name__ == "__main__":
    main()
