"""`ling-train --eval-every N`: eval rows in metrics.jsonl, bad eval tasks rejected up front."""

import json

from ling_train.cli import main


def test_eval_every_writes_eval_rows(tmp_path, small_run_toml, capsys):
    config = tmp_path / "eval.toml"
    config.write_text('eval_limit = 6\neval_tasks = ["facts_mc", "corpus_ppl"]\n' + small_run_toml.read_text())
    out = tmp_path / "run"
    assert main(["--config", str(config), "--steps", "6", "--eval-every", "4", "--out", str(out),
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/facts_mc" in r]
    assert [r["step"] for r in evals] == [4, 6]  # every 4 steps, and at the end
    for row in evals:
        assert 0 <= row["eval/facts_mc/ci_low"] <= row["eval/facts_mc"] <= row["eval/facts_mc/ci_high"] <= 1
        assert row["eval/corpus_ppl"] > 0 and "loss" not in row
    # the step-4 eval row follows the step-4 training row
    step4 = [i for i, r in enumerate(rows) if r.get("step") == 4 and "event" not in r]
    assert "lm_loss" in rows[step4[0]] and "eval/facts_mc" in rows[step4[1]]
    assert summary["eval"]["step"] == 6 and summary["steps"] == 6


def test_bad_eval_task_is_a_one_line_error_before_anything_is_written(tmp_path, small_run_toml, capsys):
    config = tmp_path / "eval.toml"
    config.write_text('eval_tasks = ["no_such_task"]\n' + small_run_toml.read_text())
    out = tmp_path / "run"
    assert main(["--config", str(config), "--eval-every", "2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_task: neither a task file nor a built-in task" in err[0]
    assert not out.exists()
