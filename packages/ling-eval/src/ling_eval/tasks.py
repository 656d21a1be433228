"""Tasks from JSONL files: one item per line, the kind told by the item's fields.

Line formats (see TOOLUSE_FORMAT.md in the project briefs):
- multiple choice: {"id", "question", "choices": [str, ...], "answer": int}
- generation:      {"id", "prompt", "answer": str | [str, ...]}
- perplexity:      {"id", "text"}
- tool calls:      a ling-data KG tool-use sample ({"id", "format", "turns": [...], ...}); a turn
                   gives its prompt as a string ("prompt") or, as ling-data writes it, as the
                   length of the prompt in the item's "text" ("prompt_chars": the prompt is
                   text[:prompt_chars], in code points); loading expands the latter to "prompt"

Options that are not per item (few-shot count, stop sequences, answer regex, ...) come from an
optional sidecar `NAME.task.toml` next to `NAME.jsonl`, and can be overridden by the caller.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ling_eval.errors import TaskError

MULTIPLE_CHOICE, GENERATION, PERPLEXITY, TOOL_CALL = "multiple_choice", "generation", "perplexity", "tool_call"
KINDS = (MULTIPLE_CHOICE, GENERATION, PERPLEXITY, TOOL_CALL)
TOOL_FORMATS = ("json", "react")


@dataclass(frozen=True)
class TaskOptions:
    """num_fewshot: solved examples (drawn by seed from the same file) before each item.
    stop: generation stops at the first of these strings (EOS always stops it).
    regex: generation answers are extracted with this pattern (group 1 if it has groups).
    max_new_tokens: generation budget per item (per turn for tool calls)."""

    num_fewshot: int = 0
    fewshot_separator: str = "\n\n"
    stop: tuple[str, ...] = ("\n",)  # generation tasks; tool calls stop where the format says
    regex: str | None = None
    max_new_tokens: int | None = None  # default: 32 for generation, 128 per tool-call turn


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    items: list[dict[str, Any]] = field(repr=False)
    path: str
    sha256: str
    options: TaskOptions = TaskOptions()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_task(path: str | Path, name: str | None = None, **overrides: Any) -> Task:
    """Read and validate every line of `path`; a bad line raises TaskError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task file not found (expected a .jsonl file, one item per line)")
    options = _read_options(path.with_name(path.name.removesuffix(".jsonl") + ".task.toml"))
    options = _apply_options(options, overrides, source="options")
    items: list[dict[str, Any]] = []
    kind = None
    seen: dict[str, int] = {}
    text = path.read_text(encoding="utf-8")
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(item, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(item).__name__}")
        item_kind = detect_kind(item, where)
        if kind is None:
            kind = item_kind
        elif item_kind != kind:
            raise TaskError(f"{where}: a {item_kind} item in a {kind} task (all lines must be one kind)")
        VALIDATORS[kind](item, where)
        if item["id"] in seen:
            raise TaskError(f"{where}: duplicate id {item['id']!r} (first on line {seen[item['id']]})")
        seen[item["id"]] = line_no
        items.append(item)
    if not items:
        raise TaskError(f"{path}: no items (expected one JSON object per line)")
    if options.num_fewshot >= len(items):
        raise TaskError(f"{path}: num_fewshot={options.num_fewshot} needs more than {len(items)} items")
    return Task(name or path.name.removesuffix(".jsonl"), kind, items, str(path),
                hashlib.sha256(text.encode("utf-8")).hexdigest(), options)


def detect_kind(item: dict[str, Any], where: str) -> str:
    if "turns" in item:
        return TOOL_CALL
    if "choices" in item:
        return MULTIPLE_CHOICE
    if "prompt" in item:
        return GENERATION
    if "text" in item:
        return PERPLEXITY
    raise TaskError(f"{where}: cannot tell the task kind (expected a 'choices', 'prompt', 'text' or "
                    f"'turns' field); got fields {sorted(item)}")


def _require(item: dict, key: str, types: type | tuple[type, ...], where: str, what: str) -> Any:
    if key not in item:
        raise TaskError(f"{where}: missing field {key!r} (expected {what})")
    value = item[key]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        raise TaskError(f"{where}: field {key!r} is {type(value).__name__} {_short(value)}, expected {what}")
    return value


def _as_tuple(types):
    return types if isinstance(types, tuple) else (types,)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _validate_id(item: dict, where: str) -> None:
    _require(item, "id", str, where, "a string id")


def _validate_multiple_choice(item: dict, where: str) -> None:
    _validate_id(item, where)
    _require(item, "question", str, where, "a string (the context the choices continue)")
    choices = _require(item, "choices", list, where, "a list of at least 2 strings")
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
    answer = _require(item, "answer", int, where, "the index of the correct choice")
    if not 0 <= answer < len(choices):
        raise TaskError(f"{where}: 'answer' is {answer}, expected an index in [0, {len(choices)})")


def _validate_generation(item: dict, where: str) -> None:
    _validate_id(item, where)
    _require(item, "prompt", str, where, "a string")
    answer = _require(item, "answer", (str, list), where, "a string or a list of accepted strings")
    if isinstance(answer, list) and (not answer or not all(isinstance(a, str) for a in answer)):
        raise TaskError(f"{where}: field 'answer' must be a non-empty list of strings")


