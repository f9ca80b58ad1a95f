"""Time and peak memory of `prod-st export` on one big stage (issue 22): a run folder with one list-candidates
stage of ROWS training rows x (1 + NEGATIVES) candidates, written by the runner's own writers
(`TrainingRows.to_dataset` with a label column shaped as a ce stage with PROD's regulariser: (2, 1 + k) float32 per
row, and `write_row_ids`), over wordnet-gloss's real texts and ids; then `prod-st export` of that stage in a
child process (both layouts, corpus and queries), its wall time and peak RSS (VmHWM), next to U (bench's
reference unit: plain CrossEncoder.predict on 2,000 pairs, `bench/harness.py`) measured in the same run.

    python bench/export_scale.py --rows 32000 --negatives 4        # the stage of bench/scale.py's largest run
    python bench/export_scale.py --rows 500000 --negatives 15      # MS MARCO's shape: ~8M scored pairs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from harness import RssSampler, Timer, peak_rss_mb, reference_unit  # noqa: E402


def build_run(folder: Path, rows: int, negatives: int, seed: int = 0) -> None:
    """A run folder whose stage 01-ce holds `rows` rows of random wordnet-gloss documents and random scores."""
    import numpy as np

    from prod_st.data import load_retrieval_data
    from prod_st.data.doc_ids import doc_ids
    from prod_st.recipe import load_recipe
    from prod_st.run.run_folder import create
    from prod_st.training.stage_data import ROW_IDS, TrainingRows, labelled_dataset, write_row_ids

    data = load_retrieval_data("wordnet-gloss", "train")
    corpus, queries = data.corpus, data.split_queries()
    rng = np.random.default_rng(seed)
    qids = list(queries)
    picked = rng.integers(0, len(qids), rows)  # queries repeat past 25,830 rows, as epochs' draws do

    def texts_at(at):
        docs = corpus.select(at)
        return [f"{t} {x}" for t, x in zip(docs["title"], docs["text"])]

    training = TrainingRows([qids[i] for i in picked], [queries[qids[i]] for i in picked],
                            rng.integers(0, len(corpus), rows), rng.integers(0, len(corpus), (rows, negatives)),
                            texts_at)
    width = 1 + negatives

    def labels():
        for start in range(0, rows, 8192):
            n = min(8192, rows - start)
            yield rng.normal(size=(n, 2, width)).astype(np.float32)

    create(folder, "export-scale")
    (folder / "recipe.yaml").write_text(load_recipe("quickstart").run_yaml().replace("name: quickstart", "name: export-scale"))
    stage = folder / "01-ce"
    stage.mkdir()
    labelled_dataset(stage / "train_data", training, labels())
    write_row_ids(stage / ROW_IDS, training, doc_ids(corpus),
                  {"teacher": "ce", "kind": "cross-encoder", "scale": 1.0, "candidates": "list"})
    record = {"index": 1, "name": "ce", "kind": "distill", "teacher": "ce", "student_dev": {}, "teacher_dev": {},
              "warnings": [], "seconds": {}}
    (stage / "metrics.json").write_text(json.dumps(record))
    (stage / "DONE").write_text("")


def child(run: str, out: str) -> None:
    import datasets  # noqa: F401  (what export imports, loaded before the baseline is read)

    from prod_st.publish.export import export_run, folder_size
    from prod_st.publish.export_card import render  # noqa: F401

    baseline = peak_rss_mb()
    with RssSampler(fields=("RssAnon",), interval=0.02) as anon, Timer() as wall:  # own memory's peak, every 20 ms
        stages = export_run(run, out, progress=False)
    print(json.dumps({"seconds": round(wall.seconds, 1),
                      "peak_rss_mb": round(peak_rss_mb()),
                      "rss_after_imports_mb": round(baseline), "anon_before_mb": round(anon.first["RssAnon"] / 1024),
                      "peak_anon_mb": round(anon.peak_mb("RssAnon")),
                      "rows": stages[0].rows, "pairs": stages[0].pairs, "text_rows": stages[0].text_rows,
                      "out_mb": round(folder_size(Path(out)) / 1e6, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32000)
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--work", type=Path, default=Path("/tmp/prod-st-export-scale"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    shutil.rmtree(args.work, ignore_errors=True)
    run, out = args.work / "run", args.work / "out"
    with Timer() as built:
        build_run(run, args.rows, args.negatives)
    stage_mb = sum(p.stat().st_size for p in (run / "01-ce").rglob("*") if p.is_file()) / 1e6
    u = reference_unit()
    done = subprocess.run([sys.executable, __file__, "--child", str(run), str(out)], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "cli")])})
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {"U_s": u, "export_U": round(result["seconds"] / u, 2), "stage_mb": round(stage_mb, 1),
               "build_s": round(built.seconds, 1), "negatives": args.negatives}
    print(json.dumps(result))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
