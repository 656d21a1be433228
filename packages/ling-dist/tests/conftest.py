from __future__ import annotations

import sys
from pathlib import Path

# Spawned workers unpickle their entry point by module name, and pytest's importlib mode does
# not make test modules importable by name, so the shared helpers live in a plain module on
# sys.path (spawn hands the parent's sys.path to its children).
sys.path.insert(0, str(Path(__file__).resolve().parent))
