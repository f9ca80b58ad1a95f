"""Long steps split across ranks: two gloo processes (spawned here, CPU) share teacher scoring, corpus encoding
and search, and get what one process gets. (The whole schedule under torchrun: bench/ddp_compare.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp
from conftest import as_torchrun_starts, free_port

from prod_st.recipe import load_recipe
from prod_st.training.stage_data import read_rows
from prod_st.util import distributed


def _gloo_threads() -> list[str]:
    """The names of this process's gloo threads (a process group that still exists has some)."""
    return [n for t in Path("/proc/self/task").glob("*/comm") if "gloo" in (n := t.read_text().strip())]


def _ranks(rank: int, world: int, port: int, out: str, model_dir: str, beir: str) -> None:
    """One of `world` processes: the shared steps, each rank's own work written under `out`."""
    as_torchrun_starts(rank, world, port, PROD_ST_CACHE=f"{out}/cache")
    assert distributed.init_if_launched()
    _steps(rank, out, model_dir, beir)
    distributed.leave_group()


def _steps(rank: int, out: str, model_dir: str, beir: str) -> None:
    import prod_st.retrieval.corpus_index as ci
    import prod_st.retrieval.evaluation as evaluation
    from prod_st.data import load_retrieval_data
    from prod_st.retrieval.evaluation import evaluate_model
    from prod_st.teachers.cache import ScoreCache
    from prod_st.teachers.sharded import fill_missing_shared
    from prod_st.util.models import load_model

    computed: list[str] = []

    def compute(items):
        computed.extend(items)
        return [float(len(x)) for x in items]

    items = {f"k{i}": "x" * (i % 7 + 1) + str(i) for i in range(23)}
    cache = ScoreCache(Path(out) / "scores")
    fill_missing_shared(cache, items, compute, chunk_size=4, length=len, progress=False)
    found = cache.get_many(items)
    data = load_retrieval_data(beir)
    evaluation.QUERY_CHUNK = 3  # (ranks only) 4 queries: chunks of 3 and 1, rank 0 has no query in the second
    result = evaluate_model(load_model(model_dir), data, top_k=3, keep_run=True, progress=False)
    indexed = ci._last_index["index"].ntotal
    on_torch = evaluate_model(load_model(model_dir), data, top_k=3, keep_run=True, progress=False,
                              search_backend="torch")
    ci_blocks = ci.corpus_embeddings(load_model(model_dir), data.corpus, block_size=2, progress=False)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "computed": computed, "found": found, "run": result.run, "metrics": result.metrics,
        "encoded": sum(ci.encoded_docs.values()), "shard": distributed.shard(10),
        "gathered": distributed.all_gather(rank), "blocks": [b.tolist() for b in ci_blocks], "indexed": indexed,
        "torch run": on_torch.run,
    }))


def test_single_process_helpers():
    assert distributed.shard(10) == (0, 10) and distributed.all_gather("x") == ["x"]
    # a recipe that leaves the timeout out gives the group the one init_if_launched defaults to
    assert load_recipe("quickstart").distributed.timeout_minutes == distributed.DEFAULT_TIMEOUT_MINUTES


