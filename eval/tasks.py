"""Evaluation tasks: where the data lives (hub id or shipped sample), how to prompt, which verifier.

``--tasks gsm8k`` loads the hub split; ``gsm8k:sample`` the small set shipped in ``eval/data``;
``gsm8k=path.jsonl`` any local file with the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from align.config import SyntheticConfig
from align.data import load_rows, synthetic_splits
from align.errors import AlignError

DATA = Path(__file__).parent / "data"


@dataclass
class Task:
    name: str
    hub: str
    subset: str
    split: str
    sample: str
    prompt_field: str
    rewards: dict
    instruction: str = ""
    columns: dict = field(default_factory=dict)
    """Gold/verifier column -> dataset column."""
    reference: str = ""
    """Column holding a known-correct completion (used to check the scorer on shipped samples)."""

    def render(self, row: dict) -> list[dict]:
        text = row[self.prompt_field]
        return [{"role": "user", "content": f"{self.instruction}\n\n{text}".strip()}]


TASKS = {
    "gsm8k": Task("gsm8k", "openai/gsm8k", "main", "test", "gsm8k_sample.jsonl", "question", {"math": 1.0},
                  "Solve the problem step by step. End with '#### <answer>'.", reference="answer"),
    "math500": Task("math500", "HuggingFaceH4/MATH-500", "", "test", "math_sample.jsonl", "problem", {"math": 1.0},
                    "Solve the problem. Put the final answer in \\boxed{}.", reference="solution"),
    "humaneval": Task("humaneval", "openai/openai_humaneval", "", "test", "humaneval_sample.jsonl", "prompt",
                      {"code": 1.0}, "Complete the following Python function. Reply with the code only.",
                      reference="canonical_solution"),
    "mbpp": Task("mbpp", "google-research-datasets/mbpp", "full", "test", "mbpp_sample.jsonl", "text", {"code": 1.0},
                 "Write a Python function for the task below. Reply with the code only.", {"tests": "test_list"},
                 reference="code"),
}


def load_task(spec: str, synthetic: SyntheticConfig | None = None, limit: int = 0) -> tuple[Task, list[dict]]:
    """``name``, ``name:sample`` or ``name=path`` -> (task, rows with ``prompt`` messages and gold columns)."""
    name, _, where = spec.replace("=", ":", 1).partition(":")
    if name == "synthetic":
        task = Task("synthetic", "", "", "", "", "question", {"math": 1.0})
        rows = synthetic_splits(synthetic or SyntheticConfig())[1]
        rows = [{**r, "prompt": [m for m in r["messages"] if m["role"] != "assistant"]} for r in rows]
        return task, rows[:limit or None]
    if name not in TASKS:
        raise AlignError(f"--tasks: unknown task {name!r}; known: synthetic, {', '.join(TASKS)}")
    task = TASKS[name]
    if where == "sample":
        raw = load_rows(str(DATA / task.sample))
    elif where:
        raw = load_rows(where)
    else:
        raw = load_rows(task.hub, task.split, task.subset)
    rows = []
    for i, r in enumerate(raw, 1):
        r = {**r, **{new: r[old] for new, old in task.columns.items() if old in r}}
        if task.prompt_field not in r:
            raise AlignError(f"{spec}: row {i} has no '{task.prompt_field}' column")
        rows.append({**r, "prompt_text": r.get("prompt") if isinstance(r.get("prompt"), str) else None,
                     "prompt": task.render(r)})
    return task, rows[:limit or None]
