"""The pruned model recovery trains. Full fine-tuning trains every decoder weight in fp32. LoRA
trains only adapters, so its frozen base stays in the checkpoint's stored dtype (bf16 or fp16: half
the memory of fp32) and computes in fp32: a 16-bit weight widens to fp32 exactly, so the student
computes what an fp32 copy would, with one layer's weight widened at a time. Its backward pass
keeps the 16-bit weight, not the widened one, so no fp32 copy of the model builds up either.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from edgeprune.models.weights import WeightStore
from edgeprune.prune import Plan

log = logging.getLogger(__name__)

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


class _FrozenLinear(torch.autograd.Function):
    """x @ W.T + b with W and b frozen in 16 bits: widened for the product, kept narrow for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return grad.matmul(weight.to(grad.dtype)), None, None


class StoredLinear(torch.nn.Linear):
    """A frozen linear whose weight stays in its stored 16-bit dtype; computes in the input's dtype.
    Still an nn.Linear, so peft adapts it as any other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinear.apply(x, self.weight, self.bias)


def stored_dtype(store: WeightStore) -> torch.dtype:
    """The one 16-bit dtype every tensor of `store` is stored in, else fp32."""
    dtypes = {store.stored_dtype(n) for n in store.names()}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(SIXTEEN_BIT) else torch.float32


def student(store: WeightStore, plan: Plan, method: str) -> torch.nn.Module:
    """`plan` applied to `store`'s model, ready for `trainer.trainable`: fp32 for full fine-tuning;
    for LoRA, its linears and plain embedding frozen in the stored dtype, everything else fp32."""
    from edgeprune.prune.modules import materialize

    dtype = stored_dtype(store) if method == "lora" else torch.float32
    model = materialize(store, plan, dtype=dtype)
    if dtype == torch.float32:
        return model
    narrow = set()
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = StoredLinear
            narrow.add(id(module.weight))
        elif isinstance(module, torch.nn.Embedding):
            # Rows widened after the lookup (Gemma's scaled embedding multiplies in the stored dtype
            # first, as transformers does for a 16-bit model).
            module.register_forward_hook(lambda _m, _i, out: out.float())
            narrow.add(id(module.weight))
    for p in model.parameters():
        if id(p) not in narrow:
            p.data = p.data.float()  # norms (and biases, widened per product anyway)
    for b in model.buffers():
        if b.is_floating_point():
            b.data = b.data.float()
    log.info("recovery: the frozen base in %s, computing in fp32", str(dtype).removeprefix("torch."))
    return model
