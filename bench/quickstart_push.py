"""Issue 10 item 4: what holds the quickstart student below its bi-encoder teacher? Variants of the quickstart
recipe as it was before them (bench/quickstart_push_base.yaml = recipes/quickstart.yaml at f2aa0e5), each run
into bench/out/push/<variant>/ (a rerun resumes; finished variants are read back). Choices read DEV only: the
table prints dev nDCG@10 after every stage; test is in each run's final.json and is read once, for the variant
chosen on dev (`--test NAME`). Results of the runs reported in bench/RESULTS.md: bench/push-results/.

    python bench/quickstart_push.py q0 long ens long_ens   # run these variants (in order; a_b = both), then the dev table
    python bench/quickstart_push.py --list                # every variant and what it changes
    python bench/quickstart_push.py --table               # the dev table of the finished variants
    python bench/quickstart_push.py --test long_ens       # test metrics of one finished variant
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from harness import reference_unit, timed, write_json  # noqa: E402

OUT = ROOT / "bench" / "out" / "push"
BASE = ROOT / "bench" / "quickstart_push_base.yaml"  # recipes/quickstart.yaml as it was before these runs (f2aa0e5)
ENS = {"kind": "ensemble", "members": {"bi": 0.5, "ce": 0.5}}


def stage(recipe: dict, name: str) -> dict:
    return next(s for s in recipe["stages"] if s["name"] == name)


def scale_steps(factor: float):
    def apply(r):
        for s in r["stages"]:
            if s["name"] != "warmup":
                s["max_steps"] = int(s["max_steps"] * factor)
        r["dpd"]["max_steps"] = int(r["dpd"]["max_steps"] * factor)
        r["dpd"]["epochs"] = 100.0  # the cap decides
    return apply


def add_ens(r):
    """A third teacher, the ensemble of bi and ce (costs no training), as a stage after ce and as DPD's teacher."""
    r["teachers"]["ens"] = copy.deepcopy(ENS)
    r["stages"].append(copy.deepcopy(stage(r, "ce")) | {"name": "ens", "teacher": "ens"})
    r["dpd"]["teacher"] = "ens"


def ens_for_ce(r):
    """The ce stage distils from ens (bi+ce) instead of ce: a stronger teacher at the same steps."""
    r["teachers"]["ens"] = copy.deepcopy(ENS)
    stage(r, "ce")["teacher"] = "ens"
    r["dpd"]["teacher"] = "ens"


def temperature(t: float):
    def apply(r):
        for s in [*r["stages"], r["dpd"]]:
            if s.get("loss"):
                s["loss"]["temperature"] = t
    return apply


def list_negatives(n: int):
    def apply(r):
        for s in r["stages"]:
            if s.get("candidates") == "list":
                s["negatives"]["count"] = n
        r["dpd"]["num_negatives"] = min(n, r["dpd"]["rerank_depth"] - 1)
    return apply


def dpd_lr(lr: float, rounds: int = 1):
    def apply(r):
        r["dpd"]["lr"] = lr
        r["dpd"]["rounds"] = rounds
    return apply


def stronger_ce(queries: int):
    def apply(r):
        r["teachers"]["ce"]["train"]["train_queries"] = queries
    return apply


def precision(value: str):
    def apply(r):
        r.setdefault("training", {})["precision"] = value
    return apply


def init_from_bi(r):
    """The student = the first 3 layers of the trained bi teacher (the q0 run's), instead of raw all-MiniLM-L6-v2."""
    import re

    log = (OUT / "q0" / "run.log").read_text()
    r["student"]["init"] = re.search(r"bi-encoder teacher: (?:trained in \d+ s, saved to|cached at) (\S+)", log)[1]


def train_queries(n: int):
    def apply(r):
        r["data"]["train_queries"] = n  # NB: the seeded subsets are drawn in turn, so dev and test change too
    return apply


