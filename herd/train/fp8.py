"""FP8 training: linear layers and experts through float8 matmuls with dynamic scaling (SPEC 6).

Every matmul of a converted layer quantises both operands just before multiplying:
    scale = max_representable / amax(tensor)   (per tensor, recomputed every call: "dynamic")
    tensor_f8 = (tensor * scale).to(float8)     and torch._scaled_mm multiplies by 1/scale again.
Forward operands (activations, weights) use e4m3 (more mantissa); the gradient flowing back uses
e5m2 (more range), as in the FP8 training recipes. Master weights, optimiser state and everything
outside the matmuls stay in the original precision.

`convert_to_float8(model)` swaps modules from outside the model: each `nn.Linear` becomes a
`Float8Linear` and each `Experts` a `Float8Experts`, sharing the *same* Parameter objects, so
parameter names, the optimiser and the Hugging Face checkpoint are unchanged. The router and
lm_head stay in high precision (a top-k decision and the logits are where rounding hurts most).

`torch._scaled_mm` runs on CPU in PyTorch 2.13, so this path is what the tests check. On a GPU
with FP8 tensor cores (compute capability 8.9+) and torchao installed, linear layers use torchao's
float8 training instead (same recipe, fused kernels); experts keep this implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, per_expert

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
KEEP_HIGH_PRECISION = ("lm_head", "router")


def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x quantised to `dtype`, the inverse scale that _scaled_mm multiplies back in)."""
    fmax = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float().clamp(min=1e-12)
    scale = fmax / amax
    return (x.float() * scale).clamp(-fmax, fmax).to(dtype), scale.reciprocal()


def _mm(a: torch.Tensor, a_dtype, b: torch.Tensor, b_dtype, out_dtype) -> torch.Tensor:
    """a [M, K] @ b [K, N] with both operands in float8; b is passed column-major as _scaled_mm wants."""
    a8, a_inv = to_float8(a, a_dtype)
    b8, b_inv = to_float8(b.t().contiguous(), b_dtype)  # [N, K] row-major = [K, N] column-major
    return torch._scaled_mm(a8, b8.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


class _Float8Matmul(torch.autograd.Function):
    """y = x @ w with float8 operands in the forward and both backward matmuls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return _mm(x, E4M3, w, E4M3, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _mm(grad, E5M2, w.t(), E4M3, x.dtype)  # [M, N] @ [N, K]
        grad_w = _mm(x.t(), E4M3, grad, E5M2, w.dtype)  # [K, M] @ [M, N]
        return grad_x, grad_w


def float8_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [K, N] -> [..., N] through float8."""
    shape = x.shape
    out = _Float8Matmul.apply(x.reshape(-1, shape[-1]), w)
    return out.reshape(*shape[:-1], w.shape[-1])


class Float8Linear(nn.Linear):
    """nn.Linear whose matmul runs in float8; holds the original layer's parameters."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Float8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = float8_matmul(x, self.weight.t())
        return y + self.bias if self.bias is not None else y


class Float8Experts(Experts):
    """`Experts` with every expert matmul in float8; holds the original module's parameters."""

    @classmethod
    def from_experts(cls, experts: Experts) -> "Float8Experts":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        return new

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        def swiglu(e: int, x_e: torch.Tensor) -> torch.Tensor:
            gate, up = float8_matmul(x_e, self.gate_up_proj[e]).chunk(2, dim=-1)
            return float8_matmul(F.silu(gate) * up, self.down_proj[e])

        return per_expert(swiglu, x, counts)


def torchao_float8_available(model: nn.Module) -> bool:
    """torchao's fused float8 training applies on CUDA GPUs with FP8 tensor cores (sm 8.9+)."""
    device = next(model.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return True


def _keep(name: str) -> bool:
    return any(part in KEEP_HIGH_PRECISION for part in name.split("."))


def convert_to_float8(model: nn.Module) -> nn.Module:
    """Swaps linear layers and experts for float8 versions in place; returns the model."""
    if torchao_float8_available(model):
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda m, name: not _keep(name)
                                   and m.in_features % 16 == 0 and m.out_features % 16 == 0)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if _keep(full):
                continue
            if type(child) is nn.Linear:
                setattr(module, child_name, Float8Linear.from_linear(child))
            elif type(child) is Experts:
                setattr(module, child_name, Float8Experts.from_experts(child))
    return model
