"""The tiny SFT recipe learns, writes a complete run directory, and resumes from its checkpoint."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.rundir import read_metrics
from conftest import ROOT, run_cli

# Golden losses of recipes/tiny_sft.yaml (train.max_steps=300) at fixed steps; CPU float32.
GOLDEN = json.loads((ROOT / "tests" / "golden" / "tiny_sft.json").read_text())


def test_sft_learns_and_writes_run_dir(sft_checkpoint):
    summary = json.loads((sft_checkpoint / "summary.json").read_text())
    assert summary["last_logged_loss"] < 0.35 * summary["first_logged_loss"]
    before, after = summary["held_out_before"], summary["held_out_after"]
    assert before["greedy_accuracy"] == 0.0 and after["greedy_accuracy"] >= 0.05
    for name in ("config.yaml", "metrics.jsonl", "plots/expert_load_sft.png", "final/tokenizer.json",
                 "final/model.safetensors", "checkpoints/checkpoint-300"):
        assert (sft_checkpoint / name).exists(), name
    assert not (sft_checkpoint / "checkpoints" / "checkpoint-100").exists(), "save_total_limit=2"
    assert list((sft_checkpoint / "tb").glob("events.*"))
    rows = [r for r in read_metrics(sft_checkpoint) if "loss" in r]
    assert all("moe/layer1/cv" in r and "moe/maxvio_max" in r for r in rows)


def test_golden_losses(sft_checkpoint):
    losses = {r["step"]: r["loss"] for r in read_metrics(sft_checkpoint) if "loss" in r}
    for step, value in GOLDEN["loss"].items():
        assert losses[int(step)] == pytest.approx(value, rel=0.05), f"step {step}"


def test_final_checkpoint_loads_in_plain_transformers(sft_checkpoint):
    tok = AutoTokenizer.from_pretrained(sft_checkpoint / "final")
    model = AutoModelForCausalLM.from_pretrained(sft_checkpoint / "final", dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith("2+2=")


def test_resume_continues_from_last_checkpoint(sft_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_checkpoint, run)
    shutil.rmtree(run / "checkpoints" / "checkpoint-300")
    res = run_cli("sft", ROOT / "recipes" / "tiny_sft.yaml", f"output.dir={run}", "train.max_steps=300",
                  "eval.num_samples=20", "train.save_steps=100", "train.resume=true")
    assert res.returncode == 0, res.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == sorted(set(steps)), "no duplicated steps after resume"
    orig = {r["step"]: r["loss"] for r in read_metrics(sft_checkpoint) if "loss" in r}
    new = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert min(s for s in new if s > 200) == 225, "training continued after the step-200 checkpoint"
    assert new[300] == pytest.approx(orig[300], rel=0.1)


def test_sft_follows_the_launchers_mixed_precision(monkeypatch):
    """accelerate launch with bf16 (e.g. recipes/accelerate/zero3.yaml) and an fp32 recipe: TRL must
    be told bf16 too, or DeepSpeed's config check stops the run (seen on 2xH200)."""
    from align.config import load_config
    from align.sft import use_bf16

    cfg = load_config(None, [])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert use_bf16(cfg, cuda=True) and not use_bf16(cfg, cuda=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert not use_bf16(cfg, cuda=True)
    assert use_bf16(load_config(None, ["model.dtype=bfloat16"]), cuda=True)
