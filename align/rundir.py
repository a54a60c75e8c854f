"""The run directory: resolved config, metrics (JSONL + TensorBoard), atomic checkpoints."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from align.config import AlignConfig, dump_yaml
from align.errors import AlignError

CKPT_DIR = "checkpoints"
FINAL_DIR = "final"


def prepare(cfg: AlignConfig, resume: bool, main: bool = True) -> Path:
    """Create (or reopen for resume) the run directory; never clobber an existing run silently.

    Only the main process of a multi-process run writes (``main=False`` just names the directory).
    """
    out = Path(cfg.output.dir)
    if not main:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise AlignError(f"output.dir={str(out)!r}: not writable ({e.strerror})") from None
    existing = [p for p in out.iterdir() if p.name not in (".write_test",)]
    if existing and not resume and not cfg.output.overwrite:
        raise AlignError(
            f"output.dir={str(out)!r} is not empty; pass train.resume=true to continue or output.overwrite=true")
    if not resume:
        for name in ("metrics.jsonl", "tb", CKPT_DIR, FINAL_DIR, "plots", "base"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    (out / "config.yaml").write_text(dump_yaml(cfg))
    return out


class MetricsLogger:
    """Append-only JSONL metrics plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the history has no duplicates."""
    rows = [r for r in read_metrics(run_dir) if r.get("step", 0) <= after_step]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def commit_dir(staging: Path, final: Path) -> None:
    """Atomically publish a fully written directory (rename within one filesystem)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def checkpoints(ckpt_root: Path, prefix: str = "checkpoint-") -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))


def rotate(ckpt_root: Path, keep: int, prefix: str = "checkpoint-") -> None:
    if keep <= 0:
        return
    for old in checkpoints(ckpt_root, prefix)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
