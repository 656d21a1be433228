"""`ling-train --eval-every N`: eval rows in metrics.jsonl, bad eval tasks rejected up front."""

import json

import torch

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
        assert row["eval/corpus_ppl"] > 0 and "loss" not in row and row["eval_weights"] == "global"
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


def test_an_eval_forward_is_not_a_training_forward_under_edit():
    """EDiT finishes a sync in the forward pre-hooks of the next forward. The eval scores a plain
    copy of the weights, so a sync pending at an eval step stays pending for the next training
    forward and the scored weights are the worker's own (one process: finishing the sync would
    reset them to the outer-stepped anchor, visibly)."""
    from ling_core import LingConfig, build_model
    from ling_core.model import DecoderLayer
    from ling_data import cached_tokenizer, embedded_corpus
    from ling_dist import EDiT
    from ling_train.config import RunConfig
    from ling_train.distributed import DistSetup
    from ling_train.eval_callback import EvalCallback, load_eval_tasks, scored_weights
    from ling_train.trainer import Trainer, TrainerSettings

    model_config = LingConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                              num_experts_per_tok=2, moe_intermediate_size=16)
    model = build_model(model_config, seed=0)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    edit = EDiT(model, inner, sync_every=1, units=[m for m in model.modules() if isinstance(m, DecoderLayer)])
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    model(ids, ids).loss.backward()
    edit.step(tokens=ids.numel())  # a sync point: the exchange waits for the next forward
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    setup = DistSetup("edit", 0, 1, torch.device("cpu"), model=model, local_sgd=edit)
    weights, label = scored_weights(setup, RunConfig(dist="edit"), model)
    rows = []
    callback = EvalCallback(1, load_eval_tasks(["corpus_ppl", "facts_mc"]),
                            cached_tokenizer(embedded_corpus(), vocab_size=512).model_path, rows.append,
                            weights, model_config, label, limit=2, local_sgd=True)
    trainer = Trainer(model, inner, None, None, TrainerSettings(total_steps=1), torch.device("cpu"), [callback])
    trainer.step = 1
    callback.on_train_start(trainer)
    callback.score(trainer, 1)  # corpus_ppl runs the model's full forward
    assert rows and rows[0]["step"] == 1 and rows[0]["eval/corpus_ppl"] > 0 and rows[0]["eval_weights"] == "global"
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    callback.on_train_end(trainer)  # nothing changed since: no second row
    assert len(rows) == 1
    with torch.no_grad():
        model(ids)  # the next forward is where the sync happens
    assert not all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    # As at the end of a run, whose final sync completes after the last step's row: scored again.
    callback.on_train_end(trainer)
    assert [row["step"] for row in rows] == [1, 1] and rows[1]["eval/corpus_ppl"] != rows[0]["eval/corpus_ppl"]
