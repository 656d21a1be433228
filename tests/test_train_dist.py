"""`ling-train --nproc 2 --dist ...` end to end: real processes (torchrun, gloo on CPU), a tiny model.

Each launch costs ~10 s of CPU (torch imported by the launcher and both ranks) and 20-40 s of
wall time on a loaded 2-core machine, so the default tests run their launches concurrently and
the longer scenarios are marked slow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ling_train.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importlib mode: make the helpers importable
from train_dist_testing import (assert_eval_row_matches_checkpoint, finish, launch, rank_states, rows,  # noqa: E402
                                weights, write_config)

pytestmark = pytest.mark.dist


def test_ddp_ranks_agree_and_diloco_h1_equals_ddp(tmp_path):
    """Plain SGD inner optimizer, no clipping or weight decay (both differ per rank by design):
    DiLoCo with H=1, outer lr 1 and no momentum averages the ranks' updated weights, which is
    the DDP step on the averaged gradient up to fp32 summation order."""
    config = write_config(tmp_path, lr=0.05, extra='optimizer = "sgd"\ngrad_clip = 0.0\nweight_decay = 0.0\n'
                                                  "checkpoint_every = 0\n")
    ddp = launch("--config", str(config), "--steps", "4", "--out", str(tmp_path / "ddp"), "--dist", "ddp")
    diloco = launch("--config", str(config), "--steps", "4", "--out", str(tmp_path / "diloco"), "--dist", "diloco",
                    "--sync-every", "1", "--outer-lr", "1", "--outer-momentum", "0")
    ddp_summary, diloco_summary = finish(ddp), finish(diloco)
    for summary in (ddp_summary, diloco_summary):
        assert summary["world_size"] == 2 and summary["steps"] == 4 and math.isfinite(summary["final_loss"])
    # DDP: both ranks end with the same weights (fingerprints written by each rank).
    ddp_states = rank_states(tmp_path / "ddp" / "checkpoints" / "step-4")
    assert ddp_states[0]["params_sha256"] == ddp_states[1]["params_sha256"]
    # DiLoCo synced at the last step: ranks identical too, and logged 4 syncs with their bytes.
    diloco_states = rank_states(tmp_path / "diloco" / "checkpoints" / "step-4")
    assert diloco_states[0]["params_sha256"] == diloco_states[1]["params_sha256"]
    syncs = [r for r in rows(tmp_path / "diloco") if r.get("event") == "sync"]
    assert [r["step"] for r in syncs] == [1, 2, 3, 4] and all(r["tokens"] == [128, 128] for r in syncs)
    assert diloco_summary["bytes_communicated"] == syncs[-1]["bytes_communicated"] > 0
    # The same losses and weights as DDP within fp32 tolerance (values ~0.02-1, 4 steps).
    ddp_losses = [r["loss"] for r in rows(tmp_path / "ddp") if "loss" in r]
    diloco_losses = [r["loss"] for r in rows(tmp_path / "diloco") if "loss" in r]
    assert ddp_losses == pytest.approx(diloco_losses, rel=1e-5)
    a, b = weights(tmp_path / "ddp" / "checkpoints" / "step-4"), weights(tmp_path / "diloco" / "checkpoints" / "step-4")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("argv, message", [
    (["--dist", "ddp", "--sync-every", "4"], "sync_every (--sync-every) applies to --dist diloco or edit"),
    (["--dist", "edit", "--sync-seconds", "2"], "applies to --dist aedit"),
    (["--dist", "ddp", "--outer-lr", "0.5"], "--outer-lr: applies to --dist diloco, edit or aedit"),
    (["--dist", "diloco", "--expert-parallel", "2"], "needs --dist ddp or fsdp"),
    (["--nproc", "2"], "--nproc: several processes need --dist"),
    (["--nproc", "2", "--dist", "fsdp", "--expert-parallel", "4"], "--expert-parallel 4: must divide --nproc 2"),
    (["--dist", "zero3"], "dist: unknown mode 'zero3'"),
    (["--dist", "ddp", "--device", "mixed"], "(--device mixed) needs --dist diloco, edit or aedit"),
    (["--dist", "fsdp", "--batch-size", "3,1"], "batch_size (--batch-size) 3,1: per-process sizes need --dist "
                                                "diloco, edit or aedit, not fsdp"),
    (["--batch-size", "8,x"], "--batch-size: expected a positive int or a comma-separated list of them"),
    (["--nproc", "3", "--dist", "edit", "--batch-size", "3,1"], "3,1: 2 per-process sizes, but the run has 3"),
    (["--dist", "diloco", "--batch-size", "3,1"], "3,1: 2 per-process sizes, but the run has 1"),  # found in the rank
])
def test_invalid_combinations_exit_2_with_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_device_mixed_is_the_local_gpu_or_else_the_cpu(tmp_path, capsys):
    """`--device mixed` picks, per process, cuda:LOCAL_RANK if that GPU exists, else the CPU (here,
    one process: the same run as naming that device). The 2-rank CPU+GPU job: tests/test_train_gpu.py."""
    config = write_config(tmp_path, extra="checkpoint_every = 0\n")
    own = "cuda:0" if torch.cuda.is_available() else "cpu"
    summaries = []
    for name, device in (("mixed", "mixed"), ("own", own)):
        assert main(["--config", str(config), "--dist", "diloco", "--device", device, "--steps", "2",
                     "--out", str(tmp_path / name), "--no-progress"]) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    assert summaries[0]["device"] == summaries[1]["device"] == own
    assert summaries[0]["first_loss"] == summaries[1]["first_loss"]
    assert summaries[0]["final_loss"] == summaries[1]["final_loss"]


def assert_one_line_exit_2(process: subprocess.Popen, message: str) -> None:
    """Exit 2 and, after the ranks' progress lines, exactly one line: the error, printed once."""
    _, stderr = process.communicate(timeout=600)
    errors = [line for line in stderr.splitlines() if not line.startswith(("rank ", "Bytecode compiled"))]
    assert process.returncode == 2, stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("ling-train: error: ") and message in errors[0], stderr


