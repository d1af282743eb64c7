"""Evaluation: metrics, length generalisation, perplexity curves and plots."""
