import sys
from pathlib import Path

# The shared stand-ins (ling_eval_testing.py) are imported by name from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
