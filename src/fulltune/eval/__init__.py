"""Measuring a model: metrics, evaluate, predict, perplexity."""
