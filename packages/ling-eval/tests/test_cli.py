"""`ling-eval` end to end with a stand-in loader (the real Ling loader is tested at the root)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ling_eval.cli import main
from ling_eval.toy import ByteTokenizer, TinyTransformer


def load_toy(path: Path, device):
    """--loader target: a TinyTransformer whose weights are in `path`/weights.pt."""
    model = TinyTransformer(max_length=128)
    try:
        model.load_state_dict(torch.load(path / "weights.pt"))
    except Exception as e:
        from ling_eval import CheckpointLoadError
        raise CheckpointLoadError(f"{path / 'weights.pt'}: corrupt ({type(e).__name__})") from None
    return model.eval().as_eval_model(), ByteTokenizer()


LOADER = "test_cli:load_toy"


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    for step, seed in ((10, 0), (20, 1), (5, 2)):
        ckpt = run / "checkpoints" / f"step-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "config.json").write_text(json.dumps({"model_type": "toy"}))
        torch.save(TinyTransformer(max_length=128, seed=seed).state_dict(), ckpt / "weights.pt")
    (run / "checkpoints" / ".step-30.tmp").mkdir()  # an interrupted save is ignored
    return run


def test_run_directory_gives_results_report_and_plots(run_dir, capsys):
    out = run_dir / "eval"
    assert main([str(run_dir), "--loader", LOADER, "--tasks", "facts_mc", "corpus_ppl", "--limit", "6",
                 "--compare", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in result["checkpoints"]] == [5, 10, 20]
    scores = result["checkpoints"][0]["scores"]
    assert scores["facts_mc"]["metric"] == "acc" and scores["corpus_ppl"]["metric"] == "bits_per_byte"
    assert len(result["comparisons"]) == 2 and "paired items" in result["comparisons"][0]
    full = json.loads((out / "results.json").read_text())
    first = full["runs"][0]["results"][0]
    assert len(first["sha256"]) == 64 and first["seed"] == 0 and len(first["item_ids"]) == 6
    report = (out / "report.md").read_text()
    assert "## facts_mc (multiple_choice)" in report and "| `step-20` | 20 |" in report
    for task in ("facts_mc", "corpus_ppl"):  # with the run's other plots
        assert (run_dir / "plots" / f"eval_{task}.png").read_bytes()[:4] == b"\x89PNG"


def test_explicit_out_holds_everything(run_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert main([str(run_dir / "checkpoints" / "step-5"), "--loader", LOADER, "--tasks", "facts_gen",
                 "--limit", "3", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoints"][0]["scores"]["facts_gen"]["metric"] == "exact_match"
    assert (out / "plots" / "eval_facts_gen.png").exists() and (out / "report.md").exists()


def test_list_tasks(capsys):
    assert main(["--list-tasks"]) == 0
    listed = capsys.readouterr().out
    assert "facts_mc\tmultiple_choice" in listed and "corpus_ppl\tperplexity" in listed


@pytest.mark.parametrize("make_args, message", [
    (lambda run: [str(run / "nope")], "nope: does not exist"),
    (lambda run: [str(run / "checkpoints" / "step-10"), "--tasks", str(run / "missing.jsonl")], "task file not found"),
    (lambda run: [str(run / "checkpoints" / "step-10"), "--limit", "0"], "--limit: must be >= 1"),
    (lambda run: [str(run / "checkpoints" / "step-10")], "no loader for model_type 'toy'"),
    (lambda run: [str(run / "checkpoints" / "step-10"), "--loader", "nomodule:f"], "--loader: cannot import"),
    (lambda run: [str(run / "checkpoints" / "step-10"), "--compare", "--loader", LOADER], "--compare: needs"),
    (lambda run: [], "give at least one checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, capsys, make_args, message):
    assert main(make_args(run_dir) + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ling-eval: error: ") and message in err[0]


def test_corrupt_weights_are_a_one_line_error(run_dir, capsys):
    ckpt = run_dir / "checkpoints" / "step-10"
    (ckpt / "weights.pt").write_bytes(b"garbage")
    assert main([str(ckpt), "--loader", LOADER, "--tasks", "facts_mc", "--no-progress"]) == 2
    assert "weights.pt: corrupt" in capsys.readouterr().err


def test_console_script_is_installed_and_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ling_eval.cli", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("make_out, message", [
    (lambda tmp: tmp / "taken.json", "taken.json exists and is not a directory"),
    (lambda tmp: tmp / "ro" / "results", "cannot write to"),
])
def test_unusable_out_is_one_line_before_any_evaluation(run_dir, tmp_path, capsys, monkeypatch, read_only_below,
                                                          make_out, message):
    """Was a FileExistsError traceback after the whole evaluation ran (its results lost)."""
    out = make_out(tmp_path)
    (tmp_path / "taken.json").write_text("{}")
    (tmp_path / "ro").mkdir()
    read_only_below(tmp_path / "ro")
    import importlib

    def must_not_run(*args, **kwargs):
        raise AssertionError("evaluated before checking --out")
    monkeypatch.setattr(importlib.import_module("ling_eval.evaluate"), "evaluate_task", must_not_run)
    assert main([str(run_dir / "checkpoints" / "step-10"), "--loader", LOADER, "--tasks", "facts_mc",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ling-eval: error: --out: ") and message in err[0], err
    if out.parent.name == "ro":
        assert "Read-only file system" in err[0] and str(tmp_path / "ro") in err[0]
    if out.name == "taken.json":
        assert out.read_text() == "{}"
