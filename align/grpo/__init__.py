"""GRPO stage: batch building, log-probs, update step, and the thin loop that ties them."""
