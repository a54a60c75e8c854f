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
PREVIOUS = ".previous"


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
    # A config.yaml alone is what a start that failed before training leaves: it does not make a run.
    existing = [p for p in out.iterdir() if p.name not in (".write_test", "config.yaml", PREVIOUS)]
    if existing and not resume and not cfg.output.overwrite:
        raise AlignError(
            f"output.dir={str(out)!r} is not empty; pass train.resume=true to continue or output.overwrite=true")
    if not resume and existing:
        _set_aside(out, existing)
    (out / "config.yaml").write_text(dump_yaml(cfg))
    return out


def _set_aside(out: Path, entries: list[Path]) -> None:
    """``output.overwrite=true``: the previous run moves to ``<dir>/.previous`` and is deleted only once the new run
    has written its final model (:func:`drop_previous`), so a new run that fails early loses nothing."""
    aside = out / PREVIOUS
    if aside.exists():
        shutil.rmtree(aside)
    aside.mkdir()
    for p in entries:
        os.replace(p, aside / p.name)


def restore_previous(run_dir: str | Path) -> bool:
    """Undo :func:`_set_aside` after a failed run: its partial outputs go, the previous run comes back."""
    aside = Path(run_dir) / PREVIOUS
    if not aside.is_dir():
        return False
    for p in aside.iterdir():
        target = Path(run_dir) / p.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(p, target)
    aside.rmdir()
    return True


def drop_previous(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / PREVIOUS, ignore_errors=True)


class MetricsLogger:
    """Append-only JSONL metrics plus TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, trackers: list | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers or []
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
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()


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
    """Atomically publish a fully written directory (rename within one filesystem); publishing a run's final
    model also drops the run it replaced."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    if final.name == FINAL_DIR:
        drop_previous(final.parent)


def checkpoints(ckpt_root: Path, prefix: str = "checkpoint-") -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.iterdir()
             if p.is_dir() and p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))


def rotate(ckpt_root: Path, keep: int, prefix: str = "checkpoint-") -> None:
    if keep <= 0:
        return
    for old in checkpoints(ckpt_root, prefix)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
