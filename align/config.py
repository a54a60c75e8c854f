"""Typed run configuration: the single source of truth for every recipe key.

Each field is documented once, in its ``metadata["help"]``; ``align config --doc`` prints them.
YAML recipes fill the dataclasses, then ``key.sub=value`` overrides from the command line.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class TinyModelConfig:
    num_hidden_layers: int = _f(3, "Decoder layers; layer 0 is dense, the rest MoE.")
    hidden_size: int = _f(128, "Model width.")
    num_attention_heads: int = _f(4, "Attention heads.")
    qk_nope_head_dim: int = _f(32, "Per-head query/key dims without rope.")
    qk_rope_head_dim: int = _f(64, "Per-head rope dims (vLLM's CPU MLA kernel needs 64).")
    v_head_dim: int = _f(32, "Per-head value dims.")
    kv_lora_rank: int = _f(512, "MLA latent width (vLLM's CPU MLA kernel needs 512).")
    intermediate_size: int = _f(256, "Dense MLP width (layer 0).")
    moe_intermediate_size: int = _f(64, "Width of each routed expert.")
    n_routed_experts: int = _f(8, "Routed experts per MoE layer.")
    n_shared_experts: int = _f(2, "Shared experts per MoE layer.")
    num_experts_per_tok: int = _f(2, "Top-k routed experts per token.")
    max_position_embeddings: int = _f(256, "Longest sequence.")
    seed: int = _f(0, "Seed of the random initial weights.")


@dataclass
class ModelConfig:
    name_or_path: str = _f("tiny", "Hub id or local path of a DeepSeek-V2 model or align checkpoint; 'tiny' builds the "
                                   "embedded random model.")
    tiny: TinyModelConfig = _sub(TinyModelConfig, "Shape of the embedded tiny model.")
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16 or float16.")
    attn_implementation: str = _f("sdpa", "transformers attention: eager, sdpa, flash_attention_2.")
    packed_attention: str = _f("mask", "Packed rows (grpo.pack_tokens): mask is transformers' block-diagonal mask "
                                       "(SDPA picks cuDNN on Hopper); varlen attends within each sequence by its "
                                       "boundaries (flash attention on GPUs in bf16, no mask; H200: no faster in the "
                                       "update, see bench/README.md). Only with attn_implementation sdpa.")
    experts_implementation: str = _f("auto", "Routed-experts kernel: auto (grouped_mm on GPU, eager on CPU), eager, "
                                             "grouped_mm, batched_mm.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    recompute_layers: int = _f(-1, "With gradient_checkpointing: recompute only the first N decoder layers and keep "
                                   "the other layers' activations (faster, more memory); -1 recomputes every layer.")
    fused_kernels: bool = _f(True, "On GPUs, compiled RMSNorm, rope and log-softmax (align/kernels/patches.py); no "
                                   "effect on the CPU.")
    compile_layers: bool = _f(False, "On GPUs, torch.compile every decoder layer that is not recomputed, for training "
                                     "forwards (see model.recompute_layers; the first steps spend a minute or two "
                                     "compiling); no effect on the CPU.")
    trust_remote_code: bool = _f(False, "Allow hub models with custom code (not needed for DeepSeek-V2 on "
                                        "transformers>=5).")


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "Train LoRA adapters; false trains all weights (full fine-tuning).")
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    dropout: float = _f(0.0, "LoRA dropout.")
    attention: bool = _f(True, "Adapt MLA projections (q_proj/q_a_proj/q_b_proj, kv_a_proj_with_mqa, kv_b_proj, "
                               "o_proj).")
    dense_mlp: bool = _f(True, "Adapt dense MLPs (first_k_dense_replace layers).")
    shared_experts: bool = _f(True, "Adapt shared-expert MLPs.")
    routed_experts: bool = _f(True, "Adapt fused routed experts (experts.gate_up_proj, experts.down_proj) via "
                                    "target_parameters.")
    train_router: bool = _f(False, "Train the MoE router (gate) weights; frozen by default.")
    grouped_experts: bool = _f(True, "Apply routed-expert LoRA as grouped low-rank products instead of PEFT's W + ΔW "
                                     "stack (same function, align/expert_lora.py).")
    addmm_dense: bool = _f(True, "Apply dense LoRA (attention, shared experts, dense MLP) as one addmm, base + "
                                 "x·A·(sB), instead of PEFT's separate scale and add (same function, "
                                 "align/dense_lora.py).")
    adapter_dtype: str = _f("float32", "LoRA weight dtype: float32 (PEFT's default) or bfloat16 (faster on GPUs: no "
                                       "fp32 casts around every adapter matmul).")
    modules_to_save: list = _f([], "Modules trained in full besides LoRA, e.g. [embed_tokens, lm_head].")


@dataclass
class SyntheticConfig:
    num_train: int = _f(20000, "Training rows generated.")
    num_eval: int = _f(200, "Held-out rows generated (disjoint problems).")
    max_operand: int = _f(30, "Operands are drawn from 0..max_operand.")
    num_terms: list = _f([2], "How many operands a problem may have (chosen uniformly).")
    ops: str = _f("+", "Operators drawn from this string, e.g. '+-'.")
    noise: float = _f(0.0, "Fraction of training answers replaced by a near miss (a noisy teacher); held-out gold "
                           "stays exact.")
    seed: int = _f(1234, "Seed of the generator.")


@dataclass
class DataConfig:
    train: str = _f("synthetic", "Training data: 'synthetic', a hub dataset id, or a local .json/.jsonl/.parquet file.")
    eval: str = _f("synthetic", "Held-out data, same forms as train; '' for none.")
    split: str = _f("train", "Split of a hub dataset for training.")
    eval_split: str = _f("test", "Split of a hub dataset for evaluation.")
    subset: str = _f("", "Hub dataset configuration name, e.g. 'main' for openai/gsm8k.")
    columns: dict = _f({}, "Rename dataset columns to the names verifiers read, e.g. {tests: test_list}.")
    messages_field: str = _f("messages", "Column holding chat messages.")
    prompt_field: str = _f("question", "Column with the prompt text when rows have no messages (GRPO, eval).")
    answer_field: str = _f("answer", "Column with the gold answer (GRPO, eval); '' for tasks verified by tests.")
    system_prompt: str = _f("", "System message prepended to prompts built from prompt_field.")
    max_length: int = _f(128, "Longest tokenized training sequence; longer ones are truncated.")
    packing: bool = _f(False, "Pack several short sequences into one row.")
    synthetic: SyntheticConfig = _sub(SyntheticConfig, "Generator of the embedded arithmetic task.")


@dataclass
class TrainConfig:
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler: str = _f("cosine", "transformers scheduler name: constant, linear, cosine…")
    warmup_ratio: float = _f(0.03, "Fraction of steps warming up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    batch_size: int = _f(8, "Sequences per micro-batch over all processes (each takes batch_size / processes).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    epochs: float = _f(1.0, "Epochs over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Optimizer steps; -1 runs `epochs`.")
    seed: int = _f(42, "Training seed.")
    logging_steps: int = _f(10, "Log metrics every N steps.")
    save_steps: int = _f(0, "Save a checkpoint every N steps; 0 saves only the final model.")
    save_total_limit: int = _f(2, "Keep at most this many periodic checkpoints.")
    resume: bool = _f(False, "Continue from the newest checkpoint in output.dir.")
    num_threads: int = _f(0, "torch CPU threads; 0 keeps torch's default.")
    expandable_segments: bool = _f(False, "GPU: the trainer's CUDA allocations grow expandable segments (torch's "
                                          "PYTORCH_CUDA_ALLOC_CONF setting, switched on after a colocated engine "
                                          "started), against fragmentation near the memory limit. H200, V2-Lite "
                                          "GRPO step: slower (vLLM's sleep 0.4 -> 3.9 s), so off.")
    report_to: list = _f([], "Trackers besides metrics.jsonl and TensorBoard: wandb, mlflow, trackio (each needs its "
                             "package; project from WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME / TRACKIO_PROJECT, default "
                             "'align').")


@dataclass
class MonitorConfig:
    enabled: bool = _f(True, "Record expert load on every training forward pass.")
    balance_alpha1: float = _f(0.0, "Expert-level balance loss weight (DeepSeek-V2 alpha1); 0 disables.")
    balance_alpha2: float = _f(0.0, "Device-level balance loss weight (DeepSeek-V2 alpha2); 0 disables.")
    num_devices: int = _f(1, "Expert groups D for the device-level loss (experts split evenly).")
    dead_threshold: float = _f(0.0, "An expert whose load share is <= this over a step counts as dead.")


@dataclass
class RolloutConfig:
    engine: str = _f("auto", "auto (vLLM if importable; else fast on a GPU, hf on the CPU), vllm, fast, or hf.")
    num_generations: int = _f(8, "Completions per prompt (group size G).")
    temperature: float = _f(1.0, "Sampling temperature.")
    top_p: float = _f(1.0, "Nucleus sampling.")
    max_new_tokens: int = _f(32, "Longest completion; longer ones finish with reason 'length'.")
    stop: list = _f([], "Extra stop strings.")
    gpu_memory_utilization: float = _f(0.3, "vLLM memory fraction (on CPU: share of the KV cache space).")
    kv_cache_gib: float = _f(0.0, "GPU: vLLM's KV cache in GiB (its kv_cache_memory_bytes), whatever the GPU's size; "
                                  "0: sized by gpu_memory_utilization. Ignored on the CPU.")
    tensor_parallel_size: int = _f(1, "vLLM tensor parallel degree; under several processes k consecutive ranks share "
                                      "one engine.")
    enforce_eager: bool | None = _f(None, "vLLM without CUDA graphs / compile (faster start, slower decode); unset: "
                                          "eager on the CPU, CUDA graphs on GPUs (5.8x the eager decode at V2-Lite, "
                                          "batch 64).")
    sleep_level: int = _f(2, "vLLM sleep between rollouts on GPUs: 2 drops weights and KV cache (all weights re-synced "
                             "each step, ~2 s at V2-Lite), 1 copies weights to host memory (18-45 s at V2-Lite), 0 "
                             "keeps the memory. The CPU has no sleep mode.")
    offload_policy_weights: bool = _f(False, "GPU, vLLM: the policy's frozen weights wait in pinned host memory from "
                                             "the weight sync to the engine's sleep, so the rollout holds the weights "
                                             "once, not twice (copied out once, back every step).")
    per_prompt_seeds: bool = _f(True, "Seed every prompt's requests: samples independent of batch and rank layout "
                                      "(equal runs at any world size). false: vLLM requests carry no seed and each "
                                      "generate call is seeded as a whole (same samples after a resume, "
                                      "layout-dependent).")
    engine_kwargs: dict = _f({}, "Extra vllm.LLM keyword arguments, e.g. {max_num_seqs: 512}.")
    seed: int = _f(0, "Sampling seed.")


@dataclass
class RewardConfig:
    functions: dict = _f({"math": 1.0}, "Reward name -> weight: math, code, format, or the dotted path of your own "
                                        "function with TRL's signature fn(completions, **columns) (e.g. "
                                        "my_pkg.rewards.brevity: 0.1).")
    timeout_s: float = _f(5.0, "Per-sample verification time limit.")
    workers: int = _f(0, "Scoring processes; 0 = number of cores (the code sandbox runs twice as many runs at once).")
    allow_unisolated_code: bool = _f(False, "Let the code reward run candidates without namespaces and separate uids "
                                            "(machines without root): UNSAFE, candidates can then read this user's "
                                            "files and environment.")


@dataclass
class GRPOConfig:
    prompts_per_step: int = _f(16, "Prompts B per step over all processes; B x G completions.")
    steps: int = _f(100, "GRPO steps.")
    advantage: str = _f("grpo", "Advantage estimator: grpo, dr_grpo, rloo.")
    loss: str = _f("grpo", "Policy loss: grpo, dr_grpo, dapo, gspo.")
    epsilon: float = _f(0.2, "Clip range (epsilon_low for dapo).")
    epsilon_high: float = _f(0.28, "Upper clip range for dapo.")
    beta: float = _f(0.0, "KL coefficient to the reference (adapter disabled); 0 skips the reference pass.")
    kl_estimator: str = _f("k3", "KL estimator: k1, k2, k3.")
    mu: int = _f(1, "Update iterations per batch of rollouts.")
    minibatch_size: int = _f(64, "Sequences per optimizer minibatch over all processes.")
    micro_batch_size: int = _f(0, "Sequences per forward/backward on each process inside a minibatch (gradients "
                                  "accumulate; rows grouped by length, padding trimmed); 0 runs the whole local "
                                  "minibatch at once.")
    max_tokens_per_micro_batch: int = _f(0, "Token budget of each forward/backward inside a minibatch (rows x padded "
                                            "width; rows grouped by length, long rows alone), instead of "
                                            "grpo.micro_batch_size rows; 0 uses micro_batch_size.")
    logprob_tokens_per_micro_batch: int = _f(0, "Token budget of the no-grad old/reference log-prob passes (larger "
                                                "than the update's: no backward); 0 = max_tokens_per_micro_batch. "
                                                "Under router replay the old pass keeps the update's parts.")
    pack_tokens: int = _f(0, "Padding-free packing: each forward takes the real tokens of its micro-batch end to end "
                             "in rows of about this many (positions restart per sequence, attention never crosses "
                             "sequences); token budgets then count real tokens. 0: padded rows.")
    dynamic_sampling: bool = _f(False, "Drop groups whose rewards are all equal.")
    mask_truncated: bool = _f(True, "Exclude completions cut at max_new_tokens from the loss.")
    tis_cap: float = _f(0.0, "Truncated importance-sampling cap for train/infer mismatch; 0 disables.")
    router_replay: bool = _f(False, "Reuse the old-policy routing in update passes.")
    max_bad_steps: int = _f(3, "Stop after this many non-finite losses in a row.")
    eval_every: int = _f(0, "Evaluate held-out accuracy every N steps; 0 only at the end.")


@dataclass
class EvalConfig:
    num_samples: int = _f(200, "Held-out prompts evaluated (0 = all).")
    n: int = _f(1, "Samples per prompt (for pass@k).")
    k: list = _f([1], "k values for pass@k.")
    temperature: float = _f(0.0, "0 = greedy.")
    max_new_tokens: int = _f(32, "Longest answer.")


@dataclass
class OutputConfig:
    dir: str = _f("runs/tiny_sft", "Run directory (config, metrics, checkpoints, final model, plots).")
    overwrite: bool = _f(False, "Allow writing into a non-empty run directory without resume.")
    tensorboard: bool = _f(True, "Write TensorBoard events under <dir>/tb.")


@dataclass
class AlignConfig:
    model: ModelConfig = _sub(ModelConfig, "Base model.")
    lora: LoraConfig = _sub(LoraConfig, "Adapters and what they reach.")
    data: DataConfig = _sub(DataConfig, "Datasets.")
    train: TrainConfig = _sub(TrainConfig, "Optimizer and schedule.")
    monitor: MonitorConfig = _sub(MonitorConfig, "Expert-balance monitoring and losses.")
    rollout: RolloutConfig = _sub(RolloutConfig, "Generation engine (GRPO, eval).")
    rewards: RewardConfig = _sub(RewardConfig, "Verifiers (GRPO, eval).")
    grpo: GRPOConfig = _sub(GRPOConfig, "GRPO algorithm.")
    eval: EvalConfig = _sub(EvalConfig, "Held-out evaluation.")
    output: OutputConfig = _sub(OutputConfig, "Run directory.")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        return _coerce(value, next(a for a in typing.get_args(tp) if a is not type(None)), where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (list, dict) and isinstance(value, tp):
        return value
    if tp is list and isinstance(value, (str, int, float)):
        return [value]
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _fill(obj: Any, data: dict, where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    for key, value in data.items():
        path = f"{where}.{key}" if where and not where.endswith(":") else f"{where} {key}"
        if key not in names:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _fill(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> AlignConfig:
    """Build an :class:`AlignConfig` from a YAML recipe plus ``a.b=c`` overrides."""
    cfg = AlignConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: recipe file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        _fill(cfg, data, f"{p}:")
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _fill(cfg, nested, "override:")
    validate(cfg)
    return cfg


def validate(cfg: AlignConfig) -> None:
    """Cross-field checks that types alone cannot express."""
    checks = [
        (cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype: one of float32, bfloat16, float16"),
        (cfg.lora.r > 0, "lora.r: must be > 0"),
        (cfg.lora.dropout == 0 or not (cfg.lora.enabled and cfg.lora.routed_experts),
         "lora.dropout: must be 0 with lora.routed_experts=true (LoRA on fused experts cannot apply dropout)"),
        (cfg.grpo.micro_batch_size >= 0, "grpo.micro_batch_size: must be >= 0 (0: no accumulation)"),
        (cfg.grpo.max_tokens_per_micro_batch >= 0, "grpo.max_tokens_per_micro_batch: must be >= 0 (0: by rows)"),
        (cfg.grpo.logprob_tokens_per_micro_batch >= 0, "grpo.logprob_tokens_per_micro_batch: must be >= 0"),
        (cfg.grpo.pack_tokens >= 0, "grpo.pack_tokens: must be >= 0 (0: padded rows)"),
        (cfg.model.recompute_layers >= -1, "model.recompute_layers: -1 (every layer) or a layer count >= 0"),
        (cfg.model.packed_attention in ("varlen", "mask"), "model.packed_attention: varlen or mask"),
        (cfg.train.batch_size > 0, "train.batch_size: must be > 0"),
        (cfg.train.grad_accum >= 1, "train.grad_accum: must be >= 1"),
        (cfg.grpo.minibatch_size >= 1, "grpo.minibatch_size: must be >= 1"),
        (cfg.grpo.prompts_per_step >= 1, "grpo.prompts_per_step: must be >= 1"),
        (cfg.grpo.mu >= 1, "grpo.mu: must be >= 1"),
        (cfg.grpo.steps >= 1, "grpo.steps: must be >= 1"),
        (cfg.train.learning_rate > 0, "train.learning_rate: must be > 0"),
        (cfg.lora.adapter_dtype in ("float32", "bfloat16"), "lora.adapter_dtype: one of float32, bfloat16"),
        (cfg.rollout.engine in ("auto", "vllm", "fast", "hf"), "rollout.engine: one of auto, vllm, fast, hf"),
        (cfg.rollout.num_generations >= 1, "rollout.num_generations: must be >= 1"),
        (cfg.rollout.sleep_level in (0, 1, 2), "rollout.sleep_level: one of 0, 1, 2"),
        (cfg.grpo.kl_estimator in ("k1", "k2", "k3"), "grpo.kl_estimator: one of k1, k2, k3"),
        (cfg.monitor.num_devices >= 1, "monitor.num_devices: must be >= 1"),
        (cfg.data.max_length > 0, "data.max_length: must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    _check_trackers(cfg.train.report_to)


def _check_trackers(names: list) -> None:
    import importlib.util

    known = ("wandb", "mlflow", "trackio", "tensorboard")
    for name in names:
        if name not in known:
            raise ConfigError(f"train.report_to: unknown tracker {name!r} (known: {', '.join(known)})")
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to: {name} is not installed (pip install {name})")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: AlignConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = AlignConfig, prefix: str = "") -> list[str]:
    """One line per field: ``key (type, default): help`` — the config reference."""
    lines = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines.extend(describe(type(default), key + "."))
        else:
            tp = typing.get_type_hints(cls)[f.name]
            lines.append(f"  {key} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")
    return lines
