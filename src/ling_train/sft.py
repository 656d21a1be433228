"""`task = "sft"` (`ling-train sft`): supervised fine-tuning on chat samples from `ling-data kg`.

Everything else is the pretraining run (checkpoints and resume, metrics.jsonl, progress, --dist
modes, anomaly handling, --eval-every); what differs is where things come from:
- the weights: `init`, an HF-layout checkpoint (a step-N dir or a run dir), loaded once at the
  start of a fresh run; the optimizer, schedule and loader start fresh;
- the model shape: the init checkpoint's config.json, written into the run config's [model]
  table, so the run's config.toml is complete without the init checkpoint;
- the tokenizer: the init run's `tokenizer.model`, which must hold the chat/tool-call symbols
  as single tokens (ling-train's own runs do);
- the data: `ling_data.sft` samples (loss only on what the assistant writes), packed into rows
  of `seq_len` tokens with segment ids, so packed samples do not attend to each other.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from ling_core import CheckpointError, LingConfig
from ling_data import DataError, Tokenizer
from ling_data.tokenizer import CHAT_TEMPLATE_SYMBOLS

from ling_train import checkpoint as ckpt

log = logging.getLogger("ling_train")
TASKS = ("pretrain", "sft")
TOKENIZER_FILE = "tokenizer.model"


def init_checkpoint(init: str) -> Path:
    if not init:
        raise CheckpointError("init (--init): task sft needs the checkpoint to start from (a step-N dir or a run dir)")
    path = Path(init)
    if not path.exists():
        raise CheckpointError(f"--init {init}: does not exist (expected a step-N checkpoint or a run directory)")
    if (path / "config.json").is_file() and not (path / ckpt.TRAINER_STATE_DIR).is_dir():
        return path  # a bare HF-layout directory (weights and config.json only)
    return ckpt.resolve_checkpoint(path)


def model_fields(init: str) -> dict[str, Any]:
    """The init checkpoint's model config as [model] overrides (every LingConfig field)."""
    checkpoint = init_checkpoint(init)
    config = LingConfig.from_json_file(checkpoint / "config.json")
    hf = config.to_hf()
    return {key: value for key, value in hf.items() if key not in ("model_type", "architectures")
            and key in LingConfig.__dataclass_fields__ and value is not None}


def tokenizer_path(init: str, run_dir: Path | None = None) -> Path:
    """A resumed run's own copy, else the init checkpoint's (beside it, or in its run directory)."""
    candidates = [run_dir / TOKENIZER_FILE] if run_dir is not None else []
    checkpoint = init_checkpoint(init)
    candidates += [checkpoint / TOKENIZER_FILE, checkpoint.parent.parent / TOKENIZER_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"--init {init}: no {TOKENIZER_FILE} beside the checkpoint or in its run directory "
                          f"(SFT tokenizes with the tokenizer the model was pretrained with)")


def load_chat_tokenizer(path: Path) -> Tokenizer:
    tokenizer = Tokenizer.load(path)
    pieces = [tokenizer.piece(i) for i in range(4, 4 + len(CHAT_TEMPLATE_SYMBOLS))]
    if pieces != list(CHAT_TEMPLATE_SYMBOLS):
        raise DataError(f"{path}: the tokenizer lacks the chat/tool-call symbols as single tokens (ids 4-9 are "
                        f"{pieces}); pretrain with a tokenizer from `ling-data train-tokenizer` or ling-train's own")
    return tokenizer


def sample_file(data: str) -> Path:
    """`data`: a `ling-data kg` output directory (its train.jsonl) or a JSONL file."""
    if not data:
        raise DataError("data (--data): task sft needs chat samples: a `ling-data kg` directory or a JSONL file")
    path = Path(data)
    if path.is_dir():
        path = path / "train.jsonl"
    if not path.is_file():
        raise DataError(f"--data {data}: no such file (expected a `ling-data kg` directory with train.jsonl, "
                        f"or a JSONL file of chat samples)")
    return path


def build_loader(config, tokenizer: Tokenizer, rank: int, world_size: int):
    """(SFTLoader, counts): samples read, encoded, shuffled by the seed and packed once."""
    from ling_data.sft import SFTLoader, encode_samples, pack_samples, read_chat_samples
    samples = list(read_chat_samples(sample_file(config.data)))
    encoded = encode_samples(tokenizer, samples, start_ids=(tokenizer.eos_id,))  # as ling-eval's prompts
    random.Random(config.seed).shuffle(encoded)  # packing order; the loader reshuffles rows per epoch
    rows = pack_samples(encoded, config.seq_len, tokenizer.pad_id)
    counts = {"samples": len(samples), "rows": len(rows), "target_tokens": rows.target_tokens,
              "context_tokens": rows.context_tokens, "padding_tokens": rows.padding_tokens}
    log.info("sft: %d samples packed into %d rows of %d tokens: %d target, %d context (masked), %d padding",
             len(samples), len(rows), config.seq_len, rows.target_tokens, rows.context_tokens, rows.padding_tokens)
    loader = SFTLoader(rows, seed=config.seed, rank=rank, world_size=world_size,
                       batch_sizes=config.batch_sizes(world_size))
    return loader, counts
