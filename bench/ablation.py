"""Does PROD help? Five schedules with the same student, data, teachers and number of student steps and
examples, three seeds each, tested on the recipe's slice and on the full wordnet-gloss corpus.

Rows, derived from recipes/ablations/prod.yaml by moving student steps between stages (same batch size):
  (a) contrastive   warm-up only: the hard loss on resampled mined negatives, for every step
  (b) kd-strongest  warm-up, then single-step KD from the strongest teacher (the last stage's: the ensemble)
  (c) kd-bi         warm-up, then single-step KD from the bi-encoder teacher
  (d) tpd           warm-up, then every teacher stage of the chain (bi -> ce -> ens): teacher progressive distillation
  (e) prod          (d) + DPD (data progressive distillation): the base recipe itself
The data subsets and the teachers have their own seeds in the recipe, so a row's seeds vary only the student's
training; teachers are trained once and come from the prod-st cache in every other run. Tuning reads dev only.

    python bench/ablation.py                       # 5 rows x 3 seeds, full-corpus test too (~2-3 h on 2 cores)
    python bench/ablation.py --rows a,e --seeds 1 --full-corpus none     # a quick look
    python bench/ablation.py --write-recipes DIR    # the derived recipes as YAML files, to read or run alone

Run folders go to bench/out/ablation/<row>-s<seed>/ (a rerun resumes them); the table goes to stdout and
bench/out/ablation/table.md, the plot to bench/out/ablation/ablation.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Timer, reference_unit, write_json  # noqa: E402  (`from ablation import reference_unit` works)

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "ablations" / "prod.yaml"
OUT = ROOT / "bench" / "out" / "ablation"
ROWS = {"a": "contrastive", "b": "kd-strongest", "c": "kd-bi", "d": "tpd", "e": "prod"}
METRICS = ("nDCG@10", "MRR@10", "R@100")


def derive(base: dict, row: str) -> dict:
    """Row `row`'s recipe (a dict) from the PROD base: the same total of student steps and batch size. The base's
    stages are the warm-up, then the teacher chain weakest to strongest (its first teacher: the bi-encoder)."""
    recipe = copy.deepcopy(base)
    warmup, *chain = recipe["stages"]
    if warmup.get("kind") != "warmup" or not chain:
        raise SystemExit("the base recipe's stages must be a warm-up, then the teacher stages")
    dpd_steps = recipe["dpd"]["max_steps"]
    total = student_steps(recipe)
    if len({s["batch_size"] for s in recipe["stages"]} | {recipe["dpd"]["batch_size"]}) != 1:
        raise SystemExit("the base recipe must use one batch size everywhere (equal examples per row)")
    if row == "e":
        return recipe
    recipe["dpd"] = None
    rest = total - warmup["max_steps"]
    if row == "a":
        recipe["stages"] = [warmup | {"max_steps": total}]
        recipe["teachers"] = {}  # no teacher teaches (nor needs training) here
    elif row == "b":
        recipe["stages"] = [warmup, chain[-1] | {"max_steps": rest}]
    elif row == "c":
        recipe["stages"] = [warmup, chain[0] | {"max_steps": rest}]
        recipe["teachers"] = {chain[0]["teacher"]: recipe["teachers"][chain[0]["teacher"]]}
    elif row == "d":
        recipe["stages"] = [warmup, *chain[:-1], chain[-1] | {"max_steps": chain[-1]["max_steps"] + dpd_steps}]
    return recipe


def student_steps(recipe: dict) -> int:
    return sum(s["max_steps"] for s in recipe["stages"]) + (recipe["dpd"]["max_steps"] if recipe.get("dpd") else 0)


def run_one(base: dict, row: str, seed: int, full_corpus: bool) -> dict:
    from prod_st.recipe import parse_recipe
    from prod_st.runner import Runner

    spec = derive(base, row) | {"name": f"ablation-{ROWS[row]}-s{seed}", "seed": seed}
    folder = OUT / f"{row}-{ROWS[row]}-s{seed}"
    recipe = parse_recipe(spec, f"ablation row {row}")
    done = folder / "ablation.json"
    if done.exists():  # a finished run: its result as recorded (full-corpus metrics added when now asked)
        result = json.loads(done.read_text())
        if full_corpus and "full" not in result:
            result["full"] = full_corpus_metrics(recipe, folder)
            write_json(done, result, indent=1)
        return result
    unit = reference_unit()
    with Timer() as wall:
        final = Runner(recipe, folder).run()
    result = {"row": row, "seed": seed, "steps": student_steps(spec), "test": final["test"],
              "seconds": round(wall.seconds, 1), "run_seconds": final["seconds"]["run"],
              "unit_seconds": unit}
    stages = sorted(p for p in folder.iterdir() if p.name[:2].isdigit())
    result["dev"] = {p.name: json.loads((p / "metrics.json").read_text()).get("student_dev", {}) for p in stages}
    result["trained_steps"] = sum(json.loads((p / "metrics.json").read_text()).get("train", {}).get("steps", 0)
                                  for p in stages)
    if full_corpus or (folder / "full_corpus.json").exists():
        result["full"] = full_corpus_metrics(recipe, folder)
    write_json(folder / "ablation.json", result, indent=1)
    return result


def full_corpus_metrics(recipe, folder: Path) -> dict:
    """The run's final student on the same test queries, over all 117,659 wordnet-gloss documents (cached)."""
    cached = folder / "full_corpus.json"
    if cached.exists():
        return json.loads(cached.read_text())
    from prod_st.data import load_retrieval_data
    from prod_st.retrieval.evaluation import evaluate_model
    from prod_st.training.stage_data import load_run_data
    from prod_st.util.models import load_model

    d = recipe.data
    sliced = load_run_data(d.dataset, splits=(None, None, d.test_split), sizes=(None, None, d.test_queries),
                           corpus_size=d.corpus_size, seed=d.seed if d.seed is not None else recipe.seed)
    full = load_retrieval_data(d.dataset, d.test_split)
    full.qrels = {q: full.qrels[q] for q in sliced.test.qrels}
    metrics = evaluate_model(load_model(folder / "student"), full, top_k=recipe.eval.top_k).metrics
    write_json(cached, metrics, indent=1)
    return metrics


def mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: list[dict]) -> str:
    lines = ["| row | schedule | steps (trained) | seeds | " + " | ".join(f"slice {m}" for m in METRICS)
             + " | " + " | ".join(f"full {m}" for m in METRICS) + " | wall time per run |",
             "|---|---|---|---|" + "---|" * (2 * len(METRICS)) + "---|"]
    for row, name in ROWS.items():
        mine = [r for r in results if r["row"] == row]
        if not mine:
            continue
        trained = sorted({r["trained_steps"] for r in mine})
        cells = [mean_spread([r["test"]["student"][m] for r in mine]) for m in METRICS]
        full = [r for r in mine if "full" in r]
        cells += [mean_spread([r["full"][m] for r in full]) if full else "-" for m in METRICS]
        wall = statistics.mean(r["run_seconds"] for r in mine)
        units = [r["run_seconds"] / r["unit_seconds"] for r in mine if r.get("unit_seconds")]
        in_units = f" ({statistics.mean(units):.0f} U)" if units else ""
        lines.append(f"| ({row}) | {name} | {mine[0]['steps']} ({'/'.join(map(str, trained))}) | {len(mine)} | "
                     + " | ".join(cells) + f" | {wall:.0f} s{in_units} |")
    reference = next((r for r in results if r["row"] == "e"), results[0])
    lines.append("")
    lines.append("References on the slice (test): " + "; ".join(
        [f"student before training {reference['test']['student_before_training']['nDCG@10']:.4f}"]
        + [f"teacher {n} as {t['as']} {t['nDCG@10']:.4f}" for n, t in reference["test"]["teachers"].items()]
    ) + " (nDCG@10; the bi teacher is the full-depth fine-tuned bi-encoder).")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if any(x["row"] == r for x in results)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, row in enumerate(rows):
        values = [x["test"]["student"]["nDCG@10"] for x in results if x["row"] == row]
        ax.bar(i, statistics.mean(values), color="tab:blue", alpha=0.7)
        ax.scatter([i] * len(values), values, color="black", zorder=3, s=12)
    reference = next((r for r in results if r["row"] == "e"), results[0])
    for i, (name, teacher) in enumerate(reference["test"]["teachers"].items(), 1):
        ax.axhline(teacher["nDCG@10"], linestyle="--", color=f"C{i}",
                   label=f"teacher {name} ({teacher['as'].split(' ')[0]})")
    ax.axhline(reference["test"]["student_before_training"]["nDCG@10"], color="grey", linestyle=":",
               label="student before training")
    ax.set_xticks(range(len(rows)), [f"({r}) {ROWS[r]}" for r in rows])
    ax.set_ylabel("test nDCG@10 (slice)")
    ax.set_title("Same student, data, teachers and steps: which schedule?")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="a,b,c,d,e")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--full-corpus", choices=("all", "first", "none"), default="all",
                        help="test on the full corpus for every seed, the first seed of each row, or none")
    parser.add_argument("--base", type=Path, default=BASE)
    parser.add_argument("--write-recipes", type=Path, help="write the derived recipes here and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="no runs: the table and plot of the runs finished so far (their ablation.json)")
    args = parser.parse_args(argv)
    base = yaml.safe_load(args.base.read_text())
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.write_recipes:
        args.write_recipes.mkdir(parents=True, exist_ok=True)
        for row in rows:
            recipe = derive(base, row) | {"name": f"ablation-{ROWS[row]}"}
            (args.write_recipes / f"{row}-{ROWS[row]}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = [json.loads(p.read_text()) for p in sorted(OUT.glob("*/ablation.json"))]
        results = [r for r in results if r["row"] in rows and r["seed"] in seeds]
        if not results:
            parser.error(f"no finished runs under {OUT}")
        seeds = []  # nothing to run
    else:
        results = []
    for seed in seeds:  # seed-major: every row has a result early
        for row in rows:
            full = args.full_corpus == "all" or (args.full_corpus == "first" and seed == seeds[0])
            results.append(run_one(base, row, seed, full))
            print(f"row ({row}) seed {seed}: test nDCG@10 {results[-1]['test']['student']['nDCG@10']:.4f}",
                  file=sys.stderr, flush=True)
    text = table(results)
    (OUT / "table.md").write_text(text + "\n")
    plot(results, OUT / "ablation.png")
    print(text)
    return 0


if __name__ == "__main__":
    logging_setup = __import__("logging")
    logging_setup.basicConfig(level=logging_setup.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
