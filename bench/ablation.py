"""Does PROD help? Six schedules with the same student, data, teachers and number of student steps and
examples, each tuned on dev with the same trials, three seeds each, tested on the recipe's slice and on the full
wordnet-gloss corpus.

Rows, derived from recipes/ablations/prod.yaml by moving student steps between stages (same batch size):
  (a)  contrastive        PROD's schedule with no teacher: every stage (and DPD's steps) contrastive at its own lr,
                          re-mined by the current student before each stage, the same negatives per query
  (b)  kd-strongest       warm-up, then single-step KD from the strongest teacher (the last stage's), regulariser 1.0
  (b0) kd-strongest-reg0  the same at regulariser 0
  (c)  kd-bi              warm-up, then single-step KD from the bi-encoder teacher
  (d)  tpd                warm-up, then every teacher stage of the chain: teacher progressive distillation
  (e)  prod               (d) + DPD (data progressive distillation): the base recipe itself
Tuning: every row's first seed runs at each of LR_SCALES (every student learning rate times 0.5, 1, 2, 4, 8); the other
seeds run at the scale whose final student is best on dev (test is never read for it). The data subsets and the
teachers have their own seeds in the recipe, so a row's seeds vary only the student's training; teachers are
trained once and come from the prod-st cache in every other run.

    python bench/ablation.py                       # 6 rows x (5 trials + 2 seeds), full-corpus test too (hours)
    python bench/ablation.py --rows a,e --seeds 1 --lr-scales 1 --full-corpus none     # a quick look
    python bench/ablation.py --write-recipes DIR    # the derived recipes as YAML files, to read or run alone

Run folders go to bench/out/ablation/<row>-<name>[-x<lr scale>]-s<seed>/ (a rerun resumes them); the table goes to
stdout and bench/out/ablation/table.md, the plot to bench/out/ablation/ablation.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import textwrap
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
# (`from ablation import reference_unit` works)
from harness import Timer, installed_versions, reference_unit, write_json

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "recipes" / "ablations" / "prod.yaml"
OUT = ROOT / "bench" / "out" / "ablation"
ROWS = {"a": "contrastive", "b": "kd-strongest", "b0": "kd-strongest-reg0", "c": "kd-bi", "d": "tpd", "e": "prod"}
METRICS = ("nDCG@10", "MRR@10", "R@100")
LR_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)  # the dev-tuning trials of every row: each student stage's lr (and DPD's) times this


def derive(base: dict, row: str, lr_scale: float = 1.0) -> dict:
    """Row `row`'s recipe (a dict) from the PROD base: the same total of student steps and batch size. The base's
    stages are the warm-up, then the teacher chain weakest to strongest (its first teacher: the bi-encoder).
    `lr_scale` multiplies every student learning rate (the dev-tuning trial)."""
    recipe = copy.deepcopy(base)
    warmup, *chain = recipe["stages"]
    if warmup.get("kind") != "warmup" or not chain:
        raise SystemExit("the base recipe's stages must be a warm-up, then the teacher stages")
    dpd = recipe["dpd"]
    total = student_steps(recipe)
    if len({s["batch_size"] for s in recipe["stages"]} | {dpd["batch_size"]}) != 1:
        raise SystemExit("the base recipe must use one batch size everywhere (equal examples per row)")
    rest = total - warmup["max_steps"]
    if row != "e":
        recipe["dpd"] = None
    if row == "a":  # PROD's schedule with no teacher: each stage contrastive at its lr, re-mined by the student
        contrastive = [contrastive_stage(s) for s in chain]
        contrastive.append(contrastive_stage({"name": "dpd", "lr": dpd["lr"], "max_steps": dpd["max_steps"],
                                              "batch_size": dpd["batch_size"],
                                              "negatives": {"miner": "student", "start": 1,
                                                            "end": dpd["rerank_depth"],
                                                            "count": dpd["num_negatives"]}}))
        recipe["stages"] = [warmup, *contrastive]
        recipe["teachers"] = {}  # no teacher teaches (nor needs training) here
    elif row in ("b", "b0"):
        strongest = chain[-1] | {"max_steps": rest}
        if row == "b0":
            strongest["loss"] = strongest["loss"] | {"reg_weight": 0.0}
        recipe["stages"] = [warmup, strongest]
    elif row == "c":
        recipe["stages"] = [warmup, chain[0] | {"max_steps": rest}]
        recipe["teachers"] = {chain[0]["teacher"]: recipe["teachers"][chain[0]["teacher"]]}
    elif row == "d":
        recipe["stages"] = [warmup, *chain[:-1], chain[-1] | {"max_steps": chain[-1]["max_steps"] + dpd["max_steps"]}]
    for stage in recipe["stages"]:
        stage["lr"] = stage["lr"] * lr_scale
    if recipe["dpd"]:
        recipe["dpd"]["lr"] = recipe["dpd"]["lr"] * lr_scale
    return recipe


def contrastive_stage(stage: dict) -> dict:
    """A teacher stage (or DPD) as a contrastive stage: the hard loss on in-batch + the student's freshly mined
    negatives, the same steps, batch size, lr and number of mined negatives, no teacher."""
    return {"name": f"{stage['name']}-contrastive", "kind": "warmup", "candidates": "in_batch",
            "negatives": stage["negatives"], "lr": stage["lr"], "max_steps": stage["max_steps"],
            "batch_size": stage["batch_size"]}


def student_steps(recipe: dict) -> int:
    return sum(s["max_steps"] for s in recipe["stages"]) + (recipe["dpd"]["max_steps"] if recipe.get("dpd") else 0)


def run_folder(row: str, seed: int, lr_scale: float = 1.0) -> Path:
    trial = "" if lr_scale == 1.0 else f"-x{lr_scale:g}"
    return OUT / f"{row}-{ROWS[row]}{trial}-s{seed}"


def run_one(base: dict, row: str, seed: int, full_corpus: bool, lr_scale: float = 1.0) -> dict:
    from prod_st.recipe import parse_recipe
    from prod_st.runner import Runner

    spec = derive(base, row, lr_scale) | {"name": f"ablation-{ROWS[row]}-s{seed}", "seed": seed}
    folder = run_folder(row, seed, lr_scale)
    recipe = parse_recipe(spec, f"ablation row {row}")
    done, previous = folder / "ablation.json", OUT / "recorded" / f"{folder.name}.json"  # (not in the run folder:
    # prod-st runs only into an empty folder or its own)
    recorded = json.loads(previous.read_text()) if previous.exists() else None  # a rerun cut short resumes
    if done.exists():  # a finished run: its result as recorded (full-corpus metrics added when now asked)
        result = json.loads(done.read_text())
        if not full_corpus or "full" in result:
            return result
        if (folder / "student").is_dir():
            result["full"] = full_corpus_metrics(recipe, folder)
            write_json(done, result, indent=1)
            return result
        # Recorded on another machine (bench/ablation-results/) without its student: run it again, and say
        # whether the rerun reproduces the recorded test number.
        recorded = result
        previous.parent.mkdir(parents=True, exist_ok=True)
        done.rename(previous)
    unit = reference_unit()
    with Timer() as wall:
        final = Runner(recipe, folder).run()
    result = {"row": row, "seed": seed, "lr_scale": lr_scale, "steps": student_steps(spec), "test": final["test"],
              "seconds": round(wall.seconds, 1), "run_seconds": final["seconds"]["run"],
              "unit_seconds": unit, "versions": installed_versions()}
    stages = sorted(p for p in folder.iterdir() if p.name[:2].isdigit())
    result["dev"] = {p.name: json.loads((p / "metrics.json").read_text()).get("student_dev", {}) for p in stages}
    result["trained_steps"] = sum(json.loads((p / "metrics.json").read_text()).get("train", {}).get("steps", 0)
                                  for p in stages)
    if recorded is not None:
        before, now = recorded["test"]["student"]["nDCG@10"], result["test"]["student"]["nDCG@10"]
        result["rerun_of"] = {"test_nDCG@10": before, "reproduced": abs(before - now) < 5e-5}
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


def final_dev(result: dict) -> float:
    """The run's last student's dev nDCG@10 (what the tuning trials are chosen by; test is never read for it)."""
    return list(result["dev"].values())[-1]["nDCG@10"]


def scale_of(result: dict) -> float:
    return result.get("lr_scale", 1.0)  # runs recorded before the trials existed ran at x1


def best_scale(trials: list[dict]) -> float:
    """The lr scale of the trial whose final student is best on dev."""
    return scale_of(max(trials, key=final_dev))


def chosen(results: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Per row: the runs at its chosen lr scale (the best final dev nDCG@10 among the first seed's trials), and
    the trials as text ("x0.5 0.6012 / *x1 0.6130* / x2 0.6101", dev nDCG@10)."""
    kept, trials = [], {}
    for row in ROWS:
        mine = [r for r in results if r["row"] == row]
        if not mine:
            continue
        first = min(r["seed"] for r in mine)
        tried = sorted((r for r in mine if r["seed"] == first), key=scale_of)
        best = best_scale(tried)
        kept += [r for r in mine if scale_of(r) == best]
        trials[row] = " / ".join(f"**x{scale_of(r):g} {final_dev(r):.4f}**" if scale_of(r) == best
                                 else f"x{scale_of(r):g} {final_dev(r):.4f}" for r in tried)
    return kept, trials


