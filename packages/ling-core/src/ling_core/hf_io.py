"""Hugging Face layout weights: `config.json`, size-capped safetensors shards, an index.

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written checkpoint under the final name. Reads go shard by shard into an already allocated
model, so peak memory stays near one model copy plus one shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ling_core.config import ConfigError, LingConfig

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# {safetensors file name: sha256}: a flipped byte inside a tensor leaves the file parseable (its
# values become garbage, e.g. NaN), so only a checksum catches it. Absent in older checkpoints.
CHECKSUMS_NAME = "checksums.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or does not match the model."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never a part, and a power
    loss cannot undo the rename while keeping the old bytes out (fsync before and after it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and directory under `root`, then `root`: all on disk before it is renamed into place."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it replaces `path` (an existing
    one is removed only after the new one is in place), on failure it is deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint should read like any directory
    try:
        yield tmp
        fsync_tree(tmp)  # else a power loss after the rename could leave `path` naming torn files
        replace_dir(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_hf_files(model: torch.nn.Module, config: LingConfig, directory: Path,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write config.json and safetensors shards into an existing directory (not atomic on its
    own: callers write into a temp dir and rename it, see `save_pretrained`)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size

    hf_config = config.to_hf()
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) == 1:
        hf_config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")

    metadata = {"format": "pt"}
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for file_name, shard in zip(names, shards):
        save_file(shard, str(directory / file_name), metadata=metadata)
    checksums = {name: file_sha256(directory / name) for name in names}
    (directory / CHECKSUMS_NAME).write_text(json.dumps(checksums, indent=2, sort_keys=True) + "\n")
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, shard in zip(names, shards) for name in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_checksums(path: Path) -> dict[str, str] | None:
    """The checkpoint's {file: sha256}, or None for one written before checksums existed."""
    checksums_path = path / CHECKSUMS_NAME
    if not checksums_path.exists():
        return None
    try:
        checksums = json.loads(checksums_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{checksums_path}: corrupt ({e}); expected {{file name: sha256}}") from None
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise CheckpointError(f"{checksums_path}: expected a JSON object {{file name: sha256}}")
    return checksums


def verify_checksum(file_path: Path, checksums: dict[str, str] | None) -> None:
    if checksums is None:
        return
    expected = checksums.get(file_path.name)
    if expected is None:
        raise CheckpointError(f"{file_path}: not listed in {CHECKSUMS_NAME} (the checkpoint's files disagree)")
    digest = file_sha256(file_path)
    if digest != expected:
        raise CheckpointError(f"{file_path}: sha256 {digest[:12]}... but {CHECKSUMS_NAME} recorded "
                              f"{expected[:12]}...; the file is corrupt")


def save_pretrained(model: torch.nn.Module, path: str | Path,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Atomically write `model` (a LingForCausalLM) to `path` in HF layout."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    with atomic_directory(path) as tmp:
        write_hf_files(model, model.config, tmp, max_shard_bytes)
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move a completed directory to `dst`; an existing `dst` is removed only after the new one
    is complete, so a crash leaves either the old or the new one."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def read_config(path: str | Path) -> LingConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a directory with {CONFIG_NAME})")
    try:
        return LingConfig.from_json_file(path / CONFIG_NAME)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def shard_files(path: Path) -> dict[str, list[str]]:
    """{file name: tensor names expected in it} from the index, or the single file."""
    index_path = path / INDEX_NAME
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
        files: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            files.setdefault(file_name, []).append(name)
        return files
    if (path / SINGLE_FILE).exists():
        return {SINGLE_FILE: []}
    raise CheckpointError(f"{path}: no weights (expected {SINGLE_FILE} or {INDEX_NAME})")


@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy HF-layout weights from `path` into an allocated `model`, shard by shard. Every model
    tensor must be present exactly once with the model's shape."""
    path = Path(path)
    expected = model.state_dict()
    loaded: set[str] = set()
    checksums = read_checksums(path)
    for file_name, listed in shard_files(path).items():
        file_path = path / file_name
        if not file_path.exists():
            raise CheckpointError(f"{file_path}: missing shard (listed in {INDEX_NAME} for {listed[0]})")
        try:
            verify_checksum(file_path, checksums)
            with safe_open(str(file_path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in expected:
                        raise CheckpointError(f"{file_path}: unexpected tensor {name!r} (not in the model)")
                    target = expected[name]
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(target.shape):
                        raise CheckpointError(f"{file_path}: tensor {name!r} has shape {list(shape)}, "
                                              f"expected {list(target.shape)}")
                    if name in loaded:
                        raise CheckpointError(f"{file_path}: tensor {name!r} appears in more than one shard")
                    target.copy_(f.get_tensor(name))
                    loaded.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file_path}: corrupt or truncated safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{file_path}: cannot read ({e.strerror or e})") from None
    missing = [n for n in expected if n not in loaded]
    if missing:
        name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {name!r}{more}, expected shape "
                              f"{list(expected[name].shape)}")


def from_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """Build a LingForCausalLM from an HF-layout directory (sharded or single file)."""
    from ling_core.model import LingForCausalLM

    config = read_config(path)
    with torch.device("meta"):
        model = LingForCausalLM(config)
    model.to_empty(device=device)
    load_weights(model, path)
    return model
