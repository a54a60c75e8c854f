"""GRPO checkpoints: trainable weights, optimizer, scheduler, RNG and data position, written atomically."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from align import rundir

PREFIX = "step-"
STATE = "trainer_state.pt"


def save(run_dir: Path, step: int, policy, optimizer, scheduler, extra: dict, keep: int) -> Path:
    root = run_dir / rundir.CKPT_DIR
    staging = root / f".{PREFIX}{step}.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    policy.save(staging / "adapter")
    torch.save({
        "step": step,
        "trainable": {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "extra": extra,
    }, staging / STATE)
    final = root / f"{PREFIX}{step}"
    rundir.commit_dir(staging, final)
    rundir.rotate(root, keep, PREFIX)
    return final


def latest(run_dir: Path) -> Path | None:
    found = rundir.checkpoints(run_dir / rundir.CKPT_DIR, PREFIX)
    return found[-1] if found else None


def load(ckpt: Path, policy, optimizer, scheduler) -> tuple[int, dict]:
    """Restore everything saved by :func:`save`; returns (step, extra)."""
    state = torch.load(ckpt / STATE, weights_only=False)
    params = dict(policy.model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"], state["extra"]
