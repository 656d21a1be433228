from __future__ import annotations

import sys
from pathlib import Path

# pytest's importlib mode does not make test modules importable by name, so the shared
# helpers live in a plain, uniquely named module on sys.path (as in ling-dist's tests).
sys.path.insert(0, str(Path(__file__).resolve().parent))
