"""Stored GPU results drive `auto`: rank each operator's backends by the median
forward + backward time of a GPU `aefast bench` run (float32, its largest size) and
write aefast/gpu_ranking.json (aefast.backends.RANKING_FILE), which aefast.backends
reads at import.

    python -m aefast.bench.ranking bench/results/<gpu>-<date>/bench.json [OUT.json]
"""

from __future__ import annotations

import json
import pathlib
import sys

from aefast._files import replace_text_atomically
from aefast.backends import RANKING_FILE

SIZE_ORDER = ("small", "medium", "large")


def rank(rows: list[dict]) -> dict[str, list[str]]:
    """{op: [backend, ...] fastest first} from bench.json rows."""
    ranking = {}
    for op in sorted({r["op"] for r in rows}):
        timed = [r for r in rows if r["op"] == op and r["contender"].startswith("aefast[")
                 and r["mode"] == "forward+backward" and r["dtype"] == "float32" and "error" not in r]
        if not timed:
            continue
        largest = max((r["size"] for r in timed), key=SIZE_ORDER.index)
        at_size = sorted((r for r in timed if r["size"] == largest), key=lambda r: r["median_ms"])
        ranking[op] = [r["contender"][len("aefast["):-1] for r in at_size]
    return ranking


def write_ranking(bench_json: pathlib.Path, out: pathlib.Path = RANKING_FILE) -> dict:
    record = json.loads(pathlib.Path(bench_json).read_text())
    if record["environment"].get("device_type") != "cuda":
        raise ValueError(f"{bench_json} holds no GPU run of aefast bench")
    ranking = {"source": str(bench_json), "device": record["environment"]["device"], "ranking": rank(record["results"])}
    replace_text_atomically(out, json.dumps(ranking, indent=2) + "\n")
    return ranking


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    out = pathlib.Path(sys.argv[2]) if len(sys.argv) == 3 else RANKING_FILE
    print(json.dumps(write_ranking(pathlib.Path(sys.argv[1]), out), indent=2))
