"""Structured pruning of causal LMs, the pruned folders it writes, and the recovery guide's flow."""
