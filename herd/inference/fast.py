"""Decode-time module swaps: `prepare_for_decoding(model)` rebuilds the decoder for fast inference.

The model's own modules keep the Hugging Face layout that training and checkpoints need. A decoding
step on CPU is instead limited by how fast small matrix-vector products read their weights and by
the number of small ops per layer, so for inference this module swaps, in place (like
`herd.quant.quantize_`):
- q/k/v projections for one fused projection, and gate/up (dense layers, shared expert) for one
  fused gate_up: one weight read and one call instead of three or two;
- every full-precision weight (projections, experts, router, lm_head) to blocks of 16 output
  columns (`blocked_matmul`), which one decoding row reads in a single streaming pass;
- RMSNorm for `F.rms_norm` (one op instead of six) and RoPE for a complex multiply, applied to
  q and k together;
- the MoE for one that, when a few tokens are routed (decoding), runs each chosen expert's weights
  directly instead of sorting and splitting, and otherwise takes a grouped path.
Quantized layers (int8, int4, fp8) are fused by concatenating their rows, so quantize first, then
prepare. The swapped modules compute the same function as the originals for any number of tokens
(prefill included); the tests compare both paths' logits and tokens. A prepared model is for
inference only: it no longer trains or saves in the Hugging Face layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.attention import Attention, TokenLayout, attend, dense_mask, temperature_scale
from ..model.moe import Experts, MoE, RouterStats, SwiGLU, per_expert, route
from ..model.norm import RMSNorm, rms_normalize
from ..model.rope import apply_rope
from ..quant import QuantExperts
from ..quant.fp8 import Fp8Weight
from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight

QUANT_TYPES = (Int8Weight, Int4Weight, Fp8Weight)
FEW_TOKENS = 4  # up to this many (token, expert) pairs, the MoE runs them one by one


BLOCK = 16  # output columns per weight block: one AVX-512 vector of fp32


def to_blocks(weight: torch.Tensor) -> torch.Tensor:
    """[..., N, K] (nn.Linear's [out, in]) -> [..., ceil(N / BLOCK), K, BLOCK]: each block of BLOCK
    output columns holds its K x BLOCK weights contiguously (N padded with zero columns)."""
    *lead, N, K = weight.shape
    pad = -N % BLOCK
    if pad:
        weight = torch.cat([weight, weight.new_zeros(*lead, pad, K)], dim=-2)
    return weight.unflatten(-2, (-1, BLOCK)).transpose(-1, -2).contiguous()


def blocked_matmul(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., K] @ the weight held as `blocks` [N / BLOCK, K, BLOCK] -> [..., out_features].

    Why the layout: a decoding step is a chain of matrix-vector products, and for the small
    matrices of a decoder layer PyTorch's CPU GEMV reads weights at well under half the memory
    bandwidth. With BLOCK output columns stored contiguously, one row's product is a single pass
    over the weight in address order: under torch.compile it is written as a reduction that
    inductor turns into one vectorized streaming loop (about 1.8x faster than the GEMV calls on
    this project's benchmark); eager, a few rows are one broadcast batched matmul, no slower than
    `x @ W`; more rows (prefill) an einsum, which MKL runs as one GEMM."""
    K = blocks.shape[-2]
    rows = x.reshape(-1, K)
    if rows.shape[0] == 1 and torch.compiler.is_compiling():
        y = (rows[0, None, :, None] * blocks).sum(1)  # [N / BLOCK, BLOCK]
    elif rows.shape[0] <= BLOCK:
        y = torch.matmul(rows, blocks).transpose(0, 1)  # [rows, N / BLOCK, BLOCK]
    else:
        y = torch.einsum("mk,bkj->mbj", rows, blocks)
    return y.reshape(*x.shape[:-1], -1)[..., :out_features]


class BlockedLinear(nn.Module):
    """nn.Linear's function (no bias) with the weight stored in `BLOCK`-column blocks."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(to_blocks(weight.detach()), requires_grad=False)  # [N / BLOCK, K, BLOCK]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blocked_matmul(x, self.weight, self.out_features)


def fuse(linears: list[nn.Module]) -> nn.Module:
    """One layer computing the concatenated outputs of `linears` (all nn.Linear, or all of one
    quantized format): full precision becomes a BlockedLinear, quantized layers concatenate their
    rows."""
    first = linears[0]
    if isinstance(first, nn.Linear):
        return BlockedLinear(torch.cat([m.weight.detach() for m in linears]))
    if isinstance(first, QUANT_TYPES) and all(type(m) is type(first) for m in linears):
        return type(first).cat(linears)
    raise TypeError(f"prepare_for_decoding: cannot fuse {[type(m).__name__ for m in linears]}")


class BlockedExperts(nn.Module):
    """`Experts` with every expert's weights in `BLOCK`-column blocks: gate_up [E, 2I / BLOCK, D, BLOCK],
    down [E, D / BLOCK, I, BLOCK]. `one(e, x)` runs expert e; calling it runs the experts on tokens
    sorted by expert, like `Experts`."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.dim, self.hidden = experts.down_proj.shape[2], experts.down_proj.shape[1]
        self.gate_up_proj = nn.Parameter(to_blocks(experts.gate_up_proj.detach().transpose(1, 2)), requires_grad=False)
        self.down_proj = nn.Parameter(to_blocks(experts.down_proj.detach().transpose(1, 2)), requires_grad=False)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = blocked_matmul(x, self.gate_up_proj[e], 2 * self.hidden).chunk(2, dim=-1)
        return blocked_matmul(F.silu(gate) * up, self.down_proj[e], self.dim)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by expert, counts [E] -> [N, D]."""
        return per_expert(self.one, x, counts)


class FastRMSNorm(nn.Module):
    """RMSNorm as one `F.rms_norm` call in fp32; other dtypes keep the reference's cast order."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps, self.weight = norm.eps, norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            return rms_normalize(x, self.eps) * self.weight
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


def rope_cis(layout: TokenLayout, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """cos + i sin [B, T, Dh/2], built once per forward call and shared by every RoPE layer
    (memoised in the layout, as the attention masks are)."""
    cis = layout.masks.get("rope_cis")
    if cis is None or cis[0] is not rope[0]:
        cis = layout.masks["rope_cis"] = (rope[0], torch.complex(*rope))
    return cis[1]


def rotate(x: torch.Tensor, layout: TokenLayout, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on interleaved pairs of x [B, T, heads, Dh], in fp32: eager, as one complex multiply;
    compiled, the model's real-valued form (inductor generates no code for complex ops and fuses
    the real one)."""
    if torch.compiler.is_compiling():
        return apply_rope(x, *rope)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, heads, Dh/2]
    return torch.view_as_real(pairs * rope_cis(layout, rope)[:, :, None]).flatten(-2).type_as(x)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row: q [B, 1, H, Dh], k and v [B, S, K, Dh], mask [B, 1, 1, S] -> [B, 1, H, Dh].
    Two batched matmuls and a softmax, with the H / K query heads of a KV head side by side: on CPU
    about 1.5x faster than SDPA's flash kernel for a single query (it tiles for long query blocks).
    The query always sees itself, so no row is fully masked."""
    B, _, H, Dh = q.shape
    K = k.shape[2]
    qg = q.view(B, K, H // K, Dh)  # heads h = kv * (H / K) + g, as SDPA's enable_gqa groups them
    scores = qg @ k.permute(0, 2, 3, 1) * Dh**-0.5  # [B, K, H/K, S]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v.transpose(1, 2)).view(B, 1, H, Dh)


class FastAttention(nn.Module):
    """`Attention` with one fused qkv projection and RoPE applied to q and k in one pass. The
    attention itself is the model's `attend`, but for a single decoding query."""

    def __init__(self, attn: Attention):
        super().__init__()
        for name in ("layer", "n_heads", "n_kv_heads", "head_dim", "use_rope", "chunk_size", "qk_norm_eps",
                     "temperature"):
            setattr(self, name, getattr(attn, name))
        self.qkv_proj = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = fuse([attn.o_proj])

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], layout: TokenLayout,
                cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * K, Dh)
        qk, v = qkv[:, :, :H + K], qkv[:, :, H + K:]  # [B, T, H + K, Dh], [B, T, K, Dh]
        if self.use_rope:
            qk = rotate(qk, layout, rope)
            if self.qk_norm_eps is not None:  # per head, no weight; elementwise, so q and k together
                qk = F.rms_norm(qk, (Dh,), eps=self.qk_norm_eps) if qk.dtype == torch.float32 \
                    else rms_normalize(qk, self.qk_norm_eps)
        q, k = qk[:, :, :H], qk[:, :, H:]
        if self.temperature is not None:
            q = (q * temperature_scale(layout.positions, *self.temperature)[..., None, None]).type_as(q)

        if T == 1 and cache is not None:  # one query: two batched matmuls beat SDPA's overhead
            k, v, k_layout = cache.update(self.layer, k, v, layout)
            out = decode_attention(q, k, v, dense_mask(layout, k_layout, self.chunk_size))
        else:
            out = attend(q, k, v, layout, cache, self.layer, self.chunk_size)
        return self.o_proj(out.reshape(B, T, -1))


class FusedSwiGLU(nn.Module):
    """`SwiGLU` with gate and up fused into one projection (gate columns first)."""

    def __init__(self, mlp: SwiGLU):
        super().__init__()
        self.gate_up_proj = fuse([mlp.gate_proj, mlp.up_proj])
        self.down_proj = fuse([mlp.down_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecodeMoE(nn.Module):
    """`MoE` whose few-token case (decoding) runs each chosen expert straight from its weights:
    no sort, bincount or split. More tokens take the grouped path. The router stays in full
    precision (a flipped choice costs more than its bytes save), in the blocked layout."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.top_k = moe.top_k
        self.router = BlockedLinear(moe.router.weight)
        self.experts = moe.experts if isinstance(moe.experts, QuantExperts) else BlockedExperts(moe.experts)
        self.shared_expert = FusedSwiGLU(moe.shared_expert)
        self.selection_bias = moe.selection_bias

    def _gathered(self, x: torch.Tensor, top_experts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Sum over each token's k experts with the chosen weights gathered by index, no host read:
        on accelerators (a read would stall the queue) and in compiled steps of more than FEW_TOKENS
        pairs (one graph for any routing; inductor fuses the gather into one reduction per
        projection that reads each pair's weights in place, where eager einsums would copy them).
        x [N, D], top_experts and gates [N, k] -> [N, D]."""
        ex = self.experts
        gate_up = ex.gate_up_proj[top_experts]  # [N, k, 2I / BLOCK, D, BLOCK]
        down = ex.down_proj[top_experts]  # [N, k, D / BLOCK, I, BLOCK]
        xg = x[:, None, :] * gates[..., None]  # [N, k, D]
        if torch.compiler.is_compiling():
            gate, up = (xg[:, :, None, :, None] * gate_up).sum(-2).flatten(-2)[..., :2 * ex.hidden].chunk(2, dim=-1)
            h = F.silu(gate) * up
            out = (h[:, :, None, :, None] * down).sum(-2).flatten(-2)[..., :ex.dim]
            return out.sum(1)
        gate, up = torch.einsum("nkd,nkbdj->nkbj", xg, gate_up).flatten(-2)[..., :2 * ex.hidden].chunk(2, dim=-1)
        out = torch.einsum("nki,nkbij->nkbj", F.silu(gate) * up, down).flatten(-2)[..., :ex.dim]
        return out.sum(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.router(x)  # [N, E]
        top_experts, gates = route(logits, self.top_k, self.selection_bias)  # [N, k] each
        out = self.shared_expert(x)
        N, k = top_experts.shape
        stats = RouterStats(logits=logits, top_experts=top_experts)
        few, compiling = N * k <= FEW_TOKENS, torch.compiler.is_compiling()
        on_cpu, quantized = x.device.type == "cpu", isinstance(self.experts, QuantExperts)
        if not quantized and ((few and not on_cpu) or (compiling and not few)):
            return (out + self._gathered(x, top_experts, gates)).view(shape), stats
        if few or compiling:
            # On CPU a host read of the chosen ids costs nothing and beats copying their weights;
            # then each (token, expert) pair is a plain SwiGLU on the expert's own weights. Compiled,
            # the ids are graph-internal scalars, and quantized experts take this loop at any batch
            # (compiling takes longer the more pairs, but it runs 1.8x faster than the eager grouped
            # path at batch 16).
            for pair, e in enumerate(top_experts.flatten().tolist()):
                n = pair // k
                out[n] += self.experts.one(e, x[n:n + 1] * gates[n, pair % k])[0]
            return out.view(shape), stats
        order = torch.argsort(top_experts.flatten(), stable=True)
        token_of_pair = order // k
        routed_out = self.experts(x[token_of_pair] * gates.flatten()[order, None], stats.counts)
        return out.index_add(0, token_of_pair, routed_out).view(shape), stats


@torch.no_grad()
def prepare_for_decoding(model: nn.Module) -> nn.Module:
    """Swaps the text decoder's attention, feed-forward layers, norms and lm_head for the fast
    decoding modules above, in place; returns the model. Apply `quantize_` first if wanted.
    Calling it twice is a no-op."""
    if getattr(model, "decode_ready", False):
        return model
    if any(getattr(m, "flex", False) for m in model.layers.modules()):
        raise ValueError("prepare_for_decoding: FlexAttention is on (use_flex_attention); decoding uses "
                         "the dense masked path, turn it off first")
    for layer in model.layers:
        layer.self_attn = FastAttention(layer.self_attn)
        layer.input_layernorm = FastRMSNorm(layer.input_layernorm)
        layer.post_attention_layernorm = FastRMSNorm(layer.post_attention_layernorm)
        ff = layer.feed_forward
        layer.feed_forward = DecodeMoE(ff) if isinstance(ff, MoE) else FusedSwiGLU(ff)
    model.norm = FastRMSNorm(model.norm)
    model.lm_head = fuse([model.lm_head])
    for module in model.modules():  # quantized kernels' packed forms, made now rather than mid-decode
        if hasattr(module, "prepare_kernel"):
            module.prepare_kernel()
    model.decode_ready = True
    return model