VARIANTS = {  # name: (what it changes, [edits in order])
    "q0": ("the quickstart as shipped", []),
    "long": ("every teacher stage and DPD 3x the steps", [scale_steps(3)]),
    "x2": ("every teacher stage and DPD 2x the steps", [scale_steps(2)]),
    "x6": ("every teacher stage and DPD 6x the steps", [scale_steps(6)]),
    "ens4ce": ("the ce stage distils from ens (bi+ce) instead of ce, same steps; DPD teacher ens", [ens_for_ce]),
    "rounds2": ("2 DPD rounds", [dpd_lr(1e-5, rounds=2)]),
    "ens": ("+ an ens teacher (bi+ce logits) stage as long as the ce stage, after it; DPD teacher ens", [add_ens]),
    "t1": ("temperature 1 instead of 4 in every distillation loss", [temperature(1.0)]),
    "t2": ("temperature 2 instead of 4", [temperature(2.0)]),
    "neg15": ("15 list negatives (PROD's) instead of 4 in ce and DPD", [list_negatives(15)]),
    "dpd5": ("DPD at the stage lr 5e-5 instead of 1e-5", [dpd_lr(5e-5)]),
    "bf16": ("training.precision bf16 (student training, teacher scoring)", [precision("bf16")]),
    "initbi": ("student = first 3 layers of the trained bi teacher", [init_from_bi]),
    "data4": ("4x the training queries (3,200; dev and test subsets change with it)", [train_queries(3200)]),
    "ce2k": ("ce teacher trained on 2,000 queries instead of 768", [stronger_ce(2000)]),
}


def build(name: str) -> dict:
    recipe = yaml.safe_load(BASE.read_text())
    for part in name.split("_"):
        for edit in VARIANTS[part][1]:
            edit(recipe)
    return recipe | {"name": f"push-{name}"}


def run(name: str) -> dict:
    from prod_st.recipe import parse_recipe
    from prod_st.runner import Runner

    folder = OUT / name
    done = folder / "push.json"
    if done.exists():
        return json.loads(done.read_text())
    unit = reference_unit()
    recipe = parse_recipe(build(name), f"variant {name}")
    final = Runner(recipe, folder).run()
    stages = sorted(p for p in folder.iterdir() if p.name[:2].isdigit())
    metrics = {p.name: json.loads((p / "metrics.json").read_text()) for p in stages}
    result = {"variant": name, "unit_seconds": unit, "run_seconds": final["seconds"]["run"],
              "dev": {k: m.get("student_dev", {}).get("nDCG@10") for k, m in metrics.items()},
              "teacher_dev": {k: m.get("teacher_dev") for k, m in metrics.items() if m.get("teacher_dev")},
              "steps": {k: m.get("train", {}).get("steps") for k, m in metrics.items()},
              "dpd_kept": {k: m.get("dpd", {}).get("kept") for k, m in metrics.items() if m.get("dpd")},
              "test": final["test"]}
    write_json(done, result, indent=1)
    return result


def table(results: list[dict]) -> str:
    lines = ["| variant | what changes | dev nDCG@10 after each stage | dev at the end | steps | wall (U) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        what = " + ".join(VARIANTS[p][0] for p in r["variant"].split("_"))
        path = " -> ".join(f"{k.split('-', 1)[1]} {v:.3f}" for k, v in r["dev"].items() if v is not None)
        end = [v for v in r["dev"].values() if v is not None][-1]
        steps = sum(s or 0 for s in r["steps"].values())
        lines.append(f"| {r['variant']} | {what} | {path} | **{end:.4f}** | {steps} | "
                     f"{r['run_seconds']:.0f} s ({r['run_seconds'] / r['unit_seconds']:.0f} U) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="names, or a_b for both edits")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--test", metavar="NAME")
    args = parser.parse_args()
    if args.list:
        for name, (what, _) in VARIANTS.items():
            print(f"{name:10} {what}")
        return 0
    if args.test:
        print(json.dumps(json.loads((OUT / args.test / "push.json").read_text())["test"], indent=1))
        return 0
    for name in args.variants:
        result, seconds = timed(lambda: run(name))
        print(f"{name}: dev {result['dev']} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    results = [json.loads(p.read_text()) for p in sorted(OUT.glob("*/push.json"))]
    print(table(results))
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