def _validate_perplexity(item: dict, where: str) -> None:
    _validate_id(item, where)
    if not _require(item, "text", str, where, "a non-empty string"):
        raise TaskError(f"{where}: field 'text' is empty (expected a non-empty string)")


def _validate_tool_call(item: dict, where: str) -> None:
    _validate_id(item, where)
    fmt = _require(item, "format", str, where, f"one of {TOOL_FORMATS}")
    if fmt not in TOOL_FORMATS:
        raise TaskError(f"{where}: 'format' is {fmt!r}, expected one of {TOOL_FORMATS}")
    turns = _require(item, "turns", list, where, "a non-empty list of {prompt, expect} objects")
    if not turns:
        raise TaskError(f"{where}: 'turns' is empty (expected one turn per gold call plus a final one)")
    for i, turn in enumerate(turns):
        at = f"{where}: turns[{i}]"
        if isinstance(turn, dict) and "prompt_chars" in turn:
            turns[i] = turn = _expand_prompt(item, turn, at)
        if not isinstance(turn, dict) or not isinstance(turn.get("prompt"), str):
            raise TaskError(f"{at}: expected an object with a string 'prompt' or an integer 'prompt_chars'")
        expect = turn.get("expect")
        if not isinstance(expect, dict) or len(expect) != 1 or not ({"tool_call", "final_answer"} & expect.keys()):
            raise TaskError(f"{at}: 'expect' must be {{\"tool_call\": {{name, arguments}}}} or "
                            f"{{\"final_answer\": str}}")
        if "tool_call" in expect:
            call = expect["tool_call"]
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                    and isinstance(call.get("arguments"), dict)):
                raise TaskError(f"{at}: 'expect.tool_call' must have a string 'name' and an object 'arguments'")
        elif not isinstance(expect["final_answer"], (str, int, float)) or isinstance(expect["final_answer"], bool):
            raise TaskError(f"{at}: 'expect.final_answer' must be a string")


def _expand_prompt(item: dict, turn: dict, at: str) -> dict:
    """A turn stored as the length of its prompt in the item's text (ling-data writes turns so,
    keeping the ~5 KB tool list once per sample) as the same turn with the prompt spelled out."""
    text, length = item.get("text"), turn["prompt_chars"]
    if not isinstance(text, str):
        raise TaskError(f"{at}: 'prompt_chars' needs the item's string 'text' (the prompt is text[:prompt_chars])")
    if not isinstance(length, int) or isinstance(length, bool) or not 0 < length <= len(text):
        raise TaskError(f"{at}: 'prompt_chars' is {_short(length)}, expected an integer in [1, {len(text)}] "
                        f"(the prompt's length in the item's text)")
    return {**{k: v for k, v in turn.items() if k != "prompt_chars"}, "prompt": text[:length]}


VALIDATORS = {MULTIPLE_CHOICE: _validate_multiple_choice, GENERATION: _validate_generation,
              PERPLEXITY: _validate_perplexity, TOOL_CALL: _validate_tool_call}


def _read_options(path: Path) -> TaskOptions:
    if not path.exists():
        return TaskOptions()
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise TaskError(f"{path}: not valid TOML ({e})") from None
    return _apply_options(TaskOptions(), values, source=str(path))


def _apply_options(options: TaskOptions, values: dict[str, Any], source: str) -> TaskOptions:
    known = {f.name: f for f in fields(TaskOptions)}
    updates = {}
    for key, value in values.items():
        if value is None:
            continue
        if key not in known:
            raise TaskError(f"{source}: unknown option {key!r} (expected one of {sorted(known)})")
        if key == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
                raise TaskError(f"{source}: 'stop' must be a list of non-empty strings")
            value = tuple(value)
        elif key in ("num_fewshot", "max_new_tokens"):
            if not isinstance(value, int) or isinstance(value, bool) or value < (key == "max_new_tokens"):
                raise TaskError(f"{source}: {key!r} must be an integer >= {int(key == 'max_new_tokens')}, "
                                f"got {value!r}")
        elif not isinstance(value, str):
            raise TaskError(f"{source}: {key!r} must be a string, got {value!r}")
        elif key == "regex":
            try:
                re.compile(value)
            except re.error as e:
                raise TaskError(f"{source}: 'regex' {value!r} is not a valid regular expression ({e})") from None
        updates[key] = value
    return replace(options, **updates)


BUILTIN_DIR = Path(__file__).resolve().parent / "data"


def builtin_tasks() -> dict[str, Path]:
    """The offline task files shipped with ling-eval, by name."""
    return {p.name.removesuffix(".jsonl"): p for p in sorted(BUILTIN_DIR.glob("*.jsonl"))}


def resolve_task(spec: str | Path) -> Task:
    """A task file path, or the name of a built-in task (see `builtin_tasks`)."""
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        return load_task(path)
    builtin = builtin_tasks()
    if str(spec) in builtin:
        return load_task(builtin[str(spec)])
    raise TaskError(f"{spec}: neither a task file nor a built-in task (built-in: {', '.join(builtin)})")
