"""Row (d) seed 1's warm-up stage alone into the folder OUT (its dev nDCG@10: OUT/01-warmup/metrics.json).
Run it with and without ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 to see the bf16 kernels move the result."""
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
import ablation

from prod_st.recipe import parse_recipe
from prod_st.runner import Runner

base = yaml.safe_load(ablation.BASE.read_text())
spec = ablation.derive(base, "d", 4.0) | {"name": "ablation-tpd-s1", "seed": 1}
spec["stages"] = spec["stages"][:1]
spec["dpd"] = None
Runner(parse_recipe(spec, "check"), Path(sys.argv[1])).run()
