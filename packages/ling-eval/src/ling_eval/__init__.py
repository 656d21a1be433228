"""ling-eval: Evaluation: multiple-choice, generation, perplexity and tool-call tasks with bootstrap confidence intervals, in-training eval, an lm-eval adapter and reports.

Not filled yet (issue 6); it exports no API.
"""
