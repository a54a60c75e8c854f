"""Device memory around a colocated engine: the policy's frozen weights parked in pinned host memory while the
engine generates, and the trainer's allocator switched to expandable segments.

With LoRA the base weights never change, yet a colocated rollout holds them twice: the trainer's copy and the
engine's. :class:`FrozenOffload` moves the trainer's frozen parameters to host memory once the engine has taken
the weights and gives them back after the engine sleeps (verl's param offload, for the frozen part only), so the
rollout holds one copy. Parameter objects stay the same (the optimizer, hooks and compiled graphs keep their
references); only ``param.data`` moves. Frozen means unchanged, so only the first offload copies a weight out; later
ones free the device copy of every weight that nothing wrote since (the parameter's version counter and storage as
they were after the last restore: ``load_state_dict`` or any in-place write through the parameter shows).
"""

from __future__ import annotations

import mmap
import os
import weakref

import torch


class FrozenOffload:
    """Frozen parameters of ``model`` on an accelerator <-> reused pinned host buffers.

    ``accelerator_only`` (default): parameters already in host memory are left alone, so on a CPU run this is a
    no-op. Trainable parameters (adapters) never move: their optimizer state stays where it is.

    >>> m = torch.nn.Linear(2, 2); _ = m.bias.requires_grad_(False)
    >>> off = FrozenOffload(m, accelerator_only=False); off.offload(); off.offloaded, off.nbytes
    (True, 8)
    >>> off.restore(); off.offloaded
    False
    """

    def __init__(self, model: torch.nn.Module, accelerator_only: bool = True):
        seen: set[int] = set()
        self.params: list[torch.nn.Parameter] = []
        for p in model.parameters():
            if p.requires_grad or id(p) in seen or (accelerator_only and p.device.type == "cpu"):
                continue
            seen.add(id(p))
            self.params.append(p)
        self.host: list[torch.Tensor] | None = None
        self.devices: list[torch.device] = [p.device for p in self.params]
        self.on_cuda = any(d.type == "cuda" for d in self.devices)
        self.offloaded = False
        self.copied = 0
        """Weights copied out by the last :meth:`offload` (all of them the first time, none while they stay)."""
        self._marks: list[tuple[int, int] | None] = [None] * len(self.params)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def _buffers(self) -> list[torch.Tensor]:
        # One page-locked allocation, carved into a view per weight, made on first use and kept: pinning ~30 GB
        # takes seconds (once per run, not every step).
        if self.host is None:
            sizes = [p.numel() * p.element_size() for p in self.params]
            starts = [0]
            for n in sizes:
                starts.append(starts[-1] + -(-n // 64) * 64)  # 64-byte aligned views for every dtype
            flat = self._host_memory(starts[-1])
            self.host = [flat[a:a + n].view(p.dtype).view(p.shape) for p, a, n in zip(self.params, starts, sizes)]
        return self.host

    def _host_memory(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of host memory in an anonymous mapping that forked processes leave out, page-locked where it lies
        on a GPU run (cudaHostRegister, as torch.distributed's checkpoint stager does: exactly its size, where torch's
        pinned allocator may round a block up to a power of two).

        Why the fork matters: Linux copies page-locked pages into a child at fork (they cannot be shared copy-on-
        write), so every reward worker forked after the first offload would get its own copy of ~30 GB; on one H200
        host the step-1 fork of 16 scoring workers was killed for memory. ``MADV_DONTFORK`` keeps the mapping out."""
        size = max(nbytes, 1)  # mmap refuses 0 bytes
        mapping = mmap.mmap(-1, size)
        if hasattr(mmap, "MADV_DONTFORK"):  # Linux; elsewhere there is no CUDA pinning to protect
            mapping.madvise(mmap.MADV_DONTFORK)
        flat = torch.frombuffer(mapping, dtype=torch.uint8)[:nbytes]
        if self.on_cuda:
            cudart = torch.cuda.cudart()
            if int(cudart.cudaHostRegister(flat.data_ptr(), size, 1)) != 0:  # 1: cudaHostRegisterPortable
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # the driver's own pinned allocation
            weakref.finalize(self, cudart.cudaHostUnregister, flat.data_ptr())
        self._mapping = mapping  # the views borrow its memory
        return flat

    def offload(self) -> None:
        """Free the frozen weights' accelerator memory, copying to host memory those whose host copy is not
        current (all of them the first time); a no-op when already out."""
        if self.offloaded or not self.params:
            return
        host = self._buffers()
        self.copied = 0
        for i, (p, h) in enumerate(zip(self.params, host)):
            if self._marks[i] != (p._version, p.data_ptr()):  # new, or written since it came back
                h.copy_(p.data, non_blocking=True)
                self.copied += 1
        if self.on_cuda:
            torch.cuda.synchronize()  # the host copies are complete before anything reads or reuses them
        for p, h in zip(self.params, host):
            p.data = h
        self.offloaded = True
        if self.on_cuda:
            torch.cuda.empty_cache()  # the engine's allocator is its own: hand the freed blocks back to the driver

    def restore(self) -> None:
        """Frozen weights back on their devices. The copies are queued on the current stream (pinned sources), so
        the host goes on while they run and the next kernel that reads a weight runs after its copy."""
        if not self.offloaded:
            return
        for i, (p, d) in enumerate(zip(self.params, self.devices)):
            p.data = p.data.to(d, non_blocking=True)
            self._marks[i] = (p._version, p.data_ptr())
        self.offloaded = False


def with_expandable_segments(conf: str, on: bool) -> str:
    """``conf`` (a ``PYTORCH_CUDA_ALLOC_CONF`` string) with ``expandable_segments`` set to ``on``, every other field
    kept: torch parses the whole string on each write and resets the fields it does not name.

    >>> with_expandable_segments("max_split_size_mb:512,expandable_segments:False", True)
    'max_split_size_mb:512,expandable_segments:True'
    >>> with_expandable_segments("", True)
    'expandable_segments:True'
    """
    fields = [f.strip() for f in conf.split(",") if f.strip() and f.partition(":")[0].strip() != "expandable_segments"]
    return ",".join(fields + [f"expandable_segments:{on}"])


def use_expandable_segments(on: bool = True) -> str | None:
    """Let CUDA allocations from now on grow expandable segments (or not); returns the allocator config written,
    ``None`` without a GPU. The environment is updated too, for libraries that read it (vLLM's sleep-mode pool turns
    the setting off for its own allocations when it finds it there).

    For runs that fragment near the memory limit: a colocated engine's wake-up and sleep empty torch's cache every
    GRPO step, so the trainer's passes allocate their memory anew each step (verl switches this on for its trainer
    phases). Measured on one H200 it did not pay: the compiled update alone 1.03-1.07x, and inside the GRPO step
    slower (vLLM's sleep 0.40 -> 3.89 s, the update 6.1-6.5 -> 7.1 s; bench/README.md, sixth session).
    """
    if not torch.cuda.is_available():
        return None
    name = "PYTORCH_ALLOC_CONF" if os.environ.get("PYTORCH_ALLOC_CONF") else "PYTORCH_CUDA_ALLOC_CONF"
    conf = with_expandable_segments(os.environ.get(name, ""), on)
    torch.cuda.memory._set_allocator_settings(conf)
    os.environ[name] = conf
    return conf
