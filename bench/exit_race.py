"""Does a rank abort at exit after its work is done? Two gloo ranks (spawned, CPU) as torchrun starts them:
join the group, import what a run imports once the group exists (sentence-transformers), gather once, end.
`--old` starts and ends the way prod-st's runner did before the sixth session (the group made before those
imports, and never destroyed); the default is prod-st's `init_if_launched` / `leave_group`. Prints how many of
N launches lost a rank (SIGABRT, "terminate called without an active exception"). Load the cores meanwhile
(`for i in 1 2; do (timeout 900 sh -c 'while :; do :; done' &); done`): on an idle box the race is rarer.

    python bench/exit_race.py --old 40
    python bench/exit_race.py 40
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket

import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int, old: bool) -> None:
    import torch.distributed as dist

    from prod_st.util import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if old:
        dist.init_process_group("gloo")
    else:
        distributed.init_if_launched()
    importlib.import_module("sentence_transformers")
    distributed.all_gather(rank)
    if not old:
        distributed.leave_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("launches", type=int, nargs="?", default=20)
    parser.add_argument("--old", action="store_true")
    args = parser.parse_args()
    lost = 0
    for i in range(args.launches):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            mp.spawn(_rank, args=(2, port, args.old), nprocs=2)
        except mp.ProcessExitedException as e:
            lost += 1
            print(f"launch {i}: {e}", flush=True)
    print(f"{'old' if args.old else 'leave_group'}: {lost} of {args.launches} launches lost a rank at exit")


if __name__ == "__main__":
    main()
