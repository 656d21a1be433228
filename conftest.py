"""Suite-wide test setup: `gpu` tests skip themselves where CUDA is missing; shared fixtures."""

import errno
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def read_only_below(monkeypatch):
    """`read_only_below(root)`: directories under `root` cannot be created, as on a read-only
    mount (the tests run as root, whom permission bits do not stop)."""
    real_mkdir = os.mkdir

    def make_read_only(root):
        def mkdir(path, *args, **kwargs):
            if str(path).startswith(str(root)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_mkdir(path, *args, **kwargs)
        monkeypatch.setattr(os, "mkdir", mkdir)
    return make_read_only
