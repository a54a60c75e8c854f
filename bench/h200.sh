#!/usr/bin/env bash
# The GPU runs behind the README's GPU table, one stage per device call (each well inside 10 minutes), after the
# four calls of ../shared/tools/gpu-vllm-bundle on the same warm machine:
#   bash bench/h200.sh tier      # pytest -m gpu tests/gpu (CUDA vLLM, tiny GPU shape), ~340 s
#   bash bench/h200.sh grpo      # one GRPO step at V2-Lite shape, align vs TRL GRPOTrainer, same run, ~440 s
#   bash bench/h200.sh sft       # align sft at V2-Lite shape vs TRL SFTTrainer, same run, ~430 s
#   bash bench/h200.sh sft-back  # a short align sft at V2-Lite shape, then align grpo from its checkpoint
#   bash bench/h200.sh update    # issue 17's shape: packed rows of 512/1,024/2,048, recomputing all/14/20/no layers
#   bash bench/h200.sh cache     # step 1 in a fresh process with an empty kernel cache, then a warm one
#   bash bench/h200.sh profile   # two GRPO steps, step 2's update under torch.profiler (GPU-busy share, top kernels)
#   bash bench/h200.sh rollout   # rollout at 1,024 requests: the engine's lean outputs vs vLLM's own detokenization
#                                # and logprob dicts (same engine, interleaved), then in a second process vLLM's tuned
#                                # fused-MoE config for H200 and N=1280 taken for V2-Lite's N=1408 (vLLM has none)
# math_rl.yaml and the engine's GPU defaults hold the settings measured; ENGINE_KWARGS (YAML) sets
# rollout.engine_kwargs for the grpo and profile stages, SET (space-separated key=value) more overrides there, e.g.
#   SET="rollout.kv_cache_gib=12 model.recompute_layers=14" bash bench/h200.sh grpo
# Logs and JSON go to bench/results/ and $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" bench/results; touch /tmp/stage_start
ENGINE=(); [ -n "${ENGINE_KWARGS:-}" ] && ENGINE=("rollout.engine_kwargs=$ENGINE_KWARGS")
SETS=(); [ -n "${SET:-}" ] && read -ra SETS <<< "$SET"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "$1" in
  tier)
    timeout 560 python -m pytest -m gpu tests/gpu -s -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_cuda.log"
    ;;
  cache)
    timeout 560 python bench/kernel_cache.py 2>&1 | tee "$OUT/kernel_cache.log" | tail -40
    ;;
  grpo)
    timeout 580 python bench/grpo_step.py --prompts 16 --steps 2 --trl --trl-rounds 1 --rollout-probe 64 \
      --set grpo.mask_truncated=false "${ENGINE[@]}" "${SETS[@]}" \
      --name grpo_step_v2-lite_16x16_cuda 2>&1 | grep -v "^\s*$" | tee "$OUT/grpo_step.log" | tail -150
    ;;
  profile)
    timeout 400 python bench/grpo_step.py --prompts 16 --steps 2 --profile-update 2 \
      --set grpo.mask_truncated=false "${ENGINE[@]}" "${SETS[@]}" --name grpo_step_profiled 2>&1 | grep -v "^\s*$" \
      | grep "policy_update\|align_step\|Error\|Traceback" | tee "$OUT/grpo_profile.log"
    cp bench/results/profile_grpo_step_profiled_update2_cuda.txt "$OUT/" 2>/dev/null
    ;;
  sft)
    timeout 580 python bench/sft_step.py --steps 200 --trl-steps 60 --work /tmp/sft-bench 2>&1 \
      | grep -v "^\s*$" | tee "$OUT/sft_step.log" | tail -120
    ;;
  sft-back)
    timeout 580 python bench/sft_step.py --steps 20 --no-trl --grpo-back --work /tmp/sft-bench \
      --name sft_back_v2-lite_cuda 2>&1 | grep -v "^\s*$" | tee "$OUT/sft_back.log" | tail -80
    ;;
  rollout)
    vllm_dir=$(python -c "import vllm, pathlib; print(pathlib.Path(vllm.__file__).parent)")
    cfg=$vllm_dir/model_executor/layers/fused_moe/configs
    mkdir -p /tmp/moecfg
    cp "$cfg/E=64,N=1280,device_name=NVIDIA_H200.json" "/tmp/moecfg/E=64,N=1408,device_name=NVIDIA_H200.json"
    timeout 270 python bench/grpo_step.py --steps 0 --rollout-probe 64 --probe-outputs both \
      --name rollout_outputs_cuda 2>&1 | grep -v "^\s*$" | grep "rollout_probe\|startup\|Error\|Traceback" \
      | tee "$OUT/rollout_outputs.log"
    VLLM_TUNED_CONFIG_FOLDER=/tmp/moecfg timeout 200 python bench/grpo_step.py --steps 0 --rollout-probe 64 \
      --name rollout_n1280_moe_cuda 2>&1 | grep -v "^\s*$" \
      | grep "rollout_probe\|startup\|Error\|Traceback\|MoE config" | tee "$OUT/rollout_moe.log"
    ;;
  update)
    # rows of 1,024 (math_rl.yaml) against 512 and 2,048, against no recomputation and recomputing only the first
    # 14 or 20 of 27 layers, on ragged completions (ratios against the unpacked token budget; math_rl.yaml's passes
    # before issue 17 are in the JSON of 2026-12-01); then every completion 256 tokens, as random weights sample them
    # inside bench/grpo_step.py's steps, timed on the warm-up's batch and then on new batches (new shapes, as steps)
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    timeout 250 python bench/grpo_update.py --rollout-shape --rollout-rows 256 --steps 1 --skip-defaults \
      --no-baseline --budgets 16384 --pack 1024 512 2048 --recompute 14 20 \
      --name grpo_update_levers_v2-lite_cuda 2>&1 | grep -v "^\s*$" | tee "$OUT/grpo_update.log" | tail -60
    for fresh in "" --fresh-shapes; do
      timeout 150 python bench/grpo_update.py --rollout-shape --rollout-rows 256 --completion-len 256 --steps 2 \
        --skip-defaults --no-baseline --budgets 16384 --pack 1024 $fresh \
        --name "grpo_update_fixed256${fresh:+_fresh}_cuda" 2>&1 | grep -v "^\s*$" \
        | tee -a "$OUT/grpo_update_fixed.log" | tail -30
    done
    ;;
esac
find bench/results -name '*.json' -newer /tmp/stage_start -exec cp {} "$OUT/" \;  # this stage's only
ls "$OUT"
