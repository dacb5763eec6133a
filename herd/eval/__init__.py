"""Evaluation (SPEC 7), one concept per module:

    perplexity   loss, perplexity and bits per byte (training batches, whole documents)
    position     cumulative average NLL by token position, with a power-law fit
    needle       needle in a haystack: exact match and a likelihood variant, effective length
    speed        prefill and decode tokens per second
    tasks        pass@1 / pass@k of verifiable tasks (the tasks themselves live elsewhere)
    plots        the figures
    report       report.md from the results
    command      `herd eval MODEL`: every section into report.md, results.json and PNGs
    lm_eval_model  a `herd` model type for lm-evaluation-harness (optional extra `eval`)
    lm_eval_tasks/ offline lm-eval tasks, one per request type, their data generated locally
"""

from .perplexity import LMEvaluator, score_texts, token_byte_lengths, token_nlls
from .position import cumulative_average, fit_power_law, nll_by_position

__all__ = ["LMEvaluator", "score_texts", "token_byte_lengths", "token_nlls", "cumulative_average", "fit_power_law",
           "nll_by_position"]
