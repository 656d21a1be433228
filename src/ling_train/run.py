"""Compose a training run from the packages: data -> model -> optimizer -> trainer + callbacks."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ling_core import CheckpointError, build_model, flops_per_token, load_weights
from ling_core.hf_io import write_text_atomic
from ling_data import PackedLoader, TokenLoader, cached_tokenizer, embedded_corpus, pack_documents, read_text_documents
from ling_data import DataError, is_shard_dir, load_manifest
from ling_data.tokenizer import CHAT_TEMPLATE_SYMBOLS
from ling_train import checkpoint as ckpt
from ling_train.callbacks import (Checkpointer, MetricsLogger, ProgressBar, ResumedLossCheck, RoutingWarmupStep,
                                  Timer)
from ling_train.eval_callback import EvalCallback, load_eval_tasks, scored_weights
from ling_train.config import RunConfig, RunConfigError
from ling_train.run_lock import lock_run_dir, release_run_dir
from ling_eval.outputs import output_dir_problem
from ling_train import dist_checkpoint, dpo, sft, snapshots
from ling_train import distributed as dist_run
from ling_train.perf import device_name, matmul_peak, run_mfu, spec_bf16_peak
from ling_train.trainer import Trainer, TrainerSettings, warmup_cosine

log = logging.getLogger("ling_train")


def resolve_device(name: str) -> torch.device:
    """The device a process computes on. `mixed` is `auto` here: under several processes
    `distributed.init_process_group` then gives each rank its own GPU if it has one, else the CPU."""
    if name in ("auto", "mixed"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunConfigError(f"--device: unknown device {name!r}; expected auto, mixed, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunConfigError(f"--device: {name} requested but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise RunConfigError(f"--device: {name!r} is not supported; expected auto, mixed, cpu, cuda or cuda:N")
    return device


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # CPUs without bf16 matmul units run bf16 slower than fp32


def default_out(size: str) -> str:
    return str(Path("runs") / f"{size}-{time.strftime('%Y%m%d-%H%M%S')}")


@dataclass
class Data:
    loader: PackedLoader | TokenLoader
    tokenizer_path: Path | None
    tokens: int
    documents: int
    # batch position {"epoch", "position"} -> {"documents": [[first, last] per row]} (anomaly events)
    describe_batch: Callable[[dict[str, int]], dict[str, Any]] | None = None


def build_data(config: RunConfig, vocab_size: int, rank: int = 0, world_size: int = 1) -> Data:
    batch_sizes = config.batch_sizes(world_size)  # each rank takes its own slice of a global batch
    if config.data and is_shard_dir(config.data):  # written by `ling-data tokenize`
        manifest = load_manifest(config.data)
        if manifest["vocab_size"] > vocab_size:
            raise DataError(f"--data {config.data}: its tokenizer has {manifest['vocab_size']} tokens but the "
                            f"model's vocab_size is {vocab_size}; set [model] vocab_size >= {manifest['vocab_size']}")
        loader = TokenLoader(config.data, seq_len=config.seq_len, seed=config.seed, rank=rank, world_size=world_size,
                             batch_sizes=batch_sizes)
        tokenizer_path = Path(config.data) / manifest.get("tokenizer", "tokenizer.model")

        def describe_shard_batch(position: dict[str, int]) -> dict[str, Any]:
            return {"documents": loader.batch_documents(position["epoch"], position["position"])}

        return Data(loader, tokenizer_path if tokenizer_path.is_file() else None, loader.tokens, loader.documents,
                    describe_shard_batch)
    if config.data and not Path(config.data).exists():
        raise DataError(f"--data: {config.data} does not exist (expected a file or directory of .txt/.jsonl documents)")
    documents = read_text_documents(config.data) if config.data else embedded_corpus()
    try:
        # the chat/tool-call symbols get their ids now, so SFT on ling-data kg samples
        # (`ling_data.sft`) can start from this run's checkpoint with the same tokenizer
        tokenizer = cached_tokenizer(documents, vocab_size=vocab_size, user_defined_symbols=CHAT_TEMPLATE_SYMBOLS)
    except ValueError as e:  # sentencepiece: too little text for the vocabulary, etc.
        source = f"--data {config.data}" if config.data else "embedded corpus"
        raise DataError(f"{source}: cannot train a {vocab_size}-token tokenizer on it "
                        f"({str(e).splitlines()[0]}); use more text or a smaller [model] vocab_size") from None
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    stream = pack_documents(tokenizer.encode_batch(documents), tokenizer.eos_id)
    loader = PackedLoader(stream, seq_len=config.seq_len, seed=config.seed, rank=rank, world_size=world_size,
                          batch_sizes=batch_sizes)
    eos_id = tokenizer.eos_id

    def describe_batch(position: dict[str, int]) -> dict[str, Any]:
        return {"documents": loader.batch_documents(position["epoch"], position["position"], eos_id)}

    return Data(loader, tokenizer.model_path, int(stream.numel()), len(documents), describe_batch)


def build_sft_data(config: RunConfig, rank: int, world_size: int, resume_from: Path | None):
    """Packed chat samples (`ling_train.sft`), tokenized with the init run's tokenizer (a resumed
    run's own copy of it when there is one)."""
    run_dir = resume_from.parent.parent if resume_from is not None else None
    tokenizer_path = sft.tokenizer_path(config.init, run_dir)
    tokenizer = sft.load_chat_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > config.model_config().vocab_size:
        raise DataError(f"{tokenizer_path}: {tokenizer.vocab_size} tokens, more than the model's vocab_size "
                        f"{config.model_config().vocab_size}")
    loader, counts = (dpo if config.task == "dpo" else sft).build_loader(config, tokenizer, rank, world_size)
    tokens = counts["target_tokens"] + counts["context_tokens"]
    return Data(loader, tokenizer_path, tokens, counts.get("samples", counts.get("pairs"))), counts