def test_rank_from_the_launcher_environment_before_any_group(monkeypatch):
    """torchrun and `accelerate launch` (whose multi-GPU launcher is torchrun) set RANK and WORLD_SIZE: a rank
    knows its place from them before the process group exists."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (1, 3, False)
    assert distributed.shard(10) == (3, 6)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.init_if_launched()  # a single process joins no group
    assert not distributed.is_distributed()


def _launched(rank: int, world: int, port: int, out: str) -> None:
    """One process as torchrun starts it: the launcher's environment, then what the runner does first and
    last."""
    import importlib

    import torch.distributed as dist

    as_torchrun_starts(rank, world, port)
    before = [distributed.rank(), distributed.world_size(), distributed.is_distributed()]
    joined = distributed.init_if_launched(1)
    after = [distributed.rank(), distributed.world_size(), distributed.is_distributed()]
    for name in ("sentence_transformers", "transformers.trainer", *distributed.GROUP_DEFAULT_MODULES):
        importlib.import_module(name)  # what a run imports once the group exists
    gathered = distributed.all_gather(rank)
    threads = len(_gloo_threads())
    distributed.leave_group()
    Path(out, f"{rank}.json").write_text(json.dumps({
        "before": before, "after": after, "joined": joined, "gathered": gathered,
        "group threads": [threads > 0, len(_gloo_threads())], "left": not dist.is_initialized()}))


@pytest.mark.slow
def test_init_if_launched_joins_the_group_the_launcher_set_up_and_leave_group_ends_it(tmp_path):
    """A rank joins the launcher's group, and `leave_group` really frees it: its gloo threads are gone before
    the interpreter shuts down, even though the trainer's imports came after the group (a group torch still
    held let a rank abort on exit in CI: SIGABRT, 'terminate called without an active exception')."""
    mp.spawn(_launched, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"{rank}.json").read_text())
        assert seen == {"before": [rank, 2, False], "after": [rank, 2, True], "joined": True, "gathered": [0, 1],
                        "group threads": [True, 0], "left": True}


@pytest.mark.slow
def test_two_ranks_share_the_work_and_agree_with_one(tmp_path, tiny_model_dir, toy_beir, monkeypatch):
    import prod_st.retrieval.corpus_index as ci

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    monkeypatch.setenv("PROD_ST_CACHE", str(one / "cache"))
    monkeypatch.setattr(ci, "encoded_docs", ci.Counter())
    ci._last_index.clear()
    _steps(0, str(one), tiny_model_dir, str(toy_beir))  # one process
    mp.spawn(_ranks, args=(2, free_port(), str(two), tiny_model_dir, str(toy_beir)), nprocs=2)
    single = json.loads((one / "rank0.json").read_text())
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]

    # teacher work: every item computed exactly once, by one rank, about half each; every rank has them all
    assert sorted(ranks[0]["computed"] + ranks[1]["computed"]) == sorted(single["computed"])
    assert {len(r["computed"]) for r in ranks} == {11, 12}
    assert ranks[0]["found"] == ranks[1]["found"] == single["found"]
    # corpus encoding: each rank encoded a share of the corpus; the blocks every rank reads are the same
    assert ranks[0]["encoded"] + ranks[1]["encoded"] == single["encoded"]
    assert 0 < ranks[0]["encoded"] < single["encoded"]
    np.testing.assert_allclose(np.concatenate(ranks[1]["blocks"]), np.concatenate(single["blocks"]), atol=1e-6)
    # each rank indexes its own share of the corpus (one copy of the index between them), searches every query
    # in it, and the ranks' top-k are merged: the same run and metrics on every rank as in one process
    assert ranks[0]["indexed"] + ranks[1]["indexed"] == single["indexed"] == sum(map(len, single["blocks"]))
    assert 0 < ranks[0]["indexed"] < single["indexed"]
    # the same with torch's exact search (prod_st.retrieval.exact_search) in place of faiss, merged the same way
    for r in [*ranks, single]:
        for run in (r["run"], r["torch run"]):
            assert run.keys() == single["run"].keys()
            for q, docs in single["run"].items():
                assert list(run[q]) == list(docs)
                assert list(run[q].values()) == pytest.approx(list(docs.values()), abs=1e-5)
        assert r["metrics"] == pytest.approx(single["metrics"])
    assert [r["shard"] for r in ranks] == [[0, 5], [5, 10]] and ranks[0]["gathered"] == [0, 1]


def _mapped_files(folder: str) -> list[tuple[int, int]]:
    """The address ranges of this process's memory-mapped files under `folder` (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(folder):
            low, high = fields[0].split("-")
            ranges.append((int(low, 16), int(high, 16)))
    return ranges


def _in_files(chunks: list, folder: str) -> list[bool]:
    """Per chunk: whether every buffer of it (its children's too) lies in a file mapped from `folder`."""
    ranges = _mapped_files(folder)
    return [all(any(low <= b.address and b.address + b.size <= high for low, high in ranges)
                for b in chunk.buffers() if b is not None and b.size) for chunk in chunks]


