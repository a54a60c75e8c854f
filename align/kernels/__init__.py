"""The training-side kernel stack for DeepSeek-V2, one layer per module (CPU: every path falls back to torch):

- patches (``patches.py``, ``expert_lora.py``, ``dense_lora.py``): what is swapped into transformers / PEFT
  modules — compiled RMSNorm, rope and log-softmax, compiled decoder layers, the grouped routed-expert LoRA
  forward and the addmm dense LoRA forward (all through :func:`swap.swap_forwards`);
- operators (``moe_ops.py``, ``lora_ops.py``): ``torch.library`` custom operators with fake kernels and
  hand-written backwards, opaque to ``torch.compile`` — the MoE dispatch/combine and the LoRA grouped linears;
- Triton kernels (``triton_kernels.py``): what those operators run on CUDA tensors;
- attention (``varlen.py``): packed rows attend within their sequences (varlen flash attention, no mask).
"""

from align.kernels.patches import (  # noqa: F401  (the names the rest of align uses)
    can_compile_for_gpu,
    compile_decoder_layers,
    fused_logp_from_logits,
    logp_from_logits,
    runs_compiled,
    swiglu,
    swiglu_grad,
    use_fused_kernels,
)
from align.kernels.varlen import packed_rows, use_varlen_attention  # noqa: F401
