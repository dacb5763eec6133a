"""Next-token cross-entropy of the output head, computed in row chunks: logits are never whole.

The plain road, `F.cross_entropy(lm_head(h), targets)`, materialises logits [N, V] in fp32, then
their log-softmax, then the gradient of both: four tensors of N x V floats. At tiny scale that is
128 MiB each for a 16 x 256 batch with 8,192 ids, and moving them dominates the head's cost on a
CPU; at Llama 4's vocabulary (202,048 ids) it is 0.8 GB per thousand tokens, the largest tensor of
a training step. Here each chunk of rows gets its logits, their log-softmax (one fused kernel, where the
log-sum-exp written out op by op would read and write the chunk five times) and, in the same pass,
the gradient of the summed loss (softmax - one-hot) multiplied straight into the gradients of the
hidden states and of the head's weight. Nothing of size N x V outlives a chunk, and the backward
pass only scales the two gradients kept from the forward (the loss is the graph's last node).
The arithmetic is the same as the plain road's (tests/test_model.py compares both), reordered.
"""

from __future__ import annotations

import torch

IGNORE = -100  # target of a position that is not a target
# Logits per chunk (8 MiB in fp32): small enough that the softmax's passes over a chunk stay in cache (the
# head ran 1.1-1.3x faster than with 32 MiB chunks on a Zen 3 CPU), with at least MIN_ROWS rows so
# that a large vocabulary still gives the matmuls a usable height.
CHUNK_ELEMENTS = 1 << 21
MIN_ROWS = 64


def head_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits h @ weight.T against targets. h [N, D], weight [V, D],
    targets [N] (IGNORE where there is none). Returns an fp32 scalar."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _HeadCrossEntropy.apply(h, weight, targets)
    return _chunked(h, weight, targets, grads=False)[0]


def _chunked(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grads: bool):
    N, V = h.shape[0], weight.shape[0]
    rows = max(MIN_ROWS, CHUNK_ELEMENTS // V)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
    any_ignored = grads and bool((targets == IGNORE).any())  # one device sync per call, not one per chunk
    for a in range(0, N, rows):
        h_c, t_c = h[a:a + rows], targets[a:a + rows]
        logp = torch.log_softmax((h_c @ weight.T).float(), dim=-1)  # [n, V]; one fused pass per row
        invalid = t_c == IGNORE
        picked = t_c.clamp(min=0)[:, None]
        loss -= logp.gather(1, picked)[:, 0].masked_fill(invalid, 0).sum()
        if grads:  # d(loss)/d(logits) = softmax - one-hot, zero on ignored rows; built in place
            grad = logp.exp_()
            grad.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad.dtype))
            if any_ignored:
                grad[invalid] = 0
            grad_h[a:a + rows] = (grad.to(weight.dtype) @ weight).to(h.dtype)
            grad_w.addmm_(grad.T, h_c.float())
    return loss, grad_h, grad_w


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets):
        loss, grad_h, grad_w = _chunked(h, weight, targets, grads=True)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None
