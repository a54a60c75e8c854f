"""SFT stage: TRL's SFTTrainer with the MoE-aware policy, the expert monitor and atomic checkpoints."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import set_seed
from trl import SFTConfig, SFTTrainer
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from align import data as data_mod
from align import rundir, stage
from align.config import AlignConfig, to_dict
from align.dist import Dist
from align.errors import AlignError
from align.trackers import open_trackers
from align.modeling import load_full_checkpoint, load_tokenizer, resolve_base
from align.moe import ExpertMonitor
from align.offload import use_expandable_segments
from align.policy import Policy, load_policy

log = logging.getLogger(__name__)


class AlignSFTTrainer(SFTTrainer):
    """SFTTrainer plus: balance losses in the loss, MoE metrics in every log, atomic checkpoints."""

    def __init__(self, *args, monitor: ExpertMonitor | None = None, metrics: rundir.MetricsLogger | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.monitor = monitor
        self.metrics = metrics
        self.dist = Dist(self.accelerator)
        self._throughput = Throughput()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        aux = self.monitor.pop_aux_loss() if self.monitor is not None else None
        if aux is None:
            return out
        self._aux_total = getattr(self, "_aux_total", 0.0) + aux.detach()  # a tensor: no host sync per micro-step
        if return_outputs:
            return out[0] + aux, out[1]
        return out + aux

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._throughput.update(self._metrics["train"].get("num_tokens", [0])[-1]))
        if self.monitor is not None and "loss" in logs:
            if self.dist.world > 1:
                self.monitor.merge_ranks(self.dist.sum_tensor)
            logs.update(self.monitor.summary())
            if hasattr(self, "_aux_total"):
                passes = max(1, self.args.logging_steps * self.args.gradient_accumulation_steps)
                logs["moe/balance_loss"] = float(self._aux_total) / passes
                self._aux_total = 0.0
        super().log(logs, start_time)
        if self.metrics is not None:
            self.metrics.log(self.state.global_step, logs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Full-weights checkpoints are loaded strictly, experts fused back (``modeling.load_full_checkpoint``);
        adapters, FSDP and DeepSpeed checkpoints take the Trainer's own path."""
        model = model if model is not None else self.model
        full = (Path(resume_from_checkpoint) / "model.safetensors").is_file() or \
            (Path(resume_from_checkpoint) / "model.safetensors.index.json").is_file()
        if not full or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_full_checkpoint(self.accelerator.unwrap_model(model), resume_from_checkpoint)

    def _save_checkpoint(self, model, trial) -> None:
        real = self.args.output_dir
        staging = Path(real) / ".staging"
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = real
        # Every rank writes its shard (DeepSpeed, FSDP) into staging; publish once all are done.
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            for done in staging.glob("checkpoint-*"):
                rundir.commit_dir(done, Path(real) / done.name)
            rundir.rotate(Path(real), self.args.save_total_limit or 0)
        self.accelerator.wait_for_everyone()


class Throughput:
    """Tokens/s over each logging window from TRL's running ``num_tokens`` (all processes' real tokens), and the
    peak GPU memory so far: what a user compares between runs and with other trainers."""

    def __init__(self):
        self.tokens, self.t = None, None

    def update(self, tokens: float) -> dict:
        now = time.perf_counter()
        out = {}
        if self.t is not None and now > self.t and tokens > self.tokens:
            out["throughput/tokens_per_s"] = (tokens - self.tokens) / (now - self.t)
        if torch.cuda.is_available():
            out["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.tokens, self.t = tokens, now
        return out


class _Progress(TrainerCallback):
    """One progress line for SFT, as GRPO has: a bar with the step, the loss, the learning rate and the expert-load
    CV (the Trainer's own printer dumps every metric dict; they are all in metrics.jsonl and TensorBoard)."""

    def __init__(self, enabled: bool):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]sft[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            disable=not enabled)
        self.task = None

    def on_train_begin(self, args, state, control, **kw):
        self.bar.start()
        self.task = self.bar.add_task("sft", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kw):
        self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            cv = f" moe cv {logs['moe/cv_mean']:.2f}" if "moe/cv_mean" in logs else ""
            tps = f" {logs['throughput/tokens_per_s']:,.0f} tok/s" if "throughput/tokens_per_s" in logs else ""
            self.bar.update(self.task, info=f"loss {logs['loss']:.3f} lr {logs.get('learning_rate', 0):.1e}{cv}{tps}")

    def on_train_end(self, args, state, control, **kw):
        self.bar.stop()


