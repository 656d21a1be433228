"""`prepare`: read -> normalise -> quality filters -> exact dedup -> near dedup -> write.

Output: ``OUT/documents.jsonl.zst`` (one ``{"text": ...}`` per kept document, in input order)
and ``OUT/report.json`` (counts: read, skipped bad lines, drops per filter, duplicates, kept).
Both are written to temp files and renamed, so a failed run leaves no partial output.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zstandard
from tqdm import tqdm

from ling_data.atomic import atomic_path, write_text_atomic
from ling_data.dedup import Deduplicator
from ling_data.filters import FilterConfig, failed_filter, normalize
from ling_data.readers import ReadStats, read_documents

DOCUMENTS_FILE = "documents.jsonl.zst"
REPORT_FILE = "report.json"


@dataclass
class PrepareConfig:
    normalization: str = "NFC"
    filters: FilterConfig = field(default_factory=FilterConfig)
    exact_dedup: bool = True
    near_dedup_threshold: float | None = 0.8  # None: no near-dedup
    num_perm: int = 128
    shingle_bytes: int = 8
    skip_bad: bool = False
    zstd_level: int = 3


def prepare(inputs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str],
            config: PrepareConfig | None = None, progress: bool = True) -> dict:
    """Run the pipeline over ``inputs`` into ``out_dir``; returns the report (also written)."""
    config = config or PrepareConfig()
    out = Path(out_dir)
    started = time.perf_counter()
    read_stats = ReadStats()
    dropped: dict[str, int] = {}
    dedup = Deduplicator(config.near_dedup_threshold, config.num_perm, config.shingle_bytes,
                         exact=config.exact_dedup)
    kept = kept_chars = 0
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / DOCUMENTS_FILE) as temp, open(temp, "wb") as raw, \
            zstandard.ZstdCompressor(level=config.zstd_level).stream_writer(raw) as writer, \
            tqdm(desc="prepare", unit=" docs", disable=not progress) as bar:
        for document in read_documents(inputs, skip_bad=config.skip_bad, stats=read_stats):
            bar.update()
            text = normalize(document.text, config.normalization)
            reason = failed_filter(text, config.filters)
            if reason is None:
                reason = dedup.verdict(text)
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            writer.write(json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n")
            kept += 1
            kept_chars += len(text)
    report = {
        "inputs": [str(path) for path in inputs] if isinstance(inputs, (list, tuple)) else None,
        "read": read_stats.as_dict(),
        "dropped": dict(sorted(dropped.items())),
        "kept": {"documents": kept, "chars": kept_chars},
        "config": {**asdict(config), "filters": asdict(config.filters)},
        "seconds": round(time.perf_counter() - started, 3),
        "output": str(out / DOCUMENTS_FILE),
    }
    write_text_atomic(out / REPORT_FILE, json.dumps(report, indent=2, default=str) + "\n")
    return report

