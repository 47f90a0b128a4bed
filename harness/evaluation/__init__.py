"""Evaluation: lm-eval suites from local data (BBH, CommonSense, MultiPL-E), perplexity per domain, code sandbox."""
from .data import DataUnavailableError
from .minipile import minipile_texts
from .perplexity import perplexity_by_domain
from .suites import EvalSettings, evaluate, suite_tasks

__all__ = ["DataUnavailableError", "EvalSettings", "evaluate", "minipile_texts", "perplexity_by_domain",
           "suite_tasks"]
