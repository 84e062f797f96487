"""Evaluation: perplexity per domain, merging baselines and routing statistics."""
