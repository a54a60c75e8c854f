"""What SFT and GRPO share around their training loops: the monitor, the final checkpoint, the run's outputs.

A stage (:func:`align.sft.run_sft`, :func:`align.grpo.loop.run_grpo`) prepares its run directory, trains, then
calls :func:`save_final` and :func:`finish`; only the main rank writes files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import yaml

from align import plots, rundir
from align.config import MonitorConfig
from align.moe import ExpertMonitor


def make_monitor(model, cfg: MonitorConfig) -> ExpertMonitor | None:
    """The expert-load monitor (and DeepSeek-V2 balance losses) on every training forward, if enabled."""
    if not cfg.enabled:
        return None
    return ExpertMonitor(model, cfg.balance_alpha1, cfg.balance_alpha2, cfg.num_devices, cfg.dead_threshold)


def save_final(run_dir: Path, policy, world: int, is_main: bool, write_sharded: Callable[[Path], None],
               barrier: Callable[[], None]) -> None:
    """Write ``final/`` (adapter or full weights + tokenizer) through a staging directory, published atomically.

    ``write_sharded(staging)``: how this stage gathers ZeRO-3 / FSDP shards into a checkpoint under several
    processes (a collective: every rank calls it)."""
    staging = run_dir / ".final.tmp"
    if world == 1:
        policy.save(staging)
    else:
        write_sharded(staging)
    if is_main:
        rundir.commit_dir(staging, run_dir / rundir.FINAL_DIR)
    barrier()


def model_card(run_dir: Path, stage: str, summary: dict) -> str:
    """``final/README.md``: what the checkpoint is, where it came from, how it scored, how to load it."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    model, lora, data = cfg.get("model", {}), cfg.get("lora", {}), cfg.get("data", {})
    name = {"sft": "Chat (SFT)", "grpo": "Chat (RL)"}.get(stage, stage)
    lines = [f"# {run_dir.name}: {name} checkpoint (align {stage})", "",
             f"- trained from: `{model.get('name_or_path')}` ({model.get('dtype')})",
             f"- data: `{data.get('train')}`" + (f", held out: `{data.get('eval')}`" if data.get("eval") else ""),
             "- weights: " + (f"LoRA r={lora.get('r')}, alpha={lora.get('alpha')} on "
                              + ", ".join(k for k in ("attention", "dense_mlp", "shared_experts", "routed_experts")
                                          if lora.get(k)) + ("; router trained" if lora.get("train_router") else
                                                             "; router frozen") if lora.get("enabled") else "all"),
             f"- steps: {summary.get('steps')}, wall time {summary.get('wall_s')} s, "
             f"{summary.get('processes', 1)} process(es)", "- recipe: `../config.yaml` (resolved)", ""]
    before, after = summary.get("held_out_before") or {}, summary.get("held_out_after") or {}
    keys = [k for k in after if k.endswith(("_accuracy", "_pass@4")) and isinstance(after[k], float)]
    if keys:
        lines += ["| held-out | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {100 * before[k]:.1f} | {100 * after[k]:.1f} |" if isinstance(before.get(k), float)
                  else f"| {k} | — | {100 * after[k]:.1f} |" for k in keys]
        lines.append("")
    lines += ["Load: `align merge <this dir> <out>` for a full model, or PEFT inside `align.lora.native_v5_targets()`",
              "(see align's README, \"Loading checkpoints outside align\").", ""]
    return "\n".join(lines)


def finish(run_dir: Path, stage: str, monitor: ExpertMonitor | None, metrics_log, summary: dict) -> None:
    """Main rank: the expert-load history and heatmap, the metrics logger closed, ``summary.json``, the model card."""
    if (run_dir / rundir.FINAL_DIR).is_dir():
        (run_dir / rundir.FINAL_DIR / "README.md").write_text(model_card(run_dir, stage, summary))
    if monitor is not None and monitor.history:
        (run_dir / "moe_history.json").write_text(json.dumps(monitor.history))
        title = {"sft": "SFT expert load", "grpo": "GRPO expert load (all updates, main rank)"}.get(stage, stage)
        plots.expert_heatmap(monitor, run_dir / "plots" / f"expert_load_{stage}.png", title)
    if metrics_log is not None:
        metrics_log.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
