"""Long steps split across ranks: two gloo processes (spawned here, CPU) share teacher scoring, corpus encoding
and search, and get what one process gets. (The whole schedule under torchrun: bench/ddp_compare.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from prod_st.recipe import load_recipe
from prod_st.util import distributed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_starts(rank: int, world: int, port: int, **env: str) -> None:
    """The environment torchrun gives a rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), **env)


def _gloo_threads() -> list[str]:
    """The names of this process's gloo threads (a process group that still exists has some)."""
    return [n for t in Path("/proc/self/task").glob("*/comm") if "gloo" in (n := t.read_text().strip())]


def _ranks(rank: int, world: int, port: int, out: str, model_dir: str, beir: str) -> None:
    """One of `world` processes: the shared steps, each rank's own work written under `out`."""
    _as_torchrun_starts(rank, world, port, PROD_ST_CACHE=f"{out}/cache")
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
    assert load_recipe("quickstart").distributed.timeout_minutes == 180


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

    _as_torchrun_starts(rank, world, port)
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
    mp.spawn(_launched, args=(2, _free_port(), str(tmp_path)), nprocs=2)
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
    mp.spawn(_ranks, args=(2, _free_port(), str(two), tiny_model_dir, str(toy_beir)), nprocs=2)
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

    _as_torchrun_starts(rank, world, port)
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
    mp.spawn(_cache_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
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

    _as_torchrun_starts(rank, world, port, PROD_ST_CACHE=f"{out}/cache")
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

    mp.spawn(_eval_rank, args=(2, _free_port(), str(tmp_path), tiny_model_dir, str(toy_beir)), nprocs=2)
    single = evaluate_model(load_model(tiny_model_dir), load_retrieval_data(toy_beir), top_k=3, progress=False)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["num_queries"] == single.num_queries and written["metrics"] == pytest.approx(single.metrics)
    encoded = [json.loads((tmp_path / f"encoded{r}.json").read_text()) for r in (0, 1)]
    assert sum(encoded) == single.num_docs and min(encoded) > 0


def _train_rank(rank: int, world: int, port: int, out: str, model_dir: str) -> None:
    """One rank training the student, as a stage does under torchrun on CPUs."""
    import datasets

    from prod_st.training.student_training import train_student
    from prod_st.util.fingerprint import model_fingerprint
    from prod_st.util.models import load_model

    _as_torchrun_starts(rank, world, port)
    distributed.init_if_launched()
    model = load_model(model_dir)
    rows = {"anchor": [f"query {i} about {w}" for i, w in enumerate("abcdefgh")],
            "positive": [f"document {i} on {w}" for i, w in enumerate("abcdefgh")]}
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    result = train_student(model, datasets.Dataset.from_dict(rows), MultipleNegativesRankingLoss(model),
                           workdir=Path(out) / f"work{rank}", lr=1e-3, epochs=1, max_steps=None, batch_size=2,
                           warmup_ratio=0.0, seed=1, no_duplicates=False, progress=False)
    distributed.leave_group()  # the trainer's wrapped model no longer holds the group
    Path(out, f"trained{rank}.json").write_text(json.dumps({"steps": result["steps"], "fingerprint":
                                                            model_fingerprint(model), "threads": _gloo_threads()}))


@pytest.mark.slow
def test_two_cpu_ranks_train_one_data_parallel_student(tmp_path, tiny_model_dir):
    """Under torchrun on CPUs the trainer runs data-parallel: each rank takes half of every epoch's batches
    (8 rows, 2 per device batch: 2 steps, not 4) and the ranks end with the same weights. (Without `use_cpu`
    accelerate saw one process on every rank: each trained its own copy, and the copies differed.)"""
    mp.spawn(_train_rank, args=(2, _free_port(), str(tmp_path), tiny_model_dir), nprocs=2)
    trained = [json.loads((tmp_path / f"trained{r}.json").read_text()) for r in (0, 1)]
    assert [t["steps"] for t in trained] == [2, 2]
    assert trained[0]["fingerprint"] == trained[1]["fingerprint"]
    assert [t["threads"] for t in trained] == [[], []]


def _gathered_loss_rank(rank: int, world: int, port: int, out: str) -> None:
    """One rank's loss and embedding gradients on its slice of a fixed global batch, candidates gathered."""
    import torch

    from prod_st.training.losses import PRODLoss

    _as_torchrun_starts(rank, world, port)
    distributed.init_if_launched()
    global_batch, slices = _global_batch(), []
    per_rank = global_batch[0].size(0) // world
    for column in global_batch:
        slices.append(column[rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_(True))
    labels = _teacher_embeddings()[rank * per_rank:(rank + 1) * per_rank]
    loss = PRODLoss(torch.nn.Identity(), candidate_mode="in_batch", reg_weight=0.0, scale=1.0,
                    gather_across_devices=True)
    components = loss.compute_loss_from_embeddings(slices, labels)
    total = sum(components.values())
    total.backward()
    Path(out, f"loss{rank}.json").write_text(json.dumps({
        "components": {k: float(v.detach()) for k, v in components.items()},
        "grads": [s.grad.tolist() for s in slices],
    }))
    distributed.leave_group()


def _global_batch():
    import torch

    generator = torch.Generator().manual_seed(0)
    return [torch.randn(8, 6, generator=generator) for _ in range(3)]  # query, positive, negative_1


def _teacher_embeddings():
    import torch

    return torch.randn(8, 3, 5, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_one_gathered_step_is_the_one_process_step_over_the_global_batch(tmp_path):
    """PRODLoss with global in-batch candidates on 2 ranks, each holding half of a global batch of 8 queries: the
    mean of the ranks' losses is the 1-process loss over all 8, and each rank's gradient (summed over ranks by
    the gather's backward, then averaged by DDP) is the 1-process gradient: each rank's positives are found at
    rank x batch_size of the gathered candidates."""
    import torch

    from prod_st.training.losses import PRODLoss

    mp.spawn(_gathered_loss_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"loss{r}.json").read_text()) for r in (0, 1)]
    whole = [column.clone().requires_grad_(True) for column in _global_batch()]
    single = PRODLoss(torch.nn.Identity(), candidate_mode="in_batch", reg_weight=0.0, scale=1.0)
    components = single.compute_loss_from_embeddings(whole, _teacher_embeddings())
    sum(components.values()).backward()
    for name, value in components.items():
        assert np.mean([r["components"][name] for r in ranks]) == pytest.approx(float(value.detach()), rel=1e-5), name
    for column, leaf in enumerate(whole):
        from_ranks = np.concatenate([np.asarray(r["grads"][column]) for r in ranks]) / 2  # DDP's average
        np.testing.assert_allclose(from_ranks, leaf.grad.numpy(), rtol=1e-4, atol=1e-6)


def _recipe_rank(rank: int, world: int, port: int, out: str, recipe: str) -> None:
    """One rank of `prod-st run RECIPE` under torchrun, from an empty cache; records the steps its trainers took."""
    from prod_st_cli.main import app

    import prod_st.training.student_training as runner

    _as_torchrun_starts(rank, world, port, PROD_ST_CACHE=f"{out}/cache")
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
    import datasets
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
    mp.spawn(_recipe_rank, args=(2, _free_port(), str(tmp_path), str(path)), nprocs=2)

    run = tmp_path / "run"
    assert (run / "final.json").is_file()
    assert len(list((tmp_path / "cache" / "teachers" / "trained").glob("*/DONE"))) == 2  # both trained here
    steps = [json.loads((tmp_path / f"steps{r}.json").read_text()) for r in (0, 1)]
    assert steps[0] == steps[1] and set(steps[0]) == {"01-warmup", "02-bi", "03-ce"}
    for index, stage in enumerate(recipe["stages"], 1):
        folder = run / f"{index:02d}-{stage['name']}"
        draws = json.loads((folder / "negatives.json").read_text())["epochs"]
        rows = len(datasets.load_from_disk(str(folder / "train_data"))) // draws
        one = plan_steps(rows, stage["batch_size"] * 2, world_size=1, epochs=stage.get("epochs", 1.0),
                         max_steps=stage.get("max_steps"))
        assert (steps[0][folder.name], draws) == (one.steps, one.draws), folder.name
        assert json.loads((folder / "metrics.json").read_text())["train"]["steps"] == one.steps
    assert steps[0]["01-warmup"] == 5 and json.loads((run / "01-warmup" / "negatives.json").read_text())["epochs"] == 2
    assert steps[0]["03-ce"] == 7  # one epoch of 51 queries in global batches of 8 (two epochs: 13 per rank)
    log = (run / "run.log").read_text()
    assert "global batch 16 = 8 per device x 2 processes" in log