def _cache_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank filling a shared embedding cache with `fill_missing_shared`, and one cache in a folder of its
    own (as if rank 0's disk were another machine's); what its chunks are backed by, written under `out`."""
    from prod_st.teachers.cache import EmbeddingCache
    from prod_st.teachers.sharded import fill_missing_shared

    as_torchrun_starts(rank, world, port)
    distributed.init_if_launched()
    items = {f"t{i}": i for i in range(120)}

    def embed(numbers):
        return np.stack([np.full(16, n, np.float32) for n in numbers])

    shared, own = EmbeddingCache(Path(out) / "shared"), EmbeddingCache(Path(out) / f"own{rank}")
    for cache in (shared, own):
        fill_missing_shared(cache, items, embed, chunk_size=10, length=lambda n: n % 7, progress=False)
    distributed.leave_group()
    Path(out, f"cache{rank}.json").write_text(json.dumps({
        "shared": _in_files(shared._chunks, str(Path(out) / "shared")),
        "own": _in_files(own._chunks, str(Path(out) / f"own{rank}")),
        "values": [shared.matrix(list(items)).tolist(), own.matrix(list(items)).tolist()],
    }))


@pytest.mark.slow
def test_every_rank_maps_the_shards_rank_0_writes(tmp_path):
    """Issue 18 item 3: a rank other than 0 holds the teacher values it shares as rank 0's memory-mapped
    shards, not as a copy in its own memory; where it cannot see rank 0's file, it keeps them in memory and
    the values are the same."""
    mp.spawn(_cache_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"cache{r}.json").read_text()) for r in (0, 1)]
    expected = [[float(i)] * 16 for i in range(120)]
    for r in ranks:
        assert r["values"] == [expected, expected]
    assert len(ranks[1]["shared"]) == 6 and all(ranks[1]["shared"])  # 120 / (2 ranks x 10): 6 rounds, 6 shards
    assert all(ranks[0]["shared"]) and all(ranks[0]["own"])
    assert len(ranks[1]["own"]) == 6 and not any(ranks[1]["own"])  # no shard in its folder: in memory
    assert not list((tmp_path / "own1").glob("part-*"))


def _eval_rank(rank: int, world: int, port: int, out: str, model_dir: str, beir: str) -> None:
    """One rank of `torchrun -m prod_st_cli.main eval MODEL DATA --output ...`."""
    import torch.distributed as dist
    from prod_st_cli.main import app

    import prod_st.retrieval.corpus_index as ci

    as_torchrun_starts(rank, world, port, PROD_ST_CACHE=f"{out}/cache")
    app(["eval", model_dir, beir, "--top-k", "3", "--output", f"{out}/metrics.json"], standalone_mode=False)
    assert not dist.is_initialized()  # the command left the group it joined
    Path(out, f"encoded{rank}.json").write_text(json.dumps(sum(ci.encoded_docs.values())))


@pytest.mark.slow
def test_eval_command_under_torchrun_shares_the_work_and_reports_every_query(tmp_path, tiny_model_dir, toy_beir):
    """`prod-st eval` launched on two ranks: both join the group and take half of the corpus and of the queries;
    rank 0 writes the metrics of every query, the same as one process's."""
    from prod_st.data import load_retrieval_data
    from prod_st.retrieval.evaluation import evaluate_model
    from prod_st.util.models import load_model

    mp.spawn(_eval_rank, args=(2, free_port(), str(tmp_path), tiny_model_dir, str(toy_beir)), nprocs=2)
    single = evaluate_model(load_model(tiny_model_dir), load_retrieval_data(toy_beir), top_k=3, progress=False)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["num_queries"] == single.num_queries and written["metrics"] == pytest.approx(single.metrics)
    encoded = [json.loads((tmp_path / f"encoded{r}.json").read_text()) for r in (0, 1)]
    assert sum(encoded) == single.num_docs and min(encoded) > 0


TRAIN_ROWS, TRAIN_BATCH = 10, 2  # 10 queries: no global batch of 2 per device x 2 ranks divides an epoch
TRAIN_STAGES = [{"epochs": 2.0, "max_steps": None}, {"epochs": 1.0, "max_steps": 5}]  # as a stage sets its length
TRAIN_DRAWS = 2  # epochs of negatives each stage reads on 2 ranks (checked in the test); its dataset's blocks


