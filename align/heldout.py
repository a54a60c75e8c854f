"""Held-out evaluation shared by the training stages and ``align eval``: generate, score with the training
verifiers, aggregate (accuracy, unbiased pass@k of Chen et al. 2021, "Evaluating Large Language Models Trained
on Code"). Depends on ``rollout`` and ``rewards`` only, so SFT and GRPO use it without importing ``eval/``."""

from __future__ import annotations

import math
import logging
from dataclasses import dataclass

from rewards import Combined
from rollout.base import SamplingSettings, render_prompts

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct.

    >>> pass_at_k(5, 0, 1), pass_at_k(5, 5, 3), round(pass_at_k(4, 1, 2), 4)
    (0.0, 1.0, 0.5)
    """
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


@dataclass
class EvalResult:
    summary: dict
    samples: list[dict]


def evaluate(engine, tokenizer, rows: list[dict], weights: dict[str, float], settings: SamplingSettings,
             ks: list[int] = (1,), columns: tuple[str, ...] = ("answer",)) -> EvalResult:
    """Score ``settings.n`` completions per row; accuracy = mean fraction of correct samples (pass@1)."""
    prompts = render_prompts(tokenizer, [r["prompt"] for r in rows])
    limit = getattr(engine, "max_len", None)
    fits = [not limit or len(p) + settings.max_new_tokens <= limit for p in prompts]
    if not all(fits):
        rows = [r for r, ok in zip(rows, fits) if ok]
        prompts = [p for p, ok in zip(prompts, fits) if ok]
    too_long = len(fits) - sum(fits)
    if not rows:
        return EvalResult({"num_prompts": 0, "skipped_too_long": too_long, "accuracy": 0.0, "accuracy_stderr": 0.0,
                           "unscorable": 0}, [])
    rollouts = engine.generate(prompts, settings)
    completions, cols = [], {c: [] for c in columns}
    for row, ro in zip(rows, rollouts):
        for comp in ro.completions:
            completions.append(comp.text)
            for c in columns:
                cols[c].append(row.get(c))
    present = {c: v for c, v in cols.items() if any(x is not None for x in v)}
    total, per, reasons = Combined(weights).score(completions, **present)
    samples, first, passk, unscorable = [], [], {k: [] for k in ks}, 0
    n = settings.n
    for i, (row, ro) in enumerate(zip(rows, rollouts)):
        scores = total[i * n:(i + 1) * n]
        if any(s is None for s in scores):
            unscorable += 1
        correct = [s is not None and s >= 1.0 for s in scores]
        first.append(sum(correct) / len(correct))
        for k in ks:
            if k <= n:
                passk[k].append(pass_at_k(n, sum(correct), k))
        for j, comp in enumerate(ro.completions):
            samples.append({
                "prompt": row["prompt"], "completion": comp.text, "answer": row.get("answer"),
                "score": scores[j], "reason": "; ".join(reasons[name][i * n + j] for name in weights),
                "finish_reason": comp.finish_reason,
            })
    acc, se = mean_and_stderr(first)
    summary = {"num_prompts": len(rows), "n": n, "accuracy": acc, "accuracy_stderr": se, "unscorable": unscorable,
               "skipped_too_long": too_long}
    for k, vals in passk.items():
        if vals:
            summary[f"pass@{k}"], summary[f"pass@{k}_stderr"] = mean_and_stderr(vals)
    return EvalResult(summary, samples)


def held_out_summary(engine, tokenizer, rows: list[dict], weights: dict[str, float], eval_cfg, seed: int) -> dict:
    """Greedy accuracy plus sampled pass@1/pass@k (``eval_cfg.n`` samples at ``eval_cfg.temperature``),
    flattened as ``greedy_*`` / ``sampled_*`` — the before/after numbers of every training run."""
    if not rows:
        return {}
    rows = rows[: eval_cfg.num_samples or len(rows)]
    sampled = f" + {eval_cfg.n} samples at T={eval_cfg.temperature:g}" if eval_cfg.temperature > 0 else ""
    log.info("held-out eval: %d prompts, greedy%s each (eval.num_samples caps the prompts)", len(rows), sampled)
    out = {}
    for name, temp, n in (("greedy", 0.0, 1), ("sampled", eval_cfg.temperature, eval_cfg.n)):
        if name == "sampled" and temp <= 0:
            continue
        settings = SamplingSettings(n=n, temperature=temp, max_new_tokens=eval_cfg.max_new_tokens, seed=seed)
        summary = evaluate(engine, tokenizer, rows, weights, settings, ks=[k for k in eval_cfg.k if k <= n],
                           columns=Combined(weights).columns).summary
        out.update({f"{name}_{k}": v for k, v in summary.items()})
    return out
