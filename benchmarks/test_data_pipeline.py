"""ling-data throughput, each against an anchor measured in the same run.

- tokenize + shard: the `ling-data tokenize --workers 2` command, launch to exit, on ~20 MB of
  JSONL (read, encode, zstd-compress, sha256, write, manifest) vs raw sentencepiece `encode` of
  the same texts in one process, one thread, tokenizer loaded. Ratio = ours / (raw x workers);
  the goal is >= 0.8. Also against the machine's measured 2-process scaling (busy loop) and the
  same encode in a warm 2-process pool, and the load average, all from the same run.
- near-dedup (MinHash + LSH, 128 permutations, threshold 0.8) docs/s vs datasketch on the same
  shingles, plus recall/precision of both against exact Jaccard (benchmarks/minhash_quality.py).
- `TokenLoader` tokens/s (batch 16 x 128, prefetch thread, sha256 verified) vs the tokens/s a
  tiny-preset training step consumes (`Trainer.train_step`, fp32, CPU), i.e. how many times
  faster than the trainer the loader is.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ling_data import TokenLoader, cached_tokenizer, embedded_corpus, tokenize_to_shards

WORKERS = 2
BATCH, SEQ_LEN = 16, 128


def _quality_module():
    spec = importlib.util.spec_from_file_location("minhash_quality", Path(__file__).with_name("minhash_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    documents = embedded_corpus() * 3  # ~5 MB of text for the loader benchmark
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    tokenizer = cached_tokenizer(embedded_corpus(), vocab_size=8192, cache_dir=root / "cache")
    return root, documents, tokenizer


@pytest.fixture(scope="module")
def tokenize_job(tmp_path_factory):
    """~20 MB of text (the stdlib corpus 12 times; ~5M tokens): a job a user would run, that
    takes seconds to encode, so worker start-up is a small part of it."""
    root = tmp_path_factory.mktemp("tokenize")
    documents = embedded_corpus() * 12
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    tokenizer = cached_tokenizer(embedded_corpus(), vocab_size=8192, cache_dir=root / "cache")
    return root, documents, tokenizer


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _busy_loop_processes(processes: int) -> None:
    """``processes`` copies of the same pure-Python loop (~0.5 s each on an idle core), run at
    once: 2 x the 1-process time over the 2-process time is how much the machine gives a
    second process right now (the ceiling any 2-worker program can reach)."""
    code = "total = 0\nfor i in range(15_000_000):\n    total += i & 7\n"
    running = [subprocess.Popen([sys.executable, "-S", "-c", code]) for _ in range(processes)]
    for process in running:
        if process.wait() != 0:
            raise RuntimeError(f"busy-loop process exited {process.returncode}")


def test_tokenize_and_shard_vs_raw_sentencepiece(benchmark, tokenize_job, best_time, best_seconds):
    """Subject: the `ling-data tokenize` command a user runs, with `--workers 2` (2 encoder
    processes; the command's own process reads, assembles and writes shards) and the default
    shard size, timed from launch to exit: interpreter start-up, imports, tokenizer load, pool
    start, reading JSONL, encoding, zstd, sha256, writing and the manifest all count.

    Raw: sentencepiece `encode` of the same texts in one process, one thread, tokenizer
    already loaded (nothing else). The goal is subject >= 0.8 x raw x workers. Two more
    anchors from the same rounds say what 2 processes can reach at all: the same encode in
    a warm 2-process pool (no start-up, no I/O) and a pure-Python busy loop in 1 vs 2
    processes (the machine's 2-process scaling)."""
    from ling_data.tokenize import CHUNK_CHARS, _init_worker, _token_arrays

    root, documents, tokenizer = tokenize_job
    out = root / "shards"
    raw, pool_encode, one_process, two_processes = best_time(), best_time(), best_time(), best_time()
    tokens = sum(map(len, tokenizer.encode_batch(documents, num_threads=1)))
    pieces, piece, size = [], [], 0
    for text in documents:  # the pipeline's unit of work (ling_data.tokenize.CHUNK_CHARS)
        piece.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            pieces.append(piece)
            piece, size = [], 0
    pieces += [piece] if piece else []
    pool = multiprocessing.get_context("spawn").Pool(WORKERS, _init_worker, (tokenizer.model_path,))
    pool.starmap(_token_arrays, [(p, "uint16") for p in pieces[:WORKERS]])  # warm
    command = [sys.executable, "-m", "ling_data.cli", "tokenize", str(root / "docs.jsonl"), "--tokenizer",
               str(tokenizer.model_path), "--out", str(out), "--workers", str(WORKERS), "--no-progress"]
    load_before = os.getloadavg()
    manifests, cpu_seconds, raw_cpu_seconds = [], [], []

    def raw_encode():
        started = time.process_time()
        tokenizer.encode_batch(documents, num_threads=1)
        raw_cpu_seconds.append(time.process_time() - started)

    def setup():  # the anchors, interleaved with the rounds
        raw.time(raw_encode)
        pool_encode.time(lambda: pool.starmap(_token_arrays, [(p, "uint16") for p in pieces]))
        one_process.time(lambda: _busy_loop_processes(1))
        two_processes.time(lambda: _busy_loop_processes(WORKERS))
        shutil.rmtree(out, ignore_errors=True)

    def subject():
        started = children_cpu_seconds()  # the command and its workers, once they are reaped
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        cpu_seconds.append(children_cpu_seconds() - started)
        manifests.append(json.loads((out / "manifest.json").read_text()))

    benchmark.pedantic(subject, setup=setup, rounds=3)
    pool.terminate()
    seconds = best_seconds()
    if seconds is None:
        return
    assert manifests[-1]["tokens"] == tokens
    raw_rate, rate = tokens / raw.seconds, tokens / seconds
    cpu_scaling = WORKERS * one_process.seconds / two_processes.seconds
    benchmark.extra_info.update({
        "text_chars": sum(map(len, documents)), "tokens": tokens, "workers": WORKERS,
        "shards": len(manifests[-1]["shards"]),
        "tokens_per_s": round(rate),
        "in_process_seconds_best": min(m["seconds"] for m in manifests),
        "raw_sentencepiece_tokens_per_s_one_process": round(raw_rate),
        "ratio_to_raw_times_workers": round(rate / (raw_rate * WORKERS), 3),
        "machine_2_process_scaling_busy_loop": round(cpu_scaling, 2),
        "ratio_to_raw_times_machine_scaling": round(rate / (raw_rate * cpu_scaling), 3),
        "raw_encode_in_warm_pool_tokens_per_s": round(tokens / pool_encode.seconds),
        "warm_pool_encode_scaling": round(raw.seconds / pool_encode.seconds, 2),
        "ratio_to_raw_encode_in_warm_pool": round(pool_encode.seconds / seconds, 3),
        # CPU time is far less disturbed by other load than wall time: the share of the
        # command's CPU (start-up, reading, encoding, arrays, pipes, zstd, writing) that is the
        # raw encode itself. The wall ratio above is bounded by about this x scaling / workers.
        "cpu_seconds_best": round(min(cpu_seconds), 3),
        "raw_cpu_seconds_best": round(min(raw_cpu_seconds), 3),
        "raw_cpu_over_command_cpu": round(min(raw_cpu_seconds) / min(cpu_seconds), 3),
        "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    })


def test_near_dedup_vs_datasketch(benchmark, best_time, best_seconds):
    quality = _quality_module()
    texts = quality.documents()
    shingle_sets = [quality.shingles(t) for t in texts]
    truth = quality.true_pairs(shingle_sets, quality.THRESHOLD)
    theirs = best_time()
    found_theirs = {}

    def anchor():
        found_theirs["pairs"] = quality.datasketch_pairs(shingle_sets)[0]

    found_ours = {}

    def subject():
        found_ours["pairs"] = quality.ours(shingle_sets)[0]

    benchmark.pedantic(subject, setup=lambda: theirs.time(anchor), rounds=2)
    seconds = best_seconds()
    if seconds is None:
        return
    ours_score, theirs_score = quality.score(found_ours["pairs"], truth), quality.score(found_theirs["pairs"], truth)
    benchmark.extra_info.update({
        "documents": len(texts), "true_pairs": len(truth),
        "docs_per_s": round(len(texts) / seconds, 1),
        "datasketch_docs_per_s": round(len(texts) / theirs.seconds, 1),
        "ratio_to_datasketch": round(theirs.seconds / seconds, 3),
        "recall": round(ours_score["recall"], 3), "precision": round(ours_score["precision"], 3),
        "datasketch_recall": round(theirs_score["recall"], 3),
        "datasketch_precision": round(theirs_score["precision"], 3),
    })


def test_token_loader_vs_tiny_training_step(benchmark, corpus_files, best_time, best_seconds):
    from ling_core import build_model, preset
    from ling_train.trainer import Trainer, TrainerSettings

    root, _, tokenizer = corpus_files
    shards = root / "loader-shards"
    if not shards.exists():
        tokenize_to_shards([root / "docs.jsonl"], tokenizer.model_path, shards, workers=1, shard_chars=1 << 20,
                           progress=False)
    loader = TokenLoader(shards, SEQ_LEN, BATCH, seed=0, prefetch=2)
    batches = 200

    def serve():
        for _ in range(batches):
            loader.next_batch()

    config = preset("tiny")
    model = build_model(config, device="cpu", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(model, optimizer, scheduler, TokenLoader(shards, SEQ_LEN, BATCH, seed=1),
                      TrainerSettings(total_steps=10**9), torch.device("cpu"))
    step = best_time()
    trainer.train_step()  # warm-up
    benchmark.pedantic(serve, setup=lambda: step.time(trainer.train_step), rounds=3, warmup_rounds=1)
    loader.close()
    trainer.loader.close()
    seconds = best_seconds()
    if seconds is None:
        return
    loader_rate = batches * BATCH * SEQ_LEN / seconds
    step_rate = BATCH * SEQ_LEN / step.seconds
    benchmark.extra_info.update({
        "loader_tokens_per_s": round(loader_rate),
        "tiny_train_step_tokens_per_s": round(step_rate),
        "ratio_loader_to_train_step": round(loader_rate / step_rate, 1),
    })