def _train_rank(rank: int, world: int, port: int, out: str, model_dir: str) -> None:
    """One rank of two warm-up-like stages under torchrun on CPUs, each trained the way the runner trains a stage:
    `train_stage` (steps from `plan_steps` at the launcher's world size, given to `train_student` as max_steps),
    in the stage's folder that every rank shares, on a dataset of TRAIN_DRAWS blocks (each every query once, with
    that epoch's negatives) and the gathered contrastive loss. Per stage, what each optimizer step read (its
    queries and negatives, decoded) is written under `out`."""
    from types import SimpleNamespace

    import datasets

    from prod_st.recipe import Training
    from prod_st.training.losses import contrastive_loss
    from prod_st.training.student_training import train_stage
    from prod_st.util.fingerprint import model_fingerprint
    from prod_st.util.models import load_model

    as_torchrun_starts(rank, world, port)
    distributed.init_if_launched()
    model = load_model(model_dir)
    blocks = {"query": [], "positive": [], "negative_1": []}
    for epoch in range(TRAIN_DRAWS):
        blocks["query"] += [f"q{i}" for i in range(TRAIN_ROWS)]
        blocks["positive"] += [f"p{i}" for i in range(TRAIN_ROWS)]
        blocks["negative_1"] += [f"n{epoch}x{i}" for i in range(TRAIN_ROWS)]
    stages = []
    for index, length in enumerate(TRAIN_STAGES):
        before = model_fingerprint(model)
        spec = SimpleNamespace(lr=1e-3, batch_size=TRAIN_BATCH, warmup_ratio=0.0, **length)
        loss, read = contrastive_loss(model, gather_across_devices=True), []

        def record(module, args, read=read):
            decode = model.tokenizer.batch_decode
            read.append([decode(args[0][c]["input_ids"], skip_special_tokens=True) for c in (0, 2)])

        loss.register_forward_pre_hook(record)
        result = train_stage(model, datasets.Dataset.from_dict(blocks), loss, Path(out) / f"stage{index}", spec,
                             f"warmup{index}", {}, training=Training(), seed=1, no_duplicates=True,
                             block_size=TRAIN_ROWS, progress=False)
        del loss  # the trainer handed it its DDP-wrapped model, which holds the group (a stage drops it as it ends)
        stages.append({"steps": result["steps"], "read": read, "before": before, "after": model_fingerprint(model)})
    distributed.leave_group()  # the trainer's wrapped model no longer holds the group
    Path(out, f"trained{rank}.json").write_text(json.dumps({"stages": stages, "threads": _gloo_threads()}))


