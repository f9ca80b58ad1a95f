#!/usr/bin/env bash
# Two-process run of a tiny recipe under torchrun (gloo on CPU): checks that the schedule is rank-aware
# (only rank 0 writes, barriers hold, in-batch candidates are gathered across processes) end to end.
#   bash bench/ddp_smoke.sh [OUT_DIR]
set -euo pipefail
out=${1:-/tmp/prod-st-ddp}
rm -rf "$out" && mkdir -p "$out"
cat > "$out/tiny.yaml" <<'YAML'
name: ddp-smoke
seed: 3
data: {dataset: wordnet-gloss, train_queries: 64, dev_queries: 16, test_queries: 16, corpus_size: 300}
student: {init: all-MiniLM-L6-v2, num_layers: 1, max_doc_length: 32}
teachers:
  bi: {kind: bi-encoder, train: {backbone: all-MiniLM-L6-v2, max_steps: 2, batch_size: 8, num_negatives: 1, train_queries: 32}}
  ce: {kind: cross-encoder, max_length: 48,
       train: {backbone: all-MiniLM-L6-v2, max_steps: 2, batch_size: 4, num_negatives: 2, train_queries: 16, negatives_from: bi, max_length: 48}}
stages:
  - {name: warmup, kind: warmup, candidates: in_batch, negatives: {count: 1, end: 20}, max_steps: 3, batch_size: 8}
  - {name: bi, teacher: bi, candidates: in_batch, negatives: {count: 1, end: 20}, max_steps: 3, batch_size: 8,
     loss: {reg_weight: 0.0}}
  - {name: ce, teacher: ce, candidates: list, negatives: {count: 2, end: 20}, max_steps: 3, batch_size: 4,
     loss: {reg_weight: 1.0}}
dpd: {teacher: ce, rerank_depth: 15, num_negatives: 2, max_steps: 2, batch_size: 4}
eval: {top_k: 100, teacher_rerank_depth: 5}
YAML
export PROD_ST_CACHE="$out/cache" TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
torchrun --nproc_per_node 2 -m prod_st_cli.main run "$out/tiny.yaml" --output "$out/run"
ls "$out/run"
