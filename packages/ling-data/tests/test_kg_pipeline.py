"""The real graph, the whole synthesis and the CLI, on a small sample count."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ling_data.kg import (
    Entity,
    Executor,
    KnowledgeGraph,
    SynthesisConfig,
    Triple,
    build_graph,
    check_chain,
    check_sample,
    synthesize,
)
from ling_data.kg.answers import format_answer
from ling_data.kg.cli import main
from ling_data.kg.generate import draw_questions
from ling_data.kg.patterns import PATTERNS
from ling_data.kg.render import FORMATS
from ling_data.kg.split import hold_out

sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # importlib mode: make kg_contract importable
from kg_contract import check_rendering  # noqa: E402

CONTRACT_KEYS = {
    "id",
    "pattern",
    "hops",
    "format",
    "entities",
    "question",
    "calls",
    "answer",
    "text",
    "turns",
}
CONFIG = SynthesisConfig(samples_per_pattern=6, seed=3)


@pytest.fixture(scope="module")
def graph() -> KnowledgeGraph:
    return build_graph()


@pytest.fixture(scope="module")
def executor(graph: KnowledgeGraph) -> Executor:
    return Executor(graph)


@pytest.fixture(scope="module")
def synthesis(graph: KnowledgeGraph):
    return synthesize(CONFIG, graph)


def test_graph_holds_real_facts(graph: KnowledgeGraph, executor: Executor) -> None:
    assert executor.call("get_capital", {"country": "Kenya"}) == "Nairobi"
    assert executor.call("get_capital", {"country": "France"}) == "Paris"
    assert executor.call("get_continent", {"country": "Japan"}) == "Asia"
    assert executor.call("get_currency", {"country": "Japan"}) == "JPY"
    assert executor.call("get_city_country", {"city": "Osaka"}) == "Japan"
    assert "Germany" in executor.call("get_neighbours", {"country": "France"})
    assert 60e6 < executor.call("get_population", {"country": "France"}) < 80e6
    assert executor.call("countries_with_currency", {"currency": "EUR"}).count("Germany") == 1
    assert len(graph.entities("country")) > 200 and len(graph.entities("continent")) == 7
    for country in graph.entities("country"):  # borders are symmetric, and never reflexive
        for neighbour in graph.objects(country, "borders"):
            assert country in graph.objects(neighbour, "borders") and neighbour != country
    for city in graph.entities("city"):
        assert (
            isinstance(graph.value(city, "located_in"), Entity)
            and graph.value(city, "population") > 0
        )


def test_samples_follow_the_contract(synthesis) -> None:
    rows = synthesis.train + synthesis.test
    assert {row["pattern"] for row in rows} == {p.name for p in PATTERNS}
    assert len({row["id"] for row in rows}) == len(rows)
    for row in rows:
        assert set(row) == CONTRACT_KEYS
        assert (
            row["format"] in FORMATS and row["hops"] == len(row["calls"]) and 1 <= row["hops"] <= 4
        )
        assert row["text"].startswith("<|im_start|>system\nYou can call these tools:\n")
        assert json.loads(json.dumps(row)) == row  # plain JSON values only
        assert all(set(turn) == {"prompt_chars", "expect"} for turn in row["turns"])  # tools once per sample
        check_rendering(row)
    hops = {row["hops"] for row in rows}
    assert hops == {1, 2, 3, 4}


def test_every_emitted_chain_reexecutes_to_its_answer(synthesis, executor: Executor) -> None:
    for row in synthesis.train + synthesis.test:
        assert check_sample(row, executor) is None, row["id"]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_verifier_rejects_tampered_samples(synthesis, executor: Executor, data) -> None:
    rows = synthesis.train + synthesis.test
    row = rows[data.draw(st.integers(0, len(rows) - 1), label="row")]
    tampered = json.loads(json.dumps(row))
    how = data.draw(st.sampled_from(["answer", "result", "argument", "drop_call"]))
    index = data.draw(st.integers(0, len(row["calls"]) - 1))
    call = tampered["calls"][index]
    if how == "answer":
        tampered["answer"] = "Atlantis " + row["answer"]
    elif how == "result":
        result = call["result"]
        call["result"] = (
            result + 1 if isinstance(result, (int, float)) else [] if result else ["Atlantis"]
        )
        if isinstance(result, str):
            call["result"] = result + "x"
    elif how == "argument":
        key = sorted(call["arguments"])[0]
        value = call["arguments"][key]
        call["arguments"][key] = (
            value + 1
            if isinstance(value, (int, float))
            else (value + ["Atlantis"] if isinstance(value, list) else value + "x")
        )
    else:
        del tampered["calls"][index]
    assert check_sample(tampered, executor) is not None


def test_no_held_out_entity_appears_in_train(synthesis, graph: KnowledgeGraph) -> None:
    split = hold_out(graph, CONFIG.test_fraction, CONFIG.seed)
    held_out_names = {entity.split(":", 1)[1] for entity in split.test_entities}
    assert synthesis.test and synthesis.train

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)

    for row in synthesis.train:
        assert not set(row["entities"]) & split.test_entities, row["id"]
        assert not set(strings(row["calls"])) & held_out_names, row["id"]
        assert row["answer"] not in held_out_names
    for row in synthesis.test:
        assert set(row["entities"]) & split.test_entities, row["id"]
    for row in synthesis.eval_gen:
        subject = row["prompt"].rsplit(" ", 1)[-1].removesuffix("?\nA:")
        assert any(name.endswith(subject) for name in held_out_names)


def test_eval_sets_follow_the_contract(synthesis) -> None:
    assert synthesis.eval_mc and synthesis.eval_gen
    for row in synthesis.eval_mc:
        assert set(row) == {"id", "question", "choices", "answer"}
        assert len(row["choices"]) == 4 == len(set(row["choices"])) and 0 <= row["answer"] < 4
    capital_of_kenya = [r for r in synthesis.eval_mc if r["question"] == "The capital of Kenya is"]
    if capital_of_kenya:  # only when Kenya is held out under this seed
        assert capital_of_kenya[0]["choices"][capital_of_kenya[0]["answer"]] == " Nairobi"
    for row in synthesis.eval_gen:
        assert set(row) == {"id", "prompt", "answer"} and row["answer"]
    for row in synthesis.eval_gen:
        assert len(row["answer"]) == len(set(row["answer"]))
    brazil = [
        r for r in synthesis.eval_gen if r["prompt"] == "Q: What is the capital of Brazil?\nA:"
    ]
    if brazil:
        assert brazil[0]["answer"] == ["Brasília", "Brasilia"]
    euro = [r for r in synthesis.eval_gen if "EUR" in r["answer"]]
    assert all("Euro" in r["answer"] for r in euro)


def test_report_counts_add_up(synthesis) -> None:
    report = synthesis.report
    assert report["train_samples"] == len(synthesis.train) and report["test_samples"] == len(
        synthesis.test
    )
    for counts in report["patterns"].values():
        assert counts["generated"] == (
            counts["dropped_by_verifier"]
            + counts["dropped_as_duplicates"]
            + counts["train"]
            + counts["test"]
        )
    assert report["train_samples"] == report["train_questions"] * len(CONFIG.formats)
    assert report["held_out"]["types"] == ["country", "city"]


def test_same_seed_same_data_other_seed_other_data(synthesis, graph: KnowledgeGraph) -> None:
    again = synthesize(CONFIG, graph)
    assert (
        again.train == synthesis.train
        and again.test == synthesis.test
        and again.eval_mc == synthesis.eval_mc
    )
    other = synthesize(replace(CONFIG, seed=CONFIG.seed + 1), graph)
    assert [r["question"] for r in other.train] != [r["question"] for r in synthesis.train]


def test_cli_writes_every_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "kg"
    assert (
        main(["--out", str(out), "--samples-per-pattern", "2", "--formats", "react", "--seed", "1"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert summary["train_samples"] == len(train) == report["train_samples"]
    assert summary["test_samples"] == len(test) == report["test_samples"]
    assert {row["format"] for row in train + test} == {"react"}
    tools = json.loads((out / "tools.json").read_text())
    assert {tool["function"]["name"] for tool in tools} >= {"get_capital", "argmax", "divide"}
    for name in ("eval/kg_mc.jsonl", "eval/kg_gen.jsonl", "triples.jsonl"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--formats", "xml"], "formats must be a non-empty subset"),
        (["--patterns", "capital,nope"], "unknown pattern(s) ['nope']"),
        (["--test-fraction", "1.5"], "test fraction must be in [0, 1)"),
        (["--samples-per-pattern", "0"], "samples per pattern must be >= 1"),
    ],
)
def test_cli_bad_flags_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags, message
) -> None:
    assert main(["--out", str(tmp_path / "kg"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "kg").exists()


def test_readme_command_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The README's kg command, with its flags as written (fewer questions to stay fast)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Tool-use data from a knowledge graph", 1)[1]
    [command] = re.findall(r"```bash\n(.*?)\n```", section, flags=re.DOTALL)
    argv = shlex.split(command.split("#", 1)[0])
    assert argv[:4] == ["uv", "run", "python", "-m"] and argv[4] == "ling_data.kg"
    flags = [str(tmp_path / arg) if arg == "data/kg" else arg for arg in argv[5:]]
    assert main([*flags, "--samples-per-pattern", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["train_samples"] > 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_pattern_verifies_under_any_seed(graph: KnowledgeGraph, executor: Executor, seed: int) -> None:
    """Whatever binding a seed draws, executing the plan reproduces the graph's own answer."""
    for pattern in PATTERNS:
        for draft in draw_questions(pattern, graph, executor, count=1, seed=seed):
            assert draft.error is None, (pattern.name, draft.slots, draft.error)
            assert check_chain(pattern, draft.calls, format_answer(draft.truth), executor) is None


def test_cli_refuses_an_out_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file"), "--samples-per-pattern", "1"]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_outputs_are_byte_identical_across_processes(tmp_path: Path) -> None:
    """Same seed, different PYTHONHASHSEED: no output may depend on set or dict hash order."""
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        command = [sys.executable, "-m", "ling_data.kg", "--out", str(out), "--samples-per-pattern", "3"]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        outputs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 7


def test_patterns_on_a_sparse_graph_draw_only_what_it_supports() -> None:
    """One country with a population and nothing else: the population lookup is drawn (and
    verifies); every pattern needing a missing fact draws nothing instead of failing."""
    lonely = KnowledgeGraph([Triple(Entity("country", "Lonely"), "population", 1)])
    executor = Executor(lonely)
    drawn = {}
    for pattern in PATTERNS:
        drafts = draw_questions(pattern, lonely, executor, count=2, seed=0)
        drawn[pattern.name] = len(drafts)
        for draft in drafts:
            assert check_chain(pattern, draft.calls, format_answer(draft.truth), executor) is None
    assert drawn.pop("population") == 1 and set(drawn.values()) == {0}