def table(results: list[dict]) -> str:
    results, trials = chosen(results)
    lines = ["| row | schedule | steps (trained) | seeds | dev trials (lr x, seed 1) | "
             + " | ".join(f"slice {m}" for m in METRICS)
             + " | " + " | ".join(f"full {m}" for m in METRICS) + " | median wall time per run |",
             "|---|---|---|---|---|" + "---|" * (2 * len(METRICS)) + "---|"]
    for row, name in ROWS.items():
        mine = [r for r in results if r["row"] == row]
        if not mine:
            continue
        trained = sorted({r["trained_steps"] for r in mine})
        cells = [mean_spread([r["test"]["student"][m] for r in mine]) for m in METRICS]
        full = [r for r in mine if "full" in r]
        some = f" ({len(full)} of {len(mine)} seeds)" if full and len(full) < len(mine) else ""
        cells += [mean_spread([r["full"][m] for r in full]) + some if full else "-" for m in METRICS]
        wall = statistics.median(r["run_seconds"] for r in mine)
        units = [r["run_seconds"] / r["unit_seconds"] for r in mine if r.get("unit_seconds")]
        in_units = f" ({statistics.median(units):.0f} U)" if units else ""
        lines.append(f"| ({row}) | {name} | {mine[0]['steps']} ({'/'.join(map(str, trained))}) | {len(mine)} | "
                     f"{trials[row]} | "
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

    results = chosen(results)[0]
    rows = [r for r in ROWS if any(x["row"] == r for x in results)]
    reference = next((r for r in results if r["row"] == "e"), results[0])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (split, metrics) in zip(axes, (("slice", lambda x: x["test"]["student"]),
                                           ("full corpus", lambda x: x.get("full")))):
        for i, row in enumerate(rows):
            values = [m["nDCG@10"] for x in results if x["row"] == row and (m := metrics(x))]
            if not values:
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            ax.bar(i, statistics.mean(values), yerr=spread, capsize=3, color="tab:blue", alpha=0.7)
            ax.scatter([i] * len(values), values, color="black", zorder=3, s=10)
        if split == "slice":  # the references are measured on the slice only
            for i, (name, teacher) in enumerate(reference["test"]["teachers"].items(), 1):
                ax.axhline(teacher["nDCG@10"], linestyle="--", color=f"C{i}",
                           label=f"teacher {name} ({teacher['as'].split(' ')[0]})")
            ax.axhline(reference["test"]["student_before_training"]["nDCG@10"], color="grey", linestyle=":",
                       label="student before training")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xticks(range(len(rows)), [f"({r})\n" + textwrap.fill(ROWS[r], 12) for r in rows], fontsize=7)
        ax.set_ylabel(f"test nDCG@10 ({split})")
        ax.set_title(f"{split}: mean ± sd over seeds, dots = seeds", fontsize=9)
    fig.suptitle("Same student, data, teachers and steps: which schedule?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--lr-scales", default=",".join(f"{s:g}" for s in LR_SCALES),
                        help="the first seed's dev-tuning trials of every row (each student lr times this); the "
                        "other seeds run at the scale with the best final dev nDCG@10")
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
    scales = [float(s) for s in args.lr_scales.split(",") if s]
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
    best: dict[str, float] = {}
    for seed in seeds:  # seed-major: every row has a result early
        for row in rows:
            full = args.full_corpus == "all" or (args.full_corpus == "first" and seed == seeds[0])
            if seed == seeds[0]:  # the trials; only the chosen one is tested on the full corpus
                trials = [run_one(base, row, seed, False, scale) for scale in scales]
                best[row] = best_scale(trials)
                shown = run_one(base, row, seed, full, best[row])
                results += [shown if scale_of(r) == best[row] else r for r in trials]
            else:
                shown = run_one(base, row, seed, full, best[row])
                results.append(shown)
            print(f"row ({row}) seed {seed} at lr x{best[row]:g}: test nDCG@10 "
                  f"{shown['test']['student']['nDCG@10']:.4f}", file=sys.stderr, flush=True)
    text = table(results)
    (OUT / "table.md").write_text(text + "\n")
    plot(results, OUT / "ablation.png")
    print(text)
    return 0


if __name__ == "__main__":
    logging_setup = __import__("logging")
    logging_setup.basicConfig(level=logging_setup.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