def test_bad_input_found_by_the_ranks_exits_2_with_one_line(tmp_path):
    """What only the ranks detect, after torchrun started them: exit 2 and the rank's one line,
    not torchrun's exit 1 and failure dump. An internal error in a rank still exits 1 with its
    traceback."""
    three_experts = write_config(tmp_path, extra="checkpoint_every = 0\n").read_text().replace(
        "num_experts = 4", "num_experts = 3")
    (tmp_path / "three.toml").write_text(three_experts)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{not json")  # a corrupted shard directory
    expert_parallel = launch("--config", str(tmp_path / "three.toml"), "--steps", "2", "--out", str(tmp_path / "ep"),
                             "--dist", "fsdp", "--expert-parallel", "2")
    data = launch("--config", str(write_config(tmp_path)), "--steps", "2", "--out", str(tmp_path / "data"),
                  "--dist", "ddp", "--data", str(tmp_path / "shards"), "--max-restarts", "1")
    crash = subprocess.Popen([sys.executable, "-m", "ling_train.launch", "--standalone", "--nproc-per-node=2",
                              str(Path(__file__).with_name("crashing_rank.py")), "--dist", "ddp", "--no-progress",
                              "--out", str(tmp_path / "crash")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_line_exit_2(expert_parallel, "--expert-parallel 2: must divide num_experts (3)")
    assert_one_line_exit_2(data, f"{tmp_path / 'shards' / 'manifest.json'}: not valid JSON")
    _, stderr = crash.communicate(timeout=600)
    assert crash.returncode == 1, stderr[-3000:]
    assert "[rank1]: Traceback" in stderr and "RuntimeError: injected internal error on rank 1" in stderr, stderr
    assert "ChildFailedError" in stderr  # torchrun's report of which ranks failed


def test_a_restart_after_bad_input_stops_before_doing_any_work(tmp_path, monkeypatch, capsys):
    """torchrun --max-restarts restarts a rank that exited 2 like a crash; the restarted rank finds
    the earlier attempt's one-line report and exits 2 at once, quietly (the launcher prints that
    line), instead of repeating the same failing start. Without the report this argv would train."""
    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / "rank-1.txt").write_text("ling-train: error: --data: bad\n")
    monkeypatch.setenv("LING_TRAIN_ERROR_DIR", str(errors))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    config = write_config(tmp_path)
    assert main(["--config", str(config), "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert not (tmp_path / "run").exists() and capsys.readouterr().err == ""


def test_edit_resume_mid_interval_reproduces_the_uninterrupted_run(tmp_path):
    """EDiT, 2 ranks, sync every 2 steps; the step-3 checkpoint is mid-interval, so it must carry
    each rank's own weights, the anchor, the outer momentum and the penalty's EWMA."""
    config = write_config(tmp_path, extra="checkpoint_every = 3\n")
    common = ["--dist", "edit", "--sync-every", "2", "--outer-momentum", "0.8"]
    finish(launch("--config", str(config), "--steps", "6", "--out", str(tmp_path / "full"), *common))
    step3 = rank_states(tmp_path / "full" / "checkpoints" / "step-3")
    assert step3[0]["params_sha256"] != step3[1]["params_sha256"]  # ranks diverged since the step-2 sync
    assert step3[1]["optimizer"]["outer_optimizer"]["state"]  # the outer momentum is in the checkpoint
    finish(launch("--resume", str(tmp_path / "full" / "checkpoints" / "step-3"), "--out", str(tmp_path / "resumed")))
    full = {r["step"]: r["loss"] for r in rows(tmp_path / "full") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in rows(tmp_path / "resumed") if "loss" in r}
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in resumed)  # exact
    a, b = (rank_states(tmp_path / run / "checkpoints" / "step-6") for run in ("full", "resumed"))
    assert a[0]["params_sha256"] == a[1]["params_sha256"] == b[0]["params_sha256"] == b[1]["params_sha256"]
    wa, wb = weights(tmp_path / "full" / "checkpoints" / "step-6"), weights(tmp_path / "resumed" / "checkpoints" / "step-6")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_aedit_and_fsdp_train_to_a_finite_loss(tmp_path):
    """A-EDiT also evaluates in training: its ranks reach `step % N` at different times, so rank 0
    scores its own weights alone (no collective that could hang)."""
    config = write_config(tmp_path, extra="checkpoint_every = 0\neval_limit = 4\n")
    aedit = launch("--config", str(config), "--steps", "6", "--out", str(tmp_path / "aedit"), "--dist", "aedit",
                   "--sync-seconds", "0.3", "--eval-every", "2")
    fsdp = launch("--config", str(config), "--steps", "4", "--out", str(tmp_path / "fsdp"), "--dist", "fsdp")
    aedit_summary, fsdp_summary = finish(aedit), finish(fsdp)
    assert math.isfinite(aedit_summary["final_loss"]) and math.isfinite(fsdp_summary["final_loss"])
    assert weights(Path(fsdp_summary["checkpoint"])).keys()  # whole HF weights gathered from the shards
    syncs = [r for r in rows(tmp_path / "aedit") if r.get("event") == "sync"]
    assert syncs and syncs[-1]["global_inner_steps"] >= 12  # stopped on all ranks' steps, agreed at a sync
    state = rank_states(tmp_path / "aedit" / "checkpoints" / f"step-{aedit_summary['steps']}")
    assert state[0]["params_sha256"] == state[1]["params_sha256"]  # ended on a sync
    # rank 0's eval rows at its own steps 2, 4, ... and at its last step; the last step's row
    # twice when the final sync completed after it (at the end), so the last row is the final model
    evals = [r for r in rows(tmp_path / "aedit") if "eval/facts_mc" in r]
    last = aedit_summary["steps"]
    steps = [r["step"] for r in evals]
    assert sorted(set(steps)) == [*range(2, last + 1, 2), *([last] if last % 2 else [])]
    assert steps == sorted(steps) and len(steps) - len(set(steps)) <= 1 and aedit_summary["eval"] == evals[-1]
    assert all(r["eval_weights"] == "rank0_local" for r in evals)
    assert_eval_row_matches_checkpoint(evals[-1], Path(aedit_summary["checkpoint"]), ["facts_mc", "corpus_ppl"], 4)


@pytest.mark.slow
def test_plus_structure_fsdp_expert_parallel_at_reduced_width(tmp_path):
    """`--size plus` keeps its structure (first dense layer, shared experts, top-k, norm head) with
    [model] overrides shrinking widths, layers and experts; FSDP2 + expert parallel over 2 ranks."""
    config = tmp_path / "plus.toml"
    config.write_text('size = "plus"\nseq_len = 32\nbatch_size = 2\nwarmup_steps = 1\ncheckpoint_every = 0\n'
                      'eval_limit = 4\n\n'
                      "[model]\nvocab_size = 512\nhidden_size = 64\nintermediate_size = 128\nnum_hidden_layers = 3\n"
                      "num_attention_heads = 2\nnum_key_value_heads = 1\nhead_dim = 32\nnum_experts = 8\n"
                      "moe_intermediate_size = 32\n")
    with_ep = launch("--config", str(config), "--steps", "3", "--out", str(tmp_path / "plus"),
                     "--dist", "fsdp", "--expert-parallel", "2", "--eval-every", "2")
    without_ep = launch("--config", str(config), "--steps", "3", "--out", str(tmp_path / "fsdp"), "--dist", "fsdp")
    summary, _ = finish(with_ep), finish(without_ep)
    assert summary["world_size"] == 2 and math.isfinite(summary["final_loss"])
    written = (tmp_path / "plus" / "config.toml").read_text()
    assert 'size = "plus"' in written and "expert_parallel = 2" in written
    # Expert parallel changes where experts live, not the arithmetic: the same losses and global
    # gradient norms (clipped by the optimizer front) as FSDP2 alone, to fp32 summation order.
    ep, plain = ([r for r in rows(tmp_path / run) if "loss" in r] for run in ("plus", "fsdp"))
    assert [r["loss"] for r in ep] == pytest.approx([r["loss"] for r in plain], rel=1e-4)
    assert [r["grad_norm"] for r in ep] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-4)
    assert ep[0]["grad_norm"] > 1.0  # the default clip (1.0) was active, so the clip scale was tested too
    # In-training eval of sharded weights (FSDP2 shards and experts gathered whole to rank 0) at
    # steps 2 and 3 (the end); the last row is the final checkpoint's score, evaluated here.
    evals = [r for r in rows(tmp_path / "plus") if "eval/facts_mc" in r]
    assert [r["step"] for r in evals] == [2, 3] and all(r["eval_weights"] == "global" for r in evals)
    assert summary["eval"] == evals[-1]
    assert_eval_row_matches_checkpoint(evals[-1], Path(summary["checkpoint"]), ["facts_mc", "corpus_ppl"], 4)


def small_documents(path: Path) -> Path:
    """A seeded JSONL corpus of made-up words (~70 KB): `--data` with it spares every process the
    ~6 s of parsing the embedded stdlib corpus."""
    import random
    rng = random.Random(0)
    syllables = [a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=200)) + "."}) + "\n" for _ in range(60)))
    return path