def _trainable_rows(rows: list[dict], tokenizer, cfg: AlignConfig) -> list[dict]:
    """Drop rows whose prompt alone fills ``data.max_length`` (truncation would leave no answer token to learn),
    saying how many; none left is a one-line error, not a sampler traceback."""
    field, limit = cfg.data.messages_field, cfg.data.max_length

    def prompt_len(row) -> int:
        ids = tokenizer.apply_chat_template(row[field][:-1], add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    kept = [r for r in rows if prompt_len(r) < limit]
    if not kept:
        raise AlignError(f"data.max_length={limit}: every training prompt is at least that long; nothing to learn")
    if len(kept) < len(rows):
        log.warning("dropped %d of %d training rows whose prompt is %d tokens or longer (data.max_length)",
                    len(rows) - len(kept), len(rows), limit)
    return kept


def _dataset(rows: list[dict], messages_field: str) -> Dataset:
    if rows and messages_field in rows[0]:
        return Dataset.from_list([{"messages": r[messages_field]} for r in rows])
    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def use_bf16(cfg: AlignConfig, cuda: bool) -> bool:
    """bf16 for bf16 weights, or when ``accelerate launch`` asks for bf16: TRL must agree with the
    launcher, or DeepSpeed's config check (``bf16.enabled`` vs ``TrainingArguments.bf16``) stops the run."""
    return cuda and (cfg.model.dtype == "bfloat16" or os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16")


def sft_args(cfg: AlignConfig, ckpt_dir: Path, world: int = 1) -> SFTConfig:
    """TRL arguments; ``train.batch_size`` is global, split evenly over the ``world`` processes."""
    t = cfg.train
    if t.batch_size % world:
        raise AlignError(f"train.batch_size={t.batch_size} must be divisible by the {world} processes (it is global)")
    return SFTConfig(
        output_dir=str(ckpt_dir),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.batch_size // world,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps > 0 else "no",
        save_steps=t.save_steps if t.save_steps > 0 else 500,
        save_total_limit=t.save_total_limit,
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        assistant_only_loss=True,
        report_to=[],
        disable_tqdm=True,
        bf16=use_bf16(cfg, torch.cuda.is_available()),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        remove_unused_columns=True,
        dataset_num_proc=None,
    )


def held_out_accuracy(policy: Policy, rows: list[dict], cfg: AlignConfig, synced: bool = False) -> dict:
    """Greedy and sampled accuracy (math verifier) on held-out chat rows, through the HF engine.

    ``synced``: every rank generates in lockstep (weights sharded by ZeRO-3 / FSDP)."""
    from align.heldout import held_out_summary
    from rollout.hf import HFEngine

    prompts = [{**r, "prompt": [m for m in r["messages"] if m["role"] != "assistant"]} for r in rows]
    return held_out_summary(HFEngine(policy.model, policy.tokenizer, synced_gpus=synced), policy.tokenizer, prompts,
                            {"math": 1.0}, cfg.eval, cfg.train.seed)


def _save_final(trainer, policy: Policy, run_dir: Path, state: PartialState) -> None:
    def write_sharded(staging: Path) -> None:
        # The trainer gathers ZeRO-3 / FSDP shards and writes on the main process only.
        trainer.save_model(str(staging))
        if state.is_main_process:
            policy.save_extras(staging)

    stage.save_final(run_dir, policy, state.num_processes, state.is_main_process, write_sharded,
                     state.wait_for_everyone)


def run_sft(cfg: AlignConfig) -> dict:
    """Train, then write ``<output.dir>/final`` (Chat (SFT) checkpoint) and a summary; returns the summary.

    Under ``accelerate launch`` / ``torchrun`` every rank runs this; the main rank writes files.
    """
    t0 = time.time()
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1 and torch.cuda.device_count() > 1:
        raise AlignError(f"{torch.cuda.device_count()} GPUs are visible to one process: launch with "
                         "`accelerate launch --config_file recipes/accelerate/ddp.yaml -m align.cli sft ...` "
                         "or set CUDA_VISIBLE_DEVICES=0")
    main = state.is_main_process
    # Everything that can be wrong with the data is found before the run directory is touched.
    train_rows, held = data_mod.sft_rows(cfg.data)
    base_path, adapters = resolve_base(cfg.model.name_or_path)
    train_rows = _trainable_rows(train_rows, load_tokenizer(adapters[-1] if adapters else base_path), cfg)
    with state.main_process_first():
        run_dir = rundir.prepare(cfg, cfg.train.resume, main=main)
    ckpt_dir = run_dir / rundir.CKPT_DIR
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.expandable_segments:
        log.info("train.expandable_segments: allocator config %s", use_expandable_segments())
    set_seed(cfg.train.seed)
    with state.main_process_first():
        policy = load_policy(cfg.model, cfg.lora, base_dir=run_dir / "base" if main else None)
    trainable, total = policy.num_parameters()
    log.info("policy: %s trainable / %s total parameters", f"{trainable:,}", f"{total:,}")
    monitor = stage.make_monitor(policy.model, cfg.monitor)
    resume_from = None
    if cfg.train.resume:
        found = rundir.checkpoints(ckpt_dir)
        resume_from = str(found[-1]) if found else None
        if resume_from and main:
            rundir.truncate_metrics(run_dir, int(found[-1].name.split("-")[1]))
    before = held_out_accuracy(policy, held, cfg) if not resume_from and main else {}
    state.wait_for_everyone()
    trackers = open_trackers(cfg.train.report_to, run_dir, to_dict(cfg)) if main else []
    metrics = rundir.MetricsLogger(run_dir, cfg.output.tensorboard, trackers) if main else None
    trainer = AlignSFTTrainer(
        model=policy.model,
        args=sft_args(cfg, ckpt_dir, state.num_processes),
        train_dataset=_dataset(train_rows, cfg.data.messages_field),
        processing_class=policy.tokenizer,
        callbacks=[_Progress(main)],
        monitor=monitor,
        metrics=metrics,
    )
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    train_out = trainer.train(resume_from_checkpoint=resume_from)
    if monitor is not None:
        monitor.active = False
    synced = trainer.dist.shards_params
    after = held_out_accuracy(policy, held, cfg, synced=synced) if main or synced else {}
    _save_final(trainer, policy, run_dir, state)
    summary = {
        "stage": "sft",
        "train_loss": train_out.training_loss,
        "steps": trainer.state.global_step,
        "first_logged_loss": next((h["loss"] for h in trainer.state.log_history if "loss" in h), None),
        "last_logged_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "held_out_before": before,
        "held_out_after": after,
        "trainable_params": trainable,
        "total_params": total,
        "processes": state.num_processes,
        "wall_s": round(time.time() - t0, 1),
        "final": str(run_dir / rundir.FINAL_DIR),
    }
    if main:
        stage.finish(run_dir, "sft", monitor, metrics, summary)
    return summary
