"""`ling-data` end to end: prepare -> train-tokenizer -> tokenize -> inspect, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ling_data.cli import COMMANDS, main
from ling_data.filters import FilterConfig, failed_filter, normalize
from ling_data.shards import load_manifest, read_shard
from ling_data.tokenizer import CHAT_TEMPLATE_SYMBOLS, Tokenizer


@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory, corpus) -> Path:
    """80 stdlib documents, 10 exact copies, 10 near copies (one word changed) and junk."""
    root = tmp_path_factory.mktemp("raw")
    documents = corpus[:80]
    rng = random.Random(0)
    near = []
    for text in documents[:10]:
        words = text.split(" ")
        words[rng.randrange(len(words))] = "CHANGED"
        near.append(" ".join(words))
    lines = documents + documents[:10] + near + ["tiny", "$$$ %%% ^^^ " * 40]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return root


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_pipeline_end_to_end(raw_corpus: Path, tmp_path: Path, capsys) -> None:
    prepared = tmp_path / "prepared"
    code, out, _ = run(capsys, "prepare", str(raw_corpus), "--out", str(prepared), "--no-progress")
    assert code == 0
    report = json.loads((prepared / "report.json").read_text())
    assert report["read"]["documents"] == 102
    passes = lambda text: failed_filter(normalize(text), FilterConfig()) is None  # noqa: E731
    lines = [json.loads(line)["text"] for line in (raw_corpus / "docs.jsonl").read_text().splitlines()]
    copies, near = lines[80:90], lines[90:100]
    assert report["dropped"]["exact_duplicate"] == sum(map(passes, copies))
    # A one-word change leaves Jaccard ~0.97; LSH at 0.8 must catch each (others may be near, too).
    assert report["dropped"]["near_duplicate"] >= sum(map(passes, near)) >= 5
    assert report["dropped"]["min_chars"] == 1 and report["dropped"]["max_symbol_ratio"] == 1
    assert json.loads(out)["kept"]["documents"] == report["kept"]["documents"]

    model = tmp_path / "tok.model"
    assert run(capsys, "train-tokenizer", str(prepared), "--vocab-size", "600", "--out", str(model))[0] == 0
    tokenizer = Tokenizer.load(model)
    assert [tokenizer.piece(i) for i in range(4, 10)] == list(CHAT_TEMPLATE_SYMBOLS)

    shards = tmp_path / "shards"
    code, out, _ = run(capsys, "tokenize", str(prepared), "--tokenizer", str(model), "--out", str(shards),
                       "--workers", "2", "--shard-mb", "0.05", "--no-progress")
    assert code == 0
    manifest = load_manifest(shards)
    assert len(manifest["shards"]) > 1 and manifest["documents"] == report["kept"]["documents"]
    # The shards hold exactly the prepared documents' tokens, in order.
    from ling_data.readers import read_documents
    expected = [tokenizer.encode(d.text) for d in read_documents([prepared])]
    got = []
    for entry in manifest["shards"]:
        shard = read_shard(shards, entry, manifest["dtype"])
        offsets = [0, *shard.lengths.cumsum().tolist()]
        got += [shard.tokens[a:b].tolist() for a, b in zip(offsets, offsets[1:])]
    assert got == expected

    # One worker writes byte-identical shards.
    single = tmp_path / "single"
    assert run(capsys, "tokenize", str(prepared), "--tokenizer", str(model), "--out", str(single),
               "--workers", "1", "--shard-mb", "0.05", "--no-progress")[0] == 0
    assert [e["sha256"] for e in load_manifest(single)["shards"]] == [e["sha256"] for e in manifest["shards"]]

    code, out, _ = run(capsys, "inspect", str(shards), "--verify", "--document", "1", "--chars", "40")
    summary = json.loads(out)
    assert code == 0 and summary["tokens"] == manifest["tokens"]
    assert summary["sample"]["text"] == tokenizer.decode(expected[1])[:40]


def test_bad_input_exits_2_with_one_line_naming_file_and_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a fine document that is long enough to pass the filters"}\n{"text": \n')
    code, _, err = run(capsys, "prepare", str(bad), "--out", str(tmp_path / "p"), "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.jsonl:2: malformed JSON" in err
    assert not (tmp_path / "p" / "documents.jsonl.zst").exists()  # nothing half written
    code, _, err = run(capsys, "prepare", str(bad), "--out", str(tmp_path / "p"), "--no-progress",
                       "--skip-bad", "--no-filters")
    assert code == 0 and json.loads((tmp_path / "p" / "report.json").read_text())["read"]["skipped"] == {
        "malformed_json": 1}


def test_tokenize_failure_leaves_no_shard_directory(tmp_path: Path, small_tokenizer, capsys) -> None:
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"text": "hello world"}\n' * 50)
    (bad / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    out = tmp_path / "shards"
    code, _, err = run(capsys, "tokenize", str(bad), "--tokenizer", str(small_tokenizer.model_path),
                       "--out", str(out), "--workers", "1", "--shard-mb", "0.0001", "--no-progress")
    assert code == 2 and "b.jsonl:2: invalid UTF-8" in err
    assert not out.exists() and not list(tmp_path.glob(".shards*"))


def test_corrupt_shard_is_reported_by_inspect(tmp_path: Path, small_tokenizer, capsys) -> None:
    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(30)))
    out = tmp_path / "shards"
    assert run(capsys, "tokenize", str(source), "--tokenizer", str(small_tokenizer.model_path),
               "--out", str(out), "--workers", "1", "--no-progress")[0] == 0
    shard = out / "shard-00000.zst"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run(capsys, "inspect", str(out))
    assert code == 2 and "shard-00000.zst: sha256" in err and "does not match" in err


def test_commands_register_with_one_line() -> None:
    assert set(COMMANDS) >= {"prepare", "train-tokenizer", "tokenize", "inspect"}
    for module_name, help_text in COMMANDS.values():
        module = __import__(module_name, fromlist=["run"])
        assert callable(module.add_arguments) and callable(module.run) and help_text


@pytest.mark.parametrize("target", ["file", "missing"])
def test_inspect_of_a_file_or_missing_path_is_one_line(tmp_path: Path, capsys, target: str) -> None:
    path = tmp_path / "shards"
    if target == "file":
        path.write_text("not a directory")
    code, _, err = run(capsys, "inspect", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and ("is a file, not a directory" if target == "file" else "does not exist") in err


def test_existing_outputs_are_never_replaced_without_overwrite(tmp_path: Path, small_tokenizer, capsys) -> None:
    source = tmp_path / "a.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(30)))
    model = tmp_path / "tok.model"
    model.write_bytes(b"earlier work")
    tokenize = ["tokenize", str(source), "--tokenizer", str(small_tokenizer.model_path), "--workers", "1",
                "--no-progress", "--out"]
    shards = tmp_path / "shards"
    assert run(capsys, *tokenize, str(shards))[0] == 0
    before = {p.name: p.read_bytes() for p in shards.iterdir()}

    code, _, err = run(capsys, "train-tokenizer", str(source), "--vocab-size", "300", "--out", str(model))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err and "--overwrite" in err
    assert model.read_bytes() == b"earlier work"
    source.write_text(json.dumps({"text": "a different corpus " * 30}) + "\n")
    code, _, err = run(capsys, *tokenize, str(shards))
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(shards) in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before

    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory holds nothing to lose
    assert run(capsys, *tokenize, str(empty))[0] == 0
    assert run(capsys, *tokenize, str(shards), "--overwrite")[0] == 0
    assert load_manifest(shards)["documents"] == 1
    source.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(30)))
    assert run(capsys, "train-tokenizer", str(source), "--vocab-size", "300", "--out", str(model),
               "--overwrite")[0] == 0
    assert Tokenizer.load(model).vocab_size == 300
