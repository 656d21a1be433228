"""ling-data throughput, each against an anchor measured in the same run.

- tokenize + shard (`ling_data.tokenize_to_shards`, 2 worker processes: read JSONL, encode,
  zstd-compress, sha256, write, manifest) vs raw sentencepiece `encode` of the same texts in
  one process, one thread. Ratio = ours / (raw x workers); the goal is >= 0.8.
- near-dedup (MinHash + LSH, 128 permutations, threshold 0.8) docs/s vs datasketch on the same
  shingles, plus recall/precision of both against exact Jaccard (benchmarks/minhash_quality.py).
- `TokenLoader` tokens/s (batch 16 x 128, prefetch thread, sha256 verified) vs the tokens/s a
  tiny-preset training step consumes (`Trainer.train_step`, fp32, CPU), i.e. how many times
  faster than the trainer the loader is.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
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
    documents = embedded_corpus() * 3  # ~5 MB of text: enough to amortise worker start-up
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    tokenizer = cached_tokenizer(embedded_corpus(), vocab_size=8192, cache_dir=root / "cache")
    return root, documents, tokenizer


def test_tokenize_and_shard_vs_raw_sentencepiece(benchmark, corpus_files, best_time, best_seconds):
    import multiprocessing

    from ling_data.tokenize import _init_worker, _token_arrays

    root, documents, tokenizer = corpus_files
    out = root / "shards"
    raw, raw_parallel = best_time(), best_time()
    tokens = sum(map(len, tokenizer.encode_batch(documents, num_threads=1)))
    chunk = max(len(documents) // 20, 1)
    chunks = [documents[i:i + chunk] for i in range(0, len(documents), chunk)]
    # Second anchor: the same encode (plus conversion to arrays) in a warm pool of WORKERS
    # processes, no reading, compression or writing: what the cores give right now.
    pool = multiprocessing.get_context("spawn").Pool(WORKERS, _init_worker, (tokenizer.model_path,))
    pool.map(_token_arrays, chunks[:WORKERS])

    def setup():  # the anchors, interleaved with the rounds
        raw.time(lambda: tokenizer.encode_batch(documents, num_threads=1))
        raw_parallel.time(lambda: pool.map(_token_arrays, chunks))
        shutil.rmtree(out, ignore_errors=True)

    benchmark.pedantic(lambda: tokenize_to_shards([root / "docs.jsonl"], tokenizer.model_path, out,
                                                  workers=WORKERS, shard_chars=256 << 10, progress=False),
                       setup=setup, rounds=3)
    pool.terminate()
    seconds = best_seconds()
    if seconds is None:
        return
    raw_rate = tokens / raw.seconds
    benchmark.extra_info.update({
        "tokens": tokens, "workers": WORKERS,
        "tokens_per_s": round(tokens / seconds),
        "raw_sentencepiece_tokens_per_s_one_process": round(raw_rate),
        "ratio_to_raw_times_workers": round(tokens / seconds / (raw_rate * WORKERS), 3),
        "raw_encode_in_warm_pool_tokens_per_s": round(tokens / raw_parallel.seconds),
        "parallel_speedup_the_machine_gave": round(raw.seconds / raw_parallel.seconds, 2),
        "ratio_to_raw_encode_in_warm_pool": round(raw_parallel.seconds / seconds, 3),
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
