#!/usr/bin/env bash
# The GPU runs behind the README's GPU table, one stage per device call (each well inside 10 minutes), after the
# four calls of ../shared/tools/gpu-vllm-bundle on the same warm machine:
#   bash bench/h200.sh tier     # pytest -m gpu tests/gpu (CUDA vLLM, tiny GPU shape) + the kernel cache's two runs
#   bash bench/h200.sh grpo     # one GRPO step at V2-Lite shape, align vs TRL GRPOTrainer, same run
#   bash bench/h200.sh sft      # align sft at V2-Lite shape vs TRL SFTTrainer, then align grpo from its checkpoint
#   bash bench/h200.sh update   # issue 17's shape: math_rl.yaml's passes today vs token budgets vs packing
# ENGINE_KWARGS overrides the engine settings of the grpo stage. Logs and JSON go to bench/results/ and $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" bench/results; touch /tmp/stage_start
LEVERS=(grpo.max_tokens_per_micro_batch=16384 grpo.logprob_tokens_per_micro_batch=65536 grpo.pack_tokens=4096
        lora.adapter_dtype=bfloat16)
ENGINE_KWARGS=${ENGINE_KWARGS:-"{max_num_seqs: 512, compilation_config: {mode: 0, cudagraph_mode: FULL_DECODE_ONLY}}"}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "$1" in
  tier)
    timeout 420 python -m pytest -m gpu tests/gpu -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_cuda.log"
    timeout 150 python bench/kernel_cache.py 2>&1 | tail -40 | tee "$OUT/kernel_cache.log"
    ;;
  grpo)
    timeout 580 python bench/grpo_step.py --prompts 16 --steps 2 --trl --trl-rounds 1 --rollout-probe 64 \
      --set grpo.mask_truncated=false "${LEVERS[@]}" "rollout.engine_kwargs=$ENGINE_KWARGS" \
      --name grpo_step_v2-lite_16x16_cuda 2>&1 | grep -v "^\s*$" | tee "$OUT/grpo_step.log" | tail -150
    ;;
  sft)
    timeout 580 python bench/sft_step.py --steps 200 --trl-steps 60 --grpo-back --work /tmp/sft-bench 2>&1 \
      | grep -v "^\s*$" | tee "$OUT/sft_step.log" | tail -120
    ;;
  update)
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 580 python bench/grpo_update.py --rollout-shape \
      --rollout-rows 256 --steps 1 --skip-defaults --budgets 16384 --pack 4096 --name grpo_update_rollout_v2-lite_cuda 2>&1 \
      | grep -v "^\s*$" | tee "$OUT/grpo_update.log" | tail -80
    ;;
esac
find bench/results -name '*.json' -newer /tmp/stage_start -exec cp {} "$OUT/" \;  # this stage's only
ls "$OUT"
