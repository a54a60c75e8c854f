import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "align"))


def run_cli(*args, cwd=None, timeout=900):
    """Run ``align`` in a subprocess (how users run it; keeps vLLM's globals out of pytest)."""
    import subprocess

    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "align.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": path})


@pytest.fixture(scope="session")
def sft_checkpoint(tmp_path_factory):
    """A short full-fine-tuning SFT run of the tiny model (shared by GRPO, rollout and eval tests)."""
    out = tmp_path_factory.mktemp("sft") / "run"
    res = run_cli("sft", ROOT / "recipes" / "tiny_sft.yaml", f"output.dir={out}", "train.max_steps=300",
                  "eval.num_samples=100", "train.save_steps=100")
    assert res.returncode == 0, res.stderr[-3000:]
    return out
