from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run() -> None:
    examples = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(examples) == 2  # the ops walk-through and the allocator opt-in / opt-out
    for example in examples:
        exec(compile(example, str(README), "exec"), {"__name__": "readme_example"})
