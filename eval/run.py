"""`align eval`: several checkpoints x several tasks through one rollout engine; JSONL + summary + table."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from align.config import LoraConfig, load_config
from align.errors import AlignError
from align.policy import load_policy
from align.heldout import evaluate
from eval.tasks import load_task
from rewards import Combined
from rollout import SamplingSettings, make_engine

log = logging.getLogger(__name__)


def _label(path: str) -> str:
    p = Path(path)
    nested = p.name in ("final",) or p.name.startswith(("step-", "checkpoint-"))
    return f"{p.parent.name}/{p.name}" if nested else p.name


def run_eval(checkpoints: list[str], tasks: str, recipe: str | None, overrides: list[str], out: str,
             n: int | None = None, k: str | None = None) -> str:
    cfg = load_config(recipe, overrides)
    n = n or cfg.eval.n
    ks = [int(x) for x in k.split(",")] if k else [x for x in cfg.eval.k if x <= n] or [1]
    if max(ks) > n:
        raise AlignError(f"--k {max(ks)} needs --n >= {max(ks)}")
    temperature = cfg.eval.temperature if n > 1 or cfg.eval.temperature > 0 else 0.0
    settings = SamplingSettings(n=n, temperature=temperature, max_new_tokens=cfg.eval.max_new_tokens,
                                seed=cfg.rollout.seed)
    loaded = [load_task(t.strip(), cfg.data.synthetic, cfg.eval.num_samples) for t in tasks.split(",") if t.strip()]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, dict]] = {}
    engine = None
    for ckpt in checkpoints:
        cfg.model.name_or_path = ckpt
        policy = load_policy(cfg.model, LoraConfig(enabled=False))
        engine = _engine_for(engine, policy, cfg, out_dir)
        label = _label(ckpt)
        for task, rows in loaded:
            res = evaluate(engine, policy.tokenizer, rows, task.rewards, settings, ks=ks,
                           columns=Combined(task.rewards).columns)
            d = out_dir / label.replace("/", "_")
            d.mkdir(parents=True, exist_ok=True)
            with (d / f"{task.name}.jsonl").open("w") as fh:
                for s in res.samples:
                    fh.write(json.dumps(s) + "\n")
            (d / f"{task.name}.summary.json").write_text(json.dumps(res.summary, indent=2))
            table.setdefault(label, {})[task.name] = res.summary
    text = format_table(table, ks, settings)
    (out_dir / "table.md").write_text(text + "\n")
    (out_dir / "summary.json").write_text(json.dumps(table, indent=2))
    return text


def _engine_for(engine, policy, cfg, out_dir: Path):
    """One engine for all checkpoints of the same architecture: later ones are weight syncs."""
    if engine is not None and not engine.shares_weights:
        engine.update_weights(policy.merged_state_dict())
        return engine
    return make_engine(cfg.rollout.engine, policy, cfg.rollout, cfg.model.dtype,
                       min(policy.model.config.max_position_embeddings, 4096))


def format_table(table: dict[str, dict[str, dict]], ks: list[int], settings: SamplingSettings | None = None) -> str:
    """Markdown: one row per checkpoint, one column per task (accuracy ± stderr, pass@k), under a line that says
    how the answers were drawn (greedy, or sampled at T with n per prompt)."""
    tasks = list(dict.fromkeys(t for row in table.values() for t in row))
    how = "" if settings is None else ("greedy decoding, exact match (%)" if settings.greedy else
                                       f"sampled at T={settings.temperature:g}, n={settings.n} per prompt: "
                                       "accuracy = pass@1 (%, mean over samples)")
    head = "| checkpoint | " + " | ".join(tasks) + " |"
    lines = ([how, ""] if how else []) + [head, "|" + "---|" * (len(tasks) + 1)]
    for label, row in table.items():
        cells = []
        for t in tasks:
            s = row.get(t, {})
            cell = f"{100 * s.get('accuracy', 0):.1f} ± {100 * s.get('accuracy_stderr', 0):.1f}"
            if s.get("skipped_too_long"):
                cell += f" ({s['skipped_too_long']} too long)"
            cell += "".join(f", pass@{k} {100 * s[f'pass@{k}']:.1f}" for k in ks if k > 1 and f"pass@{k}" in s)
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