@pytest.mark.slow
def test_two_cpu_ranks_train_the_planned_steps_of_one_data_parallel_student(tmp_path, tiny_model_dir):
    """Under torchrun on CPUs, stages trained as the runner trains them (`train_stage`: steps from `plan_steps` at
    the launcher's world size, passed to `train_student` as max_steps) are data-parallel: an epoch of 10 queries
    is ceil(10 / (2 per device x 2 ranks)) = 3 global batches (5 on one process), so 2 epochs are 6 steps (not
    10), and 5 steps read 2 draws of negatives (not 1). Both ranks take exactly the planned optimizer steps on equal batches, together read
    every query of an epoch's block once (the short last global batch filled up), epoch e from block e (fresh
    negatives), and end each stage with the same, trained weights. (Without `use_cpu` accelerate saw one process
    on every rank: each trained its own copy, and the copies differed.)"""
    import math

    mp.spawn(_train_rank, args=(2, free_port(), str(tmp_path), tiny_model_dir), nprocs=2)
    trained = [json.loads((tmp_path / f"trained{r}.json").read_text()) for r in (0, 1)]
    per_epoch = math.ceil(TRAIN_ROWS / (TRAIN_BATCH * 2))  # global batches of one epoch
    planned = [(2 * per_epoch, 2), (5, math.ceil(5 / per_epoch))]  # (steps, draws) of 2 epochs, of 5 steps
    assert planned == [(6, TRAIN_DRAWS), (5, TRAIN_DRAWS)]  # one process would plan (10, 2) and (5, 1)
    queries = {f"q{i}" for i in range(TRAIN_ROWS)}
    for index, (steps, _) in enumerate(planned):
        ranks = [t["stages"][index] for t in trained]
        for r in ranks:
            assert r["steps"] == steps and len(r["read"]) == steps, index  # one forward per optimizer step
            assert all(len(q) == len(n) == TRAIN_BATCH for q, n in r["read"]), index
        for step in range(steps):
            (q0, n0), (q1, n1) = ranks[0]["read"][step], ranks[1]["read"][step]
            assert not set(q0) & set(q1), (index, step)  # a global batch holds a query once: disjoint slices
            assert {n.split("x")[0] for n in n0 + n1} == {f"n{step // per_epoch}"}, (index, step)  # block e
            assert all(n.split("x")[1] == q[1:] for q, n in zip(q0 + q1, n0 + n1))  # whole rows were dealt
        for epoch in range(steps // per_epoch):  # every query of the block read in each whole epoch
            read = {q for r in ranks for batch, _ in r["read"][epoch * per_epoch:(epoch + 1) * per_epoch] for q in batch}
            assert read == queries, (index, epoch)
        assert ranks[0]["after"] == ranks[1]["after"] != ranks[0]["before"] == ranks[1]["before"], index
    assert trained[0]["stages"][1]["before"] == trained[0]["stages"][0]["after"]
    assert [t["threads"] for t in trained] == [[], []]


def _recipe_rank(rank: int, world: int, port: int, out: str, recipe: str) -> None:
    """One rank of `prod-st run RECIPE` under torchrun, from an empty cache; records the steps its trainers took."""
    from prod_st_cli.main import app

    import prod_st.training.student_training as runner

    as_torchrun_starts(rank, world, port, PROD_ST_CACHE=f"{out}/cache")
    trained: dict[str, int] = {}
    train = runner.train_student

    def recording(model, dataset, loss, *, workdir, **kwargs):
        result = train(model, dataset, loss, workdir=workdir, **kwargs)
        trained[Path(workdir).parent.name] = result["steps"]
        return result

    runner.train_student = recording
    app(["run", recipe, "--output", f"{out}/run", "--no-progress"], standalone_mode=False)
    Path(out, f"steps{rank}.json").write_text(json.dumps(trained))


@pytest.mark.slow
def test_two_ranks_run_a_recipe_from_an_empty_cache_as_one_process_would(tmp_path, tiny_model_dir):
    """`prod-st run` on 2 gloo ranks with an empty cache: the teachers (a bi-encoder and a cross-encoder) are
    trained under the launcher, and 51 training queries, which no global batch divides, reach the gathered
    losses (warm-up and bi stage) as equal batches on both ranks (a short batch on one rank fails the gather or
    waits for the other rank until the group times out). Each stage trains, on every rank, the steps and reads
    the draws of negatives that one process with a batch twice as large computes, the epoch-sized stage
    included (one epoch, not two)."""
    import yaml

    from prod_st.training.steps import plan_steps

    negatives = {"miner": "student", "start": 1, "end": 20, "count": 1, "strategy": "sample"}
    recipe = {
        "name": "ddp", "seed": 3,
        "data": {"dataset": "wordnet-gloss", "train_queries": 51, "dev_queries": 8, "test_queries": 8,
                 "corpus_size": 200},
        "student": {"init": tiny_model_dir, "num_layers": 1, "max_doc_length": 32},
        "teachers": {
            "bi": {"kind": "bi-encoder", "train": {"backbone": tiny_model_dir, "max_steps": 2, "batch_size": 8,
                                                   "num_negatives": 1, "train_queries": 32}},
            "ce": {"kind": "cross-encoder", "max_length": 48,
                   "train": {"backbone": tiny_model_dir, "max_steps": 2, "batch_size": 4, "num_negatives": 2,
                             "train_queries": 16, "negatives_from": "bi", "max_length": 48}},
        },
        "stages": [
            {"name": "warmup", "kind": "warmup", "candidates": "in_batch", "negatives": negatives, "max_steps": 5,
             "batch_size": 8},
            {"name": "bi", "teacher": "bi", "candidates": "in_batch", "negatives": negatives, "max_steps": 3,
             "batch_size": 8, "loss": {"reg_weight": 0.0}},
            {"name": "ce", "teacher": "ce", "candidates": "list", "negatives": negatives | {"count": 2},
             "epochs": 1.0, "batch_size": 4, "loss": {"reg_weight": 1.0}},
        ],
        "eval": {"top_k": 50, "teacher_rerank_depth": 5},
        "distributed": {"timeout_minutes": 3},  # a rank left waiting fails the test in minutes, not hours
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    mp.spawn(_recipe_rank, args=(2, free_port(), str(tmp_path), str(path)), nprocs=2)

    run = tmp_path / "run"
    assert (run / "final.json").is_file()
    assert len(list((tmp_path / "cache" / "teachers" / "trained").glob("*/DONE"))) == 2  # both trained here
    steps = [json.loads((tmp_path / f"steps{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] and set(steps[0]) == {"01-warmup", "02-bi", "03-ce"}
    for index, stage in enumerate(recipe["stages"], 1):
        folder = run / f"{index:02d}-{stage['name']}"
        draws = json.loads((folder / "negatives.json").read_text())["epochs"]
        rows = len(read_rows(folder / "train_data")) // draws
        one = plan_steps(rows, stage["batch_size"] * 2, world_size=1, epochs=stage.get("epochs", 1.0),
                         max_steps=stage.get("max_steps"))
        assert (steps[0][folder.name], draws) == (one.steps, one.draws), folder.name
        assert json.loads((folder / "metrics.json").read_text())["train"]["steps"] == one.steps
    assert steps[0]["01-warmup"] == 5 and json.loads((run / "01-warmup" / "negatives.json").read_text())["epochs"] == 2
    assert steps[0]["03-ce"] == 7  # one epoch of 51 queries in global batches of 8 (two epochs: 13 per rank)
    log = (run / "run.log").read_text()
    assert "global batch 16 = 8 per device x 2 processes" in log