def test_resume_with_other_batch_sizes_continues_after_the_consumed_windows(tmp_path):
    """Another --batch-size on resume (same process count): the loader continues after the windows
    consumed so far, counted with the old sizes: 2 steps x 3 rows = 6 windows = 3 batches of 2."""
    config, docs = write_config(tmp_path, extra="checkpoint_every = 0\n"), small_documents(tmp_path / "docs.jsonl")
    common = ["--dist", "diloco", "--no-progress"]
    assert main(["--config", str(config), "--data", str(docs), "--batch-size", "3", "--steps", "2",
                 "--out", str(tmp_path / "run"), *common]) == 0
    assert main(["--resume", str(tmp_path / "run" / "checkpoints" / "step-2"), "--batch-size", "2", "--steps", "3",
                 "--out", str(tmp_path / "resumed"), *common]) == 0
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "step-3" / "trainer_state" / "state.pt",
                       weights_only=False)
    assert state["loader"]["position"] == 4 and state["loader"]["batch_sizes"] == [2]
    assert [r["tokens"] for r in rows(tmp_path / "resumed") if "loss" in r] == [2 * 32]


def test_a_resume_state_that_does_not_fit_the_flags_exits_2_with_one_line(tmp_path, capsys):
    """Found only when the trainer loads the state (here EDiT's sync schedule): one line naming the
    checkpoint, exit 2, and no run directory (not an internal error's traceback)."""
    config = write_config(tmp_path, extra="checkpoint_every = 2\n")
    assert main(["--config", str(config), "--dist", "edit", "--sync-every", "4", "--steps", "2",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    step2 = tmp_path / "run" / "checkpoints" / "step-2"
    assert main(["--resume", str(step2), "--sync-every", "2", "--steps", "3", "--out", str(tmp_path / "other"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ling-train: error: --resume {step2}: ") and "sync_every" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_diloco_per_process_batch_sizes(tmp_path):
    """`--batch-size 3,1`: rank 0 steps on 3 sequences and rank 1 on 1; every sync reports each
    rank's own tokens and weights the average 3:1; the loaders such a run builds give the ranks
    disjoint windows; a checkpoint resumes at the same world size exactly."""
    seq_len = 32
    config = write_config(tmp_path, extra="checkpoint_every = 2\n")
    common = ["--dist", "diloco", "--sync-every", "1", "--batch-size", "3,1"]
    summary = finish(launch("--config", str(config), "--steps", "3", "--data", str(small_documents(tmp_path / "docs.jsonl")),
                            "--out", str(tmp_path / "run"), *common))
    assert summary["world_size"] == 2 and summary["steps"] == 3
    run_rows = rows(tmp_path / "run")
    syncs = [r for r in run_rows if r.get("event") == "sync"]
    assert [r["step"] for r in syncs] == [1, 2, 3]
    assert all(r["tokens"] == [3 * seq_len, seq_len] and r["weights"] == pytest.approx([0.75, 0.25]) for r in syncs)
    steps = [r for r in run_rows if "loss" in r]  # rank 0's rows: its own tokens (tokens/s, MFU from them)
    assert [r["tokens"] for r in steps] == [3 * seq_len] * 3
    resumed = finish(launch("--resume", str(tmp_path / "run" / "checkpoints" / "step-2"), "--out",
                            str(tmp_path / "resumed")))
    assert resumed["steps"] == 3
    assert [r["loss"] for r in rows(tmp_path / "resumed") if "loss" in r] == [steps[-1]["loss"]]  # exact

    from ling_train.config import load_toml, resolve
    from ling_train.run import build_data
    run_config = resolve(load_toml(tmp_path / "run" / "config.toml"), {}, "config.toml")
    assert run_config.batch_size == [3, 1]
    loaders = [build_data(run_config, 512, rank, 2).loader for rank in range(2)]
    seen: list[int] = []
    for position in range(loaders[0].batches_per_epoch):
        for rank, loader in enumerate(loaders):
            assert loader.next_batch()[0].shape == ((3, 1)[rank], seq_len)
            seen += loader.window_indices(0, position).tolist()
    assert len(seen) == len(set(seen)) == loaders[0].batches_per_epoch * 4  # disjoint across ranks and steps
