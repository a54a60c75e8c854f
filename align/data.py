"""Datasets: the embedded synthetic arithmetic task, local files and hub ids, with clear errors.

Rows are chat rows: ``messages`` (list of {role, content}), plus gold columns (``question``,
``answer``) that GRPO and evaluation use. Prompt/completion rows are accepted for SFT too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from align.config import DataConfig, SyntheticConfig
from align.errors import DataError

SYNTHETIC = "synthetic"
ROLES = {"system", "user", "assistant"}


def _solve(terms: list[int], ops: list[str]) -> tuple[int, list[str]]:
    value, steps = terms[0], []
    for op, t in zip(ops, terms[1:]):
        new = value + t if op == "+" else value - t if op == "-" else value * t
        steps.append(f"{value}{op}{t}={new}")
        value = new
    return value, steps


def arithmetic_row(terms: list[int], ops: list[str], error: int = 0) -> dict:
    """One chat row: the question, a worked answer ending in ``#### <result>``, and gold columns.

    ``error`` shifts the reply's final result (a teacher's mistake); the gold ``answer`` stays exact.
    """
    expr = "".join(str(terms[0]) + "".join(o + str(t) for o, t in zip(ops, terms[1:])))
    value, steps = _solve(terms, ops)
    if error:
        head, _ = steps[-1].rsplit("=", 1)
        steps[-1] = f"{head}={value + error}"
        row = arithmetic_row(terms, ops)
        row["messages"][1]["content"] = "\n".join(steps + [f"#### {value + error}"])
        return row
    question = f"What is {expr}?"
    reply = "\n".join(steps + [f"#### {value}"])
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
        "question": question,
        "answer": str(value),
    }


def synthetic_splits(cfg: SyntheticConfig) -> tuple[list[dict], list[dict]]:
    """Deterministic train/held-out rows; held-out problems never appear in train."""
    rng = random.Random(cfg.seed)
    ops = list(cfg.ops)

    def draw() -> tuple[list[int], list[str]]:
        n = rng.choice(cfg.num_terms)
        return [rng.randint(0, cfg.max_operand) for _ in range(n)], [rng.choice(ops) for _ in range(n - 1)]

    held: dict[str, dict] = {}
    attempts = 0
    while len(held) < cfg.num_eval and attempts < 100 * max(1, cfg.num_eval):
        row = arithmetic_row(*draw())
        held.setdefault(row["question"], row)
        attempts += 1
    train = []
    for _ in range(cfg.num_train):
        terms, ops_ = draw()
        while arithmetic_row(terms, ops_)["question"] in held:
            terms, ops_ = draw()
        error = rng.choice([-2, -1, 1, 2]) if rng.random() < cfg.noise else 0
        train.append(arithmetic_row(terms, ops_, error))
    return train, list(held.values())


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_rows(source: str, split: str = "train", subset: str = "", columns: dict | None = None) -> list[dict]:
    """Rows from a local .jsonl/.json/.parquet file or a hub dataset id, with columns renamed."""
    rows = _load_rows(source, split, subset)
    if columns:
        rows = [{**r, **{new: r[old] for new, old in columns.items() if old in r}} for r in rows]
    return rows


def _load_rows(source: str, split: str, subset: str) -> list[dict]:
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet") or path.exists() or source.startswith((".", "/")):
        if not path.is_file():
            raise DataError(f"{source}: dataset file not found")
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of rows")
            return data
        if suffix == ".parquet":
            import datasets

            return datasets.Dataset.from_parquet(str(path)).to_list()
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    import datasets

    try:
        return datasets.load_dataset(source, subset or None, split=split).to_list()
    except Exception as e:  # hub errors come in many types; the user needs the id and the reason
        raise DataError(f"{source}: cannot load dataset split {split!r} ({str(e).splitlines()[0]})") from None


def check_chat_rows(rows: list[dict], source: str, field: str = "messages") -> None:
    """SFT rows need ``messages`` (or prompt + completion) with known roles and string contents."""
    if not rows:
        raise DataError(f"{source}: no rows")
    for i, row in enumerate(rows, 1):
        if "prompt" in row and "completion" in row and field not in row:
            continue
        msgs = row.get(field)
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{source}: row {i} has no '{field}' list (or prompt/completion columns)")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{source}: row {i}: each message needs role in {sorted(ROLES)} and string content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{source}: row {i} has no assistant message to learn from")


def sft_rows(cfg: DataConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) for SFT, validated."""
    if cfg.train == SYNTHETIC:
        train, held = synthetic_splits(cfg.synthetic)
    else:
        train = load_rows(cfg.train, cfg.split, cfg.subset, cfg.columns)
        has_eval = cfg.eval and cfg.eval != SYNTHETIC
        held = load_rows(cfg.eval, cfg.eval_split, cfg.subset, cfg.columns) if has_eval else []
    check_chat_rows(train, cfg.train, cfg.messages_field)
    if cfg.eval == SYNTHETIC and cfg.train != SYNTHETIC:
        held = synthetic_splits(cfg.synthetic)[1]
    return train, held


def prompt_rows(cfg: DataConfig, which: str = "train") -> list[dict]:
    """Rows for GRPO/eval: ``prompt`` (chat messages without the answer) plus gold columns."""
    source = cfg.train if which == "train" else cfg.eval
    if source == SYNTHETIC:
        train, held = synthetic_splits(cfg.synthetic)
        rows = train if which == "train" else held
    else:
        rows = load_rows(source, cfg.split if which == "train" else cfg.eval_split, cfg.subset, cfg.columns)
    out = []
    for i, row in enumerate(rows, 1):
        if isinstance(row.get(cfg.messages_field), list):
            msgs = [m for m in row[cfg.messages_field] if m.get("role") != "assistant"]
        elif isinstance(row.get(cfg.prompt_field), str):
            msgs = [{"role": "user", "content": row[cfg.prompt_field]}]
        else:
            raise DataError(f"{source}: row {i} has neither '{cfg.messages_field}' nor '{cfg.prompt_field}'")
        if cfg.system_prompt:
            msgs = [{"role": "system", "content": cfg.system_prompt}] + msgs
        if cfg.answer_field and cfg.answer_field not in row:
            raise DataError(f"{source}: row {i} has no gold column '{cfg.answer_field}'")
        text = row.get("prompt") if isinstance(row.get("prompt"), str) else None
        out.append({**row, "prompt": msgs, "prompt_text": text,
                    "answer": row[cfg.answer_field] if cfg.answer_field else None})
    if not out:
        raise DataError(f"{source}: no rows")
    return out
