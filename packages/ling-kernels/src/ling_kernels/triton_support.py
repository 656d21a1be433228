"""Whether Triton can be imported (it is optional: CPU-only installs run without it)."""

from __future__ import annotations


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
