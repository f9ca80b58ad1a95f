import sys
from pathlib import Path
import yaml
sys.path.insert(0, "/work/main/bench")
import ablation
from prod_st.recipe import parse_recipe
from prod_st.runner import Runner
base = yaml.safe_load(ablation.BASE.read_text())
spec = ablation.derive(base, "d", 4.0) | {"name": "ablation-tpd-s1", "seed": 1}
spec["stages"] = spec["stages"][:1]
spec["dpd"] = None
Runner(parse_recipe(spec, "check"), Path(sys.argv[1])).run()
