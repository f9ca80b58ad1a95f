"""The table of bad inputs for bench/RESULTS.md: runs tests/test_bad_inputs.py (every case through the installed
`prod-st` script) and prints one markdown row per case: the command, its exit code and its one-line error.

    python bench/bad_inputs.py > bench/out/bad_inputs.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "rows.jsonl"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_inputs.py"],
                              cwd=ROOT, env={**os.environ, "PROD_ST_BAD_INPUTS_TABLE": str(table)})
        rows = [json.loads(line) for line in table.read_text().splitlines()] if table.exists() else []
    print("| case | command | exit | stderr (the one line) |")
    print("|---|---|---|---|")
    for row in rows:
        command = "prod-st " + " ".join(row["args"])
        error = row["error"].replace("|", "\\|")
        print(f"| {row['id']} | `{command}` | {row['exit']} | {error} |")
    print(f"\n{len(rows)} cases; pytest exit code {proc.returncode}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
