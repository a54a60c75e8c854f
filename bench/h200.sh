#!/usr/bin/env bash
# The GPU runs behind the README's GPU table, one stage per device call (each well inside 10 minutes), after the
# four calls of ../shared/tools/gpu-vllm-bundle on the same warm machine:
#   bash bench/h200.sh tier      # pytest -m gpu tests/gpu (CUDA vLLM, tiny GPU shape), ~340 s
#   bash bench/h200.sh grpo      # one GRPO step at V2-Lite shape, align vs TRL GRPOTrainer, same run, ~440 s
#   bash bench/h200.sh sft       # align sft at V2-Lite shape vs TRL SFTTrainer, same run, ~430 s
#   bash bench/h200.sh sft-back  # a short align sft at V2-Lite shape, then align grpo from its checkpoint
#   bash bench/h200.sh update    # issue 17's shape: budgets 16,384/8,192, recomputing all/20/no layers, compiled
#   bash bench/h200.sh alloc     # the compiled update at budget 8,192 under a GRPO step's allocator states: warm
#                                # cache, cache emptied every iteration, expandable segments (emptied and not)
#   bash bench/h200.sh cache     # step 1 in a fresh process with an empty kernel cache, then a warm one
#   bash bench/h200.sh profile   # three GRPO steps, step 3's update under torch.profiler (GPU-busy share, kernels)
#   bash bench/h200.sh step      # align's GRPO steps alone (no TRL baseline), STEPS (3) steps, SET= overrides
#   bash bench/h200.sh attention # packed rows' attention per new shape: SDPA with a mask vs varlen flash (torch only)
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
    timeout 450 python bench/grpo_step.py --prompts 16 --steps 3 --profile-update 3 \
      --set grpo.mask_truncated=false "${ENGINE[@]}" "${SETS[@]}" --name grpo_step_profiled 2>&1 | grep -v "^\s*$" \
      | grep "policy_update\|align_step\|Error\|Traceback" | tee "$OUT/grpo_profile.log"
    cp bench/results/profile_grpo_step_profiled_update3_cuda.txt "$OUT/" 2>/dev/null
    ;;
  alloc)
    B="--rollout-shape --rollout-rows 256 --completion-len 256 --steps 2 --skip-defaults --no-baseline --packed-only"
    timeout 560 python bench/grpo_update.py $B --fresh-shapes --budgets 8192 --pack 1024 --compile-layers \
      --compiled-only --allocator-rows --name grpo_update_allocator_cuda 2>&1 | grep "tok_s':\|Error\|Traceback" \
      | tee "$OUT/grpo_update_allocator.log"
    ;;
  step)
    # EXPANDABLE_FROM=K: expandable segments from step K on (the steps before it: the same run's baseline);
    # NO_PEAK_FROM=K: no whole-GPU memory sampling thread from step K on; PROFILE=N: step N's update under
    # torch.profiler (bench/results/profile_<NAME>_updateN_cuda.txt); SYNCS=N: step N's log-prob passes and update
    # under CUDA's sync debug mode, host waits counted by source line (bench/results/syncs_<NAME>_stepN_cuda_*.json)
    # RECOMPILES=1: also dynamo's reasons for every recompilation (TORCH_LOGS=recompiles), to tell why a step's
    # compiled layers compile again
    [ -n "${RECOMPILES:-}" ] && export TORCH_LOGS=recompiles
    WHY="__recompiles\]     -"
    timeout 580 python bench/grpo_step.py --prompts 16 --steps ${STEPS:-3} --expandable-from ${EXPANDABLE_FROM:-0} \
      --no-peak-from ${NO_PEAK_FROM:-0} --profile-update ${PROFILE:-0} --sync-debug ${SYNCS:-0} \
      --set grpo.mask_truncated=false \
      "${ENGINE[@]}" "${SETS[@]}" --name ${NAME:-grpo_step_align_v2-lite_cuda} 2>&1 \
      | grep -v "^\s*$" \
      | grep -e "align_step\|sync_sites\|startup\|expandable\|policy_update\|Error\|Traceback\|kernel cache" \
        -e "Recompiling\|$WHY" \
      | tee -a "$OUT/grpo_step_align.log" | grep -v __recompiles
    [ -n "${PROFILE:-}" ] && cp bench/results/profile_*_update${PROFILE}_cuda.txt "$OUT/" 2>/dev/null
    ;;
  attention)
    timeout 300 python bench/attention_shapes.py 2>&1 | tee "$OUT/attention_shapes.log" | tail -30
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
    # issue 17's shape as bench/grpo_step.py samples it (256 rows, every completion 256 tokens, each timed iteration
    # on a new batch, as steps bring new shapes): rows of 1,024 at token budgets 16,384 and 8,192, recomputing every,
    # the first 20 or no layer, then no layer with compiled decoder layers; varlen flash attention, then (second
    # process) transformers' block-diagonal mask
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    B="--rollout-shape --rollout-rows 256 --completion-len 256 --steps 1 --skip-defaults --no-baseline --packed-only"
    timeout 430 python bench/grpo_update.py $B --fresh-shapes --budgets 16384 8192 --pack 1024 --recompute 20 \
      --compile-layers --packed-attention varlen --name grpo_update_varlen_cuda 2>&1 | grep "tok_s':" \
      | tee "$OUT/grpo_update.log"
    timeout 140 python bench/grpo_update.py $B --fresh-shapes --budgets 16384 --pack 1024 --packed-attention mask \
      --name grpo_update_mask_cuda 2>&1 | grep "tok_s':" | tee -a "$OUT/grpo_update.log"
    ;;
esac
find bench/results -name '*.json' -newer /tmp/stage_start -exec cp {} "$OUT/" \;  # this stage's only
ls "$OUT"
