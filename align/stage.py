"""What SFT and GRPO share around their training loops: the monitor, the final checkpoint, the run's outputs.

A stage (:func:`align.sft.run_sft`, :func:`align.grpo.loop.run_grpo`) prepares its run directory, trains, then
calls :func:`save_final` and :func:`finish`; only the main rank writes files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

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


def finish(run_dir: Path, stage: str, monitor: ExpertMonitor | None, metrics_log, summary: dict) -> None:
    """Main rank: the expert-load history and heatmap, the metrics logger closed, ``summary.json``."""
    if monitor is not None and monitor.history:
        (run_dir / "moe_history.json").write_text(json.dumps(monitor.history))
        title = {"sft": "SFT expert load", "grpo": "GRPO expert load (all updates, main rank)"}.get(stage, stage)
        plots.expert_heatmap(monitor, run_dir / "plots" / f"expert_load_{stage}.png", title)
    if metrics_log is not None:
        metrics_log.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
