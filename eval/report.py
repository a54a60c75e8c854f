"""`align report`: PNG plots and a markdown summary of one or more run directories (overlaid)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from align import plots
from align.errors import AlignError
from align.rundir import read_metrics

PANELS = [  # (file, title, y-axis label, metric keys)
    ("reward", "mean reward of the samples", "reward", ["reward/mean", "reward/math", "reward/code", "reward/format"]),
    ("accuracy", "held-out accuracy during training", "accuracy (fraction)",
     ["eval/greedy_accuracy", "eval/sampled_accuracy"]),
    ("loss", "training loss", "loss", ["loss", "actor/pg_loss"]),
    ("kl", "KL to reference / train-infer mismatch", "nats", ["actor/kl", "mismatch/kl_k3", "mismatch/abs_logp_mean"]),
    ("clipfrac", "clip fraction", "fraction of tokens", ["actor/clipfrac"]),
    ("entropy", "policy entropy", "nats per token", ["actor/entropy", "entropy"]),
    ("length", "completion length", "tokens", ["completion/len_mean"]),
    ("phases", "seconds per phase", "seconds", ["time/rollout", "time/score", "time/logprobs", "time/update",
                                                 "time/sync"]),
    ("throughput", "rollout throughput", "tokens/s", ["throughput/rollout_tok_s"]),
    ("moe_cv", "expert load imbalance (mean over layers)", "CV / MaxVio", ["moe/cv_mean", "moe/maxvio_mean"]),
]


def _series(runs: dict[str, list[dict]], keys: list[str]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{run: {metric: points}} for the runs that logged any of ``keys``."""
    out: dict[str, dict] = {}
    for name, rows in runs.items():
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                out.setdefault(name, {})[key] = pts
    return out


def _layer_series(rows: list[dict], stat: str) -> dict[str, list[tuple[float, float]]]:
    layers = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("moe/layer") and k.endswith(f"/{stat}")},
                    key=lambda s: int(s[5:]))
    return {l: [(r["step"], r[f"moe/{l}/{stat}"]) for r in rows if f"moe/{l}/{stat}" in r] for l in layers}


def write_report(run_dirs: list[str], out: str | None = None, eval_dir: str | None = None) -> str:
    runs = {}
    for d in run_dirs:
        p = Path(d)
        if not (p / "metrics.jsonl").is_file():
            raise AlignError(f"{d}: not a run directory (no metrics.jsonl)")
        runs[p.name] = read_metrics(p)
    out_dir = Path(out or run_dirs[0])
    figs = out_dir / "plots"
    lines = [f"# align report: {', '.join(runs)}", ""]
    if eval_dir:
        table = Path(eval_dir) / "table.md"
        if not table.is_file():
            raise AlignError(f"--eval {eval_dir}: no table.md (run align eval --out {eval_dir} first)")
        lines += ["## evaluation (`align eval`)", "", table.read_text().strip(), ""]
    for key, title, ylabel, keys in PANELS:
        series = _series(runs, keys)
        if series:
            plots.curves_by_run(series, figs / f"{key}.png", title, ylabel)
            lines += [f"## {title}", f"![{key}](plots/{key}.png)", ""]
    for name, rows in runs.items():
        for stat in ("cv", "maxvio"):
            series = _layer_series(rows, stat)
            if series:
                plots.curves(series, figs / f"{name}_layer_{stat}.png", f"{name}: per-layer load {stat}",
                             "CV" if stat == "cv" else "MaxVio")
                lines += [f"## {name}: per-layer expert load {stat}", f"![{stat}](plots/{name}_layer_{stat}.png)", ""]
    for d in run_dirs:
        lines += _run_section(Path(d), figs)
    text = "\n".join(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text + "\n")
    return str(out_dir / "report.md")


def _run_section(run: Path, figs: Path) -> list[str]:
    lines = [f"## run `{run.name}`", ""]
    hist = run / "moe_history.json"
    if hist.is_file():
        history = json.loads(hist.read_text())
        snaps = {label: plots.share_matrix(snap) for label, snap in (("start", history[0]), ("end", history[-1]))}
        experts = len(snaps["start"][1][0])
        vmax = max(2.0 / experts, *(max(map(max, m)) for _, m in snaps.values()))  # one scale for both
        for label, (layers, matrix) in snaps.items():
            path = plots.heatmap(matrix, layers, figs / f"{run.name}_experts_{label}.png",
                                 f"{run.name}: expert load at {label}", vmax=vmax)
            lines.append(f"![experts {label}](plots/{path.name})")
        lines.append("")
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rows = [(k, s["held_out_before"].get(k), s["held_out_after"].get(k)) for k in s.get("held_out_after", {})
                if k.endswith(("accuracy", "pass@4", "pass@1"))]
        if rows:
            lines += ["| held-out metric | before | after |", "|---|---|---|"]
            lines += [f"| {k} | {b if b is None else f'{100 * b:.1f}'} | {100 * a:.1f} |" for k, b, a in rows]
            lines.append("")
        lines.append(f"wall time: {s.get('wall_s')} s")
    cfg = run / "config.yaml"
    if cfg.is_file():
        conf = yaml.safe_load(cfg.read_text())
        brief = {k: conf[k] for k in ("model", "lora", "train", "grpo") if k in conf}
        lines += ["", "<details><summary>config</summary>", "", "```yaml",
                  yaml.safe_dump(brief, sort_keys=False).strip(), "```", "</details>", ""]
    return lines