def build_optimizer(model: torch.nn.Module, config: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (or SGD) with weight decay on matrices only. AdamW is torch's fused kernel on CUDA
    and on CPU (plain tensors): on CPU one step over the tiny preset's 15.6M parameters took
    16 ms fused against 50-55 ms for the default per-parameter loop and 58-65 ms for `foreach`
    (2 threads, 2026-12-07); it is not bitwise the loop's result (fp32 rounding order)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr)
    # On CPU only for plain tensors: expert parallel mixes DTensor (FSDP-sharded) and plain
    # parameters, which the fused op refuses ("got mixed torch.Tensor and DTensor").
    from torch.distributed.tensor import DTensor
    plain = not any(isinstance(p, DTensor) for p in model.parameters())
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=device.type == "cuda" or (device.type == "cpu" and plain))


def check_out_dir(out: Path, resuming: bool, lock: bool) -> None:
    """--out before any work: a directory we can write, not another run's (unless resuming it),
    and not one a live run is writing (`lock`: the main rank takes RUN/.lock, ling_train.run_lock)."""
    problem = output_dir_problem(out)
    if problem:
        raise RunConfigError(f"--out: {problem}")
    if not resuming and out.exists() and any((out / name).exists() for name in ("metrics.jsonl", "checkpoints")):
        raise RunConfigError(f"--out: {out} already holds a run; pass --resume to continue it or choose "
                             f"another --out (nothing was overwritten)")
    if lock and out.exists():
        lock_run_dir(out)


def build_anomaly_monitor(config: RunConfig, data: Data, metrics: MetricsLogger, out: Path, workers: int = 1):
    """The `[anomaly]` table's monitor around a re-injecting loader, or None when it is absent.
    `workers` > 1: Local SGD workers, each with its own monitor (ling_train.anomaly.local_sgd)."""
    anomaly_config = config.anomaly_config()
    if anomaly_config is None or not anomaly_config.enabled:
        return None
    from ling_core.moe import Router
    from ling_train.anomaly import AnomalyLoader, AnomalyMonitor
    wrapped = AnomalyLoader(data.loader, seed=config.seed, rows_per_batch=anomaly_config.reinject_rows_per_batch,
                            describe=data.describe_batch)
    return AnomalyMonitor(anomaly_config, wrapped, metrics.write, Router, out / "anomaly_report.json", workers)


def train(config: RunConfig, resume_from: Path | None = None, progress: bool = True) -> dict:
    """Run training as configured; returns a summary (also written to RUN/summary.json by rank 0;
    other ranks return an empty dict)."""
    try:
        return _train(config, resume_from, progress)
    finally:
        release_run_dir(Path(config.out))


