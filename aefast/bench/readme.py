"""The README's `aefast bench` tables, generated from the newest stored results:

    python -m aefast.bench.readme            # rewrites README.md between its markers

For each device type with results under bench/results/*/bench.json (the newest run
per type that measured the most operators), the aefast rows at one size (CPU: medium; GPU: large): time, speedup over
the eager and the compiled reference, and share of the copy bandwidth.
"""

from __future__ import annotations

import json
import pathlib
import re

from aefast.bench.run import floor_share, verdicts

SIZE = {"cpu": "medium", "cuda": "large"}


def newest_runs(results: pathlib.Path) -> dict[str, dict]:
    """{device type: bench.json record} of the newest run per device type, among the
    runs that measured the size shown for it if any did, and among those the runs
    that measured the most operators at that size: a later run of a few ops (`--op`,
    to check a change) does not replace the table of a full one."""
    runs: dict[str, dict] = {}

    def rank(record):
        kind = record["environment"].get("device_type", "cpu")
        ops = {r["op"] for r in record["results"] if r["size"] == SIZE[kind]}
        return bool(ops), len(ops), record["environment"]["date"]

    for path in sorted(results.glob("*/bench.json")):
        record = json.loads(path.read_text())
        record["path"] = path
        kind = record["environment"].get("device_type", "cpu")
        if kind not in runs or rank(record) > rank(runs[kind]):
            runs[kind] = record
    return runs


def table(record: dict, kind: str) -> str:
    env, sizes = record["environment"], {r["size"] for r in record["results"]}
    # The size shown for this device, else (a run cut short) the largest measured.
    size = SIZE[kind] if SIZE[kind] in sizes else max(sizes, key=("small", "medium", "large").index)
    rows = [r for r in record["results"] if r["contender"].startswith("aefast") and r["size"] == size
            and r.get("dtype", "float32") == "float32" and "error" not in r]  # the table says float32
    lines = [
        f"{env['device']}, {env['threads']} threads, torch {env['torch']}, {env['date'][:10]}; size {size} "
        f"({rows[0]['shape'] if rows else '?'}), float32; copy bandwidth {env['copy_GBps']} GB/s "
        f"(`{record['path'].parent.as_posix()}/bench.md` has every row):",
        "",
        "| op | case | mode | backend | median ms | share of floor (copy; F.linear where named) | vs eager | vs compiled | vs PyTorch call |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    # The call a user would write with PyTorch alone, timed in the same run (newer runs).
    library = {(r["op"], r["mode"], r["dtype"]): r for r in record["results"]
               if r["contender"].startswith("torch:") and r["size"] == size and "error" not in r}
    for r in rows:
        compiled = "" if r["vs_compiled"] is None else f"{r['vs_compiled']:.2f}x"
        torch_row = library.get((r["op"], r["mode"], r.get("dtype", "float32")))
        versus = (f"{torch_row['median_ms'] / r['median_ms']:.2f}x (`{torch_row['contender'][len('torch: '):]}`)"
                  if torch_row else "")
        lines.append(f"| {r['op']} | {r.get('case', '')} | {r['mode']} | {r['contender'][len('aefast['):-1]} | "
                     f"{r['median_ms']:.2f} | {floor_share(r)} | {r['vs_eager']:.2f}x | {compiled} | {versus} |")
    return "\n".join(lines + ["", *verdicts(rows, over="the rows above")])


def update(readme: pathlib.Path, results: pathlib.Path) -> list[str]:
    """Rewrites each `<!-- aefast-bench:KIND -->` ... `<!-- /aefast-bench:KIND -->`
    block of readme that has results; returns the kinds written."""
    text = readme.read_text()
    written = []
    for kind, record in newest_runs(results).items():
        pattern = re.compile(rf"(<!-- aefast-bench:{kind} -->\n)(?:.*?\n)?(<!-- /aefast-bench:{kind} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + table(record, kind) + "\n" + m.group(2), text)
            written.append(kind)
    readme.write_text(text)
    return written


if __name__ == "__main__":
    kinds = update(pathlib.Path("README.md"), pathlib.Path("bench") / "results")
    print("README.md: wrote the aefast bench tables of " + (", ".join(kinds) or "no device (no results or markers)"))
