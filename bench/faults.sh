#!/usr/bin/env bash
# Faults of a shared machine, each with the real CLI on bench/tiny.yaml (about 4 minutes on 2 cores):
#   1. a second `prod-st run` into the folder of a run in progress; then kill -9 of the first and the rerun;
#   2. garbage written into every Arrow file and array of the cache, then a run on that cache;
#   3. (as root: a tmpfs) a run folder on a 400 MB file system that fills up, then the rerun once it has 2 GB.
# Usage: bash bench/faults.sh [WORKDIR]   (default: a new temp folder, removed at the end)
set -uo pipefail
cd "$(dirname "$0")/.."
RECIPE=bench/tiny.yaml
LONG="--set stages.2.max_steps=300"  # a cross-encoder stage long enough to be killed in
WORK=${1:-$(mktemp -d /tmp/prod-st-faults.XXXX)}
mkdir -p "$WORK"
export PROD_ST_CACHE=$WORK/cache
PRODST=${PRODST:-prod-st}
say() { printf '%s\n' "$*"; }
last_error() { grep '^error:' "$1" | tail -1; }

say "## 1. a second run into a busy folder, then kill -9 and rerun"
$PRODST run $RECIPE $LONG --output "$WORK/run" --no-progress >"$WORK/a.log" 2>&1 &
first=$!
until grep -q "stage 2 of 6" "$WORK/run/run.log" 2>/dev/null; do kill -0 $first || exit 1; sleep 1; done
$PRODST run $RECIPE $LONG --output "$WORK/run" --no-progress >"$WORK/b.log" 2>&1
say "second run: exit $?: $(last_error "$WORK/b.log")"
until [ -e "$WORK/run/02-bi/DONE" ]; do kill -0 $first || exit 1; sleep 1; done
sleep 5
kill -9 $first; wait $first 2>/dev/null
say "first run killed with -9 after $(ls "$WORK"/run/*/DONE | wc -l) finished steps," \
    "$(ls -d "$WORK"/run/03-ce/checkpoints/checkpoint-* 2>/dev/null | wc -l) checkpoint(s) of 03-ce"
start=$(date +%s)
$PRODST run $RECIPE $LONG --output "$WORK/run" --no-progress >"$WORK/c.log" 2>&1
say "rerun: exit $? in $(( $(date +%s) - start )) s: $(grep -o 'resuming the run.*' "$WORK/c.log" | head -1)"

say "## 2. every cached Arrow file and array damaged, then a run on that cache"
n=0
while IFS= read -r f; do printf 'garbage!%.0s' {1..64} | dd of="$f" conv=notrunc status=none; n=$((n+1)); done \
  < <(find "$PROD_ST_CACHE" -type f \( -name '*.arrow' -o -name '*.npy' \))
$PRODST run $RECIPE $LONG --output "$WORK/run2" --no-progress >"$WORK/d.log" 2>&1
code=$?
say "damaged $n files; run: exit $code, $(grep -c 'damaged cache entry' "$WORK/d.log") 'damaged cache entry' warnings"
say "test nDCG@10: first $(python3 -c "import json,sys;print(round(json.load(open(sys.argv[1]))['test']['student']['nDCG@10'],4))" "$WORK/run/final.json")," \
    "on the damaged cache $(python3 -c "import json,sys;print(round(json.load(open(sys.argv[1]))['test']['student']['nDCG@10'],4))" "$WORK/run2/final.json")"

if [ "$(id -u)" = 0 ] && mkdir -p "$WORK/small" && mount -t tmpfs -o size=400m tmpfs "$WORK/small" 2>/dev/null; then
  say "## 3. a run folder on a 400 MB tmpfs, then the rerun with 2 GB"
  $PRODST run $RECIPE --output "$WORK/small/run" --no-progress >"$WORK/e.log" 2>&1
  say "full disk: exit $?: $(last_error "$WORK/e.log")"
  say "left behind: $(ls "$WORK"/small/run/*/DONE 2>/dev/null | wc -l) finished steps; $(find "$WORK/small/run" -name '.*tmp*' | wc -l) temp files"
  mount -o remount,size=2g "$WORK/small"
  $PRODST run $RECIPE --output "$WORK/small/run" --no-progress >"$WORK/f.log" 2>&1
  say "rerun: exit $?: $(grep -o 'resuming the run.*' "$WORK/f.log" | head -1)"
  umount "$WORK/small"
else
  say "## 3. skipped: mounting a small tmpfs needs root (tests/test_faults.py patches the writer instead)"
fi
[ -z "${1:-}" ] && rm -rf "$WORK"
