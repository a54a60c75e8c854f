"""Same recipe, 1 process vs N processes under each launch config: do the curves agree?

Runs a short GRPO (and optionally SFT) of the tiny recipes once in a single process and once per
``recipes/accelerate/*.yaml`` config with ``--num_processes N`` (NCCL on GPUs), then compares the
per-step numbers that must not depend on the world size.

    python bench/distributed.py --sft runs/tiny_sft/final --nproc 2 --configs ddp,zero2,fsdp2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRPO = ["grpo.steps=4", "eval.num_samples=8", "grpo.prompts_per_step=8", "rollout.num_generations=4",
        "grpo.minibatch_size=16", "grpo.mu=2", "train.save_steps=0", "output.tensorboard=false",
        "rollout.engine=hf"]
SFT = ["train.max_steps=20", "train.logging_steps=2", "eval.num_samples=8", "output.tensorboard=false",
       "data.synthetic.num_train=400"]
KEYS = {"grpo": ("actor/pg_loss", "actor/grad_norm", "reward/mean", "completion/tokens"), "sft": ("loss", "grad_norm")}


def _launch(config: str | None, nproc: int, stage: str, recipe: str, out: Path, overrides: list[str]) -> dict:
    if config is None:
        cmd = [sys.executable, "-m", "align.cli"]
    elif config.endswith(".json"):
        # A raw DeepSpeed config, e.g. ZeRO-3 with every parameter partitioned (no persistence).
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
               str(ROOT / config), "--num_processes", str(nproc), "-m", "align.cli"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / f"{config}.yaml"), "--num_processes", str(nproc),
               "-m", "align.cli"]
    cmd += [stage, str(ROOT / "recipes" / recipe), f"output.dir={out}", "output.overwrite=true", *overrides]
    env = dict(os.environ)
    if config is None:
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.time() - t
    if res.returncode != 0:
        return {"ok": False, "wall_s": round(wall, 1), "error": res.stderr[-2500:]}
    from align.rundir import read_metrics

    rows = [r for r in read_metrics(out) if any(k in r for k in KEYS[stage])]
    return {"ok": True, "wall_s": round(wall, 1), "rows": rows}


def _compare(ref: list[dict], got: list[dict], keys) -> dict:
    worst = {}
    for a, b in zip(ref, got):
        for k in keys:
            if k in a and k in b:
                d = abs(a[k] - b[k]) / max(abs(a[k]), 1e-12)
                worst[k] = max(worst.get(k, 0.0), d)
    return {"max_rel_diff": worst, "steps_compared": min(len(ref), len(got))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True, help="a Chat (SFT) checkpoint for the GRPO runs")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--configs", default="ddp,zero2,fsdp2")
    ap.add_argument("--stages", default="grpo,sft")
    ap.add_argument("--work", default="/tmp/align_dist")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"device": device, "gpus": torch.cuda.device_count(), "nproc": args.nproc, "torch": torch.__version__,
              "runs": {}}
    for stage in args.stages.split(","):
        recipe, overrides = ("tiny_math_rl.yaml", [f"model.name_or_path={args.sft}", *GRPO]) if stage == "grpo" \
            else ("tiny_sft.yaml", SFT)
        ref = _launch(None, 1, stage, recipe, Path(args.work) / f"{stage}_single", overrides)
        result["runs"][f"{stage}/single"] = {k: v for k, v in ref.items() if k != "rows"}
        print(stage, "single", ref["ok"], ref["wall_s"], flush=True)
        for config in args.configs.split(","):
            work = Path(args.work) / f"{stage}_{Path(config).stem}"
            got = _launch(config, args.nproc, stage, recipe, work, overrides)
            entry = {k: v for k, v in got.items() if k != "rows"}
            if got["ok"] and ref["ok"]:
                entry.update(_compare(ref["rows"], got["rows"], KEYS[stage]))
                entry["curve"] = [{k: r.get(k) for k in ("step", *KEYS[stage])} for r in got["rows"]]
            result["runs"][f"{stage}/{config}"] = entry
            print(stage, config, json.dumps(entry)[:600], flush=True)
        if ref["ok"]:
            curve = [{k: r.get(k) for k in ("step", *KEYS[stage])} for r in ref["rows"]]
            result["runs"][f"{stage}/single"]["curve"] = curve
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or ROOT / "bench" / "results" / f"distributed_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
