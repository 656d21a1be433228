"""ling-eval's built-in KG tasks are what ling-data's synthesis produces today, and ling-eval's
tool-call parser scores every gold turn of them as correct (the two packages share only the
file format, so this is where the contract is checked end to end)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ling_eval.tasks import GENERATION, MULTIPLE_CHOICE, TOOL_CALL, resolve_task
from ling_eval.toolcalls import STOP, parse_turn, score_turn

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_kg_eval_tasks", ROOT / "scripts" / "make_kg_eval_tasks.py")
make_kg_eval_tasks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_kg_eval_tasks)


def test_shipped_kg_tasks_are_current() -> None:
    for name, rows in make_kg_eval_tasks.kg_eval_tasks().items():
        shipped = (make_kg_eval_tasks.DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8")
        assert shipped == make_kg_eval_tasks.render(rows), (
            f"{name}.jsonl is stale: run `uv run python scripts/make_kg_eval_tasks.py`")


def test_gold_tool_turns_parse_and_score_correct() -> None:
    task = resolve_task("kg_tools")
    assert task.kind == TOOL_CALL and {item["format"] for item in task.items} == {"json", "react"}
    turns = 0
    for item in task.items:
        for turn in item["turns"]:
            assert item["text"].startswith(turn["prompt"])
            continuation = item["text"][len(turn["prompt"]):]
            cuts = [continuation.find(stop) for stop in STOP[item["format"]] if stop in continuation]
            continuation = continuation[: min(cuts)] if cuts else continuation
            score = score_turn(parse_turn(continuation, item["format"]), turn["expect"])
            assert score.correct, (item["id"], continuation)
            turns += 1
    assert turns > 2 * len(task.items)


def test_kg_multiple_choice_and_generation_load() -> None:
    mc, gen = resolve_task("kg_mc"), resolve_task("kg_gen")
    assert mc.kind == MULTIPLE_CHOICE and len(mc.items) > 100
    assert gen.kind == GENERATION and tuple(gen.options.stop) == ("\n",)
