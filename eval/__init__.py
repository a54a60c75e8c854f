"""Evaluation: tasks, generation through the rollout engine, scoring with rewards/, pass@k."""