def _train(config: RunConfig, resume_from: Path | None, progress: bool) -> dict:
    out = Path(config.out)
    device = resolve_device(config.device)
    setup = dist_run.init_process_group(config, device)
    device = setup.device
    snapshots.agree_restart_attempt(device)  # one answer for the job, whichever node restarted
    autocast_dtype = resolve_autocast(config.precision, device)
    model_config = config.model_config()

    # Everything that can fail on bad input happens before the run directory is touched.
    restarted = snapshots.restart_attempt() > 0  # torchrun --max-restarts: continue what the last attempt saved
    source = (snapshots.restart_source(out, setup.rank, setup.world_size, device, resume_from) if restarted
              else snapshots.ResumeSource(resume_from))
    resume_from = source.path
    check_out_dir(out, resuming=resume_from is not None or restarted, lock=setup.is_main)
    dist_run.barrier()  # every rank checked before rank 0 writes anything
    from_snapshot = snapshots.is_snapshot(resume_from)
    trainer_state = (snapshots.resume_state(source, config, setup.rank, setup.world_size, device) if from_snapshot
                     else dist_checkpoint.load_resume_state(setup, config, resume_from) if resume_from else None)
    eval_tasks = load_eval_tasks(config.eval_tasks) if config.eval_every else None
    torch.manual_seed(config.seed)
    if setup.rank:
        dist_run.barrier()  # rank 0 trains and caches the tokenizer first
    sft_counts = None
    if config.task in ("sft", "dpo"):
        data, sft_counts = build_sft_data(config, setup.rank, setup.world_size, resume_from)
    else:
        data = build_data(config, model_config.vocab_size, setup.rank, setup.world_size)
    if setup.rank == 0:
        dist_run.barrier()
    model = build_model(model_config, device=device, seed=config.seed)
    if resume_from is not None and not from_snapshot:
        load_weights(model, resume_from)
    elif resume_from is None and config.task in ("sft", "dpo"):  # weights only: optimizer, schedule start fresh
        load_weights(model, sft.init_checkpoint(config.init))
    trained = dist_run.wrap_model(setup, model)
    if config.task == "dpo":  # the init checkpoint, again, frozen: what the policy's log-ratios are taken against
        reference = build_model(model_config, device=device, seed=config.seed)
        load_weights(reference, sft.init_checkpoint(config.init))
        trained = dpo.DPOObjective(trained, reference, config.dpo_beta, model_config.balance_loss_weight,
                                   model_config.router_z_loss_weight)

    optimizer = build_optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(config.warmup_steps, config.steps, config.min_lr_ratio))
    stepped = dist_run.wrap_optimizer(setup, config, model, optimizer)

    peak = matmul_peak(device, autocast_dtype or torch.float32)
    fpt = flops_per_token(model_config, config.seq_len)
    metrics = (MetricsLogger if setup.is_main else dist_run.SilentMetrics)(out / "metrics.jsonl", fpt, peak.flops,
                                                                             config.log_every)
    run_toml = config.to_toml()
    max_shard_bytes = int(config.max_shard_gb * 1024**3)

    def save(step: int) -> Path:
        return dist_checkpoint.write_checkpoint(setup, config, trainer, model, optimizer, out / "checkpoints", step,
                                                run_toml, max_shard_bytes)

    timer = Timer()
    # A-EDiT ranks take unequal numbers of steps: they stop together once all ranks' steps, as
    # agreed at a sync point, reach steps x ranks (the per-rank cap is only a backstop).
    aedit = setup.local_sgd is not None and config.dist == "aedit"
    total_steps = config.steps * setup.world_size * 100 if aedit else config.steps
    anomaly = build_anomaly_monitor(config, data, metrics, out, setup.world_size)  # checked: check_workers
    if anomaly is not None and not setup.is_main:
        anomaly.report_path = None  # rank 0 writes the run directory; every rank's events reach metrics.jsonl
    callbacks = [RoutingWarmupStep(), metrics, *([anomaly] if anomaly else []),
                 ProgressBar(disable=not progress or not setup.is_main)]
    if setup.local_sgd is not None:  # outlier workers and every rank's anomaly rows, at sync points
        from ling_train.anomaly.local_sgd import LocalSGDAnomalies
        callbacks.insert(callbacks.index(metrics) + 1 + bool(anomaly), LocalSGDAnomalies(
            setup.rank, setup.world_size, setup.local_sgd, metrics.write, data.describe_batch, anomaly))
    callbacks.append(dist_checkpoint.SyncPointCheckpointer(save, config.checkpoint_every, setup.local_sgd,
                                                           setup.world_size)
                     if aedit else Checkpointer(save, config.checkpoint_every))
    callbacks.append(timer)
    if resume_from is not None:
        callbacks.append(ResumedLossCheck(resume_from))
    if setup.world_size > 1 or setup.local_sgd is not None:
        callbacks.insert(1, dist_run.DistributedLogging(
            setup.rank, setup.world_size, metrics.write, setup.local_sgd, straggler_interval=max(config.log_every, 10),
            stop_at_global_steps=config.steps * setup.world_size if aedit else None))
    trainer = Trainer(trained, stepped, scheduler, anomaly.loader if anomaly else data.loader,
                      TrainerSettings(total_steps, config.grad_clip, autocast_dtype, setup.clip_gradients), device, callbacks)
    if eval_tasks is not None:
        weights, label = scored_weights(setup, config, model)
        trainer.callbacks.insert(2, EvalCallback(config.eval_every, eval_tasks, data.tokenizer_path, metrics.write,
                                                 weights, model_config, label, limit=config.eval_limit or None,
                                                 seed=config.seed, local_sgd=setup.local_sgd is not None))
    if trainer_state is not None:
        trainer_state = (snapshots.fit_state(trainer_state, model, optimizer) if from_snapshot else
                         dist_checkpoint.fit_resume_state(trainer_state, setup, model, optimizer, data.loader,
                                                          resume_from))
        try:
            trainer.load_state_dict(trainer_state)
        except ValueError as e:  # a schedule, loader or optimizer that does not fit this run's flags
            raise CheckpointError(f"--resume {resume_from}: {e}") from None
        if "local_model" in trainer_state:
            model.load_state_dict(trainer_state["local_model"])

    # The run directory appears only once every rank has fitted what it resumes from: a mismatch
    # found there (bad input, exit 2) leaves no empty --out behind.
    dist_run.barrier()
    out.mkdir(parents=True, exist_ok=True)
    if setup.is_main:  # a run started beside this one with the same new --out stops here
        lock_run_dir(out)
    if config.snapshot_every:  # its FlashCheckpointer creates RUN/snapshots/
        trainer.callbacks.insert(trainer.callbacks.index(timer), snapshots.snapshot_callback(
            config, out, setup.rank, setup.world_size, optimizer, write=metrics.write, barrier=dist_run.barrier,
            trainer_state=lambda: {**trainer.state_dict(), "dist": config.dist, "world_size": setup.world_size,
                                   "model": model.state_dict()}, local_sgd=setup.local_sgd, device=device))

    if not setup.is_main:
        trainer.fit()
        return {}
    ckpt.remove_partial_checkpoints(out / "checkpoints")
    write_text_atomic(out / "config.toml", run_toml)
    if data.tokenizer_path is not None and data.tokenizer_path.resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(data.tokenizer_path, out / "tokenizer.model")  # (a resumed SFT run reads its own copy)
    log.info("model %s on %s (%s), %d tokens in %d documents, peak matmul %.1f GFLOP/s (%s; %.1f now), "
             "--dist %s on %d process(es)", config.size, device, autocast_dtype or "fp32", data.tokens,
             data.documents, peak.flops / 1e9, peak.source, peak.measured_now / 1e9, config.dist, setup.world_size)
    start_step = trainer.step
    if snapshots.restart_attempt():
        metrics.write(snapshots.restart_event(source, start_step, setup.world_size))
    if start_step:
        from_dist = trainer_state.get("dist", "none")
        event = {"event": "resume", "step": start_step, "from": str(resume_from),
                 "from_world_size": trainer_state.get("world_size", 1), "world_size": setup.world_size,
                 "from_dist": from_dist, "dist": config.dist}
        if from_dist != config.dist:  # the optimizer state was converted: show that it is the saved one
            event["optimizer_sha256"] = dist_checkpoint.optimizer_sha256(optimizer.state_dict())
        if setup.local_sgd is not None:  # what this process holds now, to compare with the checkpoint
            event.update(dist_checkpoint.local_sgd_fingerprints(setup.local_sgd.state_dict()))
        metrics.write(event)
    trainer.fit()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = snapshots.rows_of_this_attempt(rows)
    steps = [r for r in rows if "event" not in r and "lm_loss" in r and r["step"] > start_step]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r) and r["step"] > start_step]
    summary = {
        "out": str(out), "steps": trainer.step, "device": str(device),
        "first_loss": steps[0]["lm_loss"] if steps else None,
        "final_loss": steps[-1]["lm_loss"] if steps else None,
        "tokens_per_s": sum(r["tokens"] for r in steps) / max(sum(r["step_time_s"] for r in steps), 1e-9),
        "mfu": run_mfu(steps, fpt, peak.flops),
        "peak_matmul_flops": peak.flops, "peak_matmul_source": peak.source,
        "matmul_flops_measured_now": peak.measured_now, "wall_time_s": timer.elapsed(),
        "checkpoint": str(ckpt.latest_checkpoint(out / "checkpoints")),
        "dist": config.dist, "world_size": setup.world_size,
    }
    spec_peak = spec_bf16_peak(device_name(device)) if device.type == "cuda" else None
    if spec_peak is not None:  # as torchtitan reports it, to compare across frameworks
        summary["mfu_spec_bf16"] = run_mfu(steps, fpt, spec_peak)
    if setup.local_sgd is not None:
        summary.update(syncs=setup.local_sgd.syncs, bytes_communicated=setup.local_sgd.bytes_communicated)
    if sft_counts is not None:  # what one epoch holds, and what this run's steps trained on
        summary[config.task] = {**sft_counts, "target_tokens_trained": sum(r.get("target_tokens", 0) for r in steps)}
    if evals:
        summary["eval"] = evals[-1]
    if anomaly is not None:
        summary["anomaly"] = anomaly.summary()
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
