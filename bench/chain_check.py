"""Does the teacher chain grow? For a finished PROD run folder: every teacher of the recipe reranks each stage's
student's dev top-k (the candidates the next stage's teacher is checked on), so the teachers are compared like
with like on the same candidates. Reads the teachers from the run (and the prod-st cache); nothing is trained.

    python bench/chain_check.py bench/out/ablation/e-prod-s1
    python bench/chain_check.py bench/out/ablation/e-prod-s1 --teachers other.yaml   # other teachers, same candidates

`--teachers`: a recipe with the run's `data:` block whose teachers replace the run's: teacher variants tried on the
run's candidates (dev only), trained on first use (cached; saved under bench/out/chain_check/<file stem>/).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from prod_st.recipe import load_recipe
from prod_st.runner import Runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder (its recipe.yaml and stage folders)")
    parser.add_argument("--teachers", type=Path, help="a recipe (same data block) whose teachers replace the run's")
    args = parser.parse_args()
    recipe = load_recipe(args.run / "recipe.yaml")
    folder = None
    if args.teachers:
        other = load_recipe(args.teachers)
        if other.data != recipe.data:
            raise SystemExit(f"{args.teachers}: its data block differs from the run's; the candidates would not match")
        recipe = recipe.model_copy(update={"teachers": other.teachers})
        folder = Path(__file__).resolve().parent / "out" / "chain_check" / args.teachers.stem
    runner = Runner(recipe, args.run)
    runner.load_data_and_teachers(folder)  # as the run read them: same subsets, same precision, same caches
    names = list(recipe.teachers)
    stages = sorted(p for p in args.run.iterdir() if p.name[:2].isdigit() and (p / "dev_run.json").exists())
    metric, depth = recipe.eval.metric, recipe.eval.teacher_rerank_depth
    print(f"{metric} of each teacher reranking each stage student's dev top {depth} ({args.run}):\n")
    print("| candidates of | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for folder in stages[:-1]:  # the last student teaches no one
        cells = [runner.measure_gap(n, folder, 4.0, None)[1][metric] for n in names]
        print(f"| {folder.name} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
