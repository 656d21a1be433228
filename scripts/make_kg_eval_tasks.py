"""Regenerate ling-eval's built-in KG tasks from ling-data's knowledge-graph synthesis.

ling-eval imports no ling-data, so the tasks are shipped as files; this script (run from the
repository root, `uv run python scripts/make_kg_eval_tasks.py`) is how they were made, and
`tests/test_kg_eval_tasks.py` checks that the shipped files are what it produces today.
Everything comes from held-out (test-split) entities.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ling_data.kg.pipeline import SynthesisConfig, synthesize

DATA_DIR = Path(__file__).resolve().parents[1] / "packages" / "ling-eval" / "src" / "ling_eval" / "data"
CONFIG = SynthesisConfig(samples_per_pattern=20, seed=0)
TOOL_SAMPLES_PER_FORMAT = 12  # each sample still holds the ~5 KB tool list once (in its text)


def kg_eval_tasks() -> dict[str, list[dict]]:
    """{task name: rows}: multiple choice, generation, and tool calls (one sample per pattern
    and format, in pattern order, up to TOOL_SAMPLES_PER_FORMAT per format)."""
    synthesis = synthesize(CONFIG)
    tools, seen = [], set()
    for row in sorted(synthesis.test, key=lambda r: (r["format"], r["pattern"], r["id"])):
        key = (row["format"], row["pattern"])
        per_format = sum(1 for t in tools if t["format"] == row["format"])
        if key in seen or per_format >= TOOL_SAMPLES_PER_FORMAT:
            continue
        seen.add(key)
        tools.append(row)
    return {"kg_mc": synthesis.eval_mc, "kg_gen": synthesis.eval_gen, "kg_tools": tools}


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def main() -> int:
    for name, rows in kg_eval_tasks().items():
        path = DATA_DIR / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(render(rows), encoding="utf-8")
        tmp.replace(path)
        print(f"{path}: {len(rows)} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
