from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs() -> None:
    [example] = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    exec(compile(example, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_command_lines_run(tmp_path, monkeypatch, corpus) -> None:
    """The `ling-data` lines of the README's console block, run in order on a small corpus."""
    import json
    import shlex

    from ling_data.cli import main

    [console] = re.findall(r"```console\n(.*?)```", README.read_text(), flags=re.DOTALL)
    commands = [shlex.split(line.removeprefix("$ "), comments=True) for line in console.splitlines()]
    commands = [argv for argv in commands if argv and argv[0] == "ling-data"]
    assert [argv[1] for argv in commands] == ["prepare", "train-tokenizer", "tokenize", "inspect"]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:80]))
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert main([*argv[1:], *(["--no-progress"] if argv[1] in ("prepare", "tokenize") else [])]) == 0, argv
    assert (tmp_path / "shards" / "manifest.json").is_file()
