"""Decode-time module swaps: `prepare_for_decoding(model)` rebuilds the decoder for fast inference.

The model's own modules keep the Hugging Face layout that training and checkpoints need. A decoding
step on CPU is instead limited by how fast small matrix-vector products read their weights and by
the number of small ops per layer, so for inference this module swaps, in place (like
`herd.quant.quantize_`):
- q/k/v projections for one fused projection, and gate/up (dense layers, shared expert) for one
  fused gate_up: one weight read and one call instead of three or two;
- every full-precision weight, lm_head included, to the [in, out] layout (`x @ W`): PyTorch's CPU
  GEMV reads it about twice as fast as nn.Linear's [out, in] (`x @ W.T`);
- RMSNorm for `F.rms_norm` (one op instead of six) and RoPE for a complex multiply, applied to
  q and k together;
- the MoE for one that, when a few tokens are routed (decoding), runs each chosen expert's weights
  directly instead of sorting and splitting, and otherwise takes the model's grouped path.
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
from ..model.moe import MoE, RouterStats, SwiGLU, grouped_swiglu, route
from ..model.norm import RMSNorm, rms_normalize
from ..quant import QuantExperts
from ..quant.fp8 import Fp8Weight
from ..quant.int4 import Int4Weight
from ..quant.int8 import Int8Weight

QUANT_TYPES = (Int8Weight, Int4Weight, Fp8Weight)
FEW_TOKENS = 4  # up to this many (token, expert) pairs, the MoE runs them one by one


class InOutLinear(nn.Module):
    """y = x @ weight, weight [in, out]: nn.Linear's function with the transposed storage."""

    def __init__(self, weight_t: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight_t.contiguous(), requires_grad=False)  # [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def fuse(linears: list[nn.Module]) -> nn.Module:
    """One layer computing the concatenated outputs of `linears` (all nn.Linear, or all of one
    quantized format): full precision becomes an [in, out] InOutLinear, quantized layers concatenate
    their rows."""
    first = linears[0]
    if isinstance(first, nn.Linear):
        return InOutLinear(torch.cat([m.weight.detach() for m in linears]).t())
    if isinstance(first, QUANT_TYPES) and all(type(m) is type(first) for m in linears):
        return type(first).cat(linears)
    raise TypeError(f"prepare_for_decoding: cannot fuse {[type(m).__name__ for m in linears]}")


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


def rotate(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs of x [B, T, heads, Dh] as a complex multiply, in fp32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, T, heads, Dh/2]
    return torch.view_as_real(pairs * cis[:, :, None]).flatten(-2).type_as(x)


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
            qk = rotate(qk, rope_cis(layout, rope))
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
    no sort, bincount or split. More tokens take the model's grouped path. The router is kept as it
    is (a flipped choice costs more than its bytes; quantization keeps it in full precision too)."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.router = moe.router
        self.experts = moe.experts  # Experts ([E, D, 2I] and [E, I, D], already [in, out]) or QuantExperts
        self.shared_expert = FusedSwiGLU(moe.shared_expert)
        self.selection_bias = moe.selection_bias

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        if isinstance(ex, QuantExperts):
            gate, up = ex.gate_up_proj[e](x).chunk(2, dim=-1)
            return ex.down_proj[e](F.silu(gate) * up)
        gate, up = (x @ ex.gate_up_proj[e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ ex.down_proj[e]

    def _gathered(self, x: torch.Tensor, top_experts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Sum over each token's k experts with the chosen weights gathered by index: no host read
        (accelerators, where it would stall the queue). x [N, D], top_experts and gates [N, k] -> [N, D]."""
        gate_up = self.experts.gate_up_proj[top_experts]  # [N, k, D, 2I]
        down = self.experts.down_proj[top_experts]  # [N, k, I, D]
        xg = (x[:, None, :] * gates[..., None])[..., None, :]  # [N, k, 1, D]
        gate, up = (xg @ gate_up).chunk(2, dim=-1)  # [N, k, 1, I] each
        return ((F.silu(gate) * up) @ down).sum(1)[:, 0]  # [N, D]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.router(x)  # [N, E]
        top_experts, gates = route(logits, self.top_k, self.selection_bias)  # [N, k] each
        counts = torch.bincount(top_experts.flatten(), minlength=self.num_experts)
        out = self.shared_expert(x)
        N, k = top_experts.shape
        stats = RouterStats(logits=logits, counts=counts)
        few = N * k <= FEW_TOKENS
        if few and not isinstance(self.experts, QuantExperts) and x.device.type != "cpu":
            return (out + self._gathered(x, top_experts, gates)).view(shape), stats
        if few:
            # On CPU a host read of the chosen ids costs nothing and beats copying their weights;
            # then each (token, expert) pair is a plain SwiGLU on the expert's own weights.
            for pair, e in enumerate(top_experts.flatten().tolist()):
                n = pair // k
                out[n] += self._expert(e, x[n:n + 1] * gates[n, pair % k])[0]
            return out.view(shape), stats
        order = torch.argsort(top_experts.flatten(), stable=True)
        token_of_pair = order // k
        routed_in = x[token_of_pair] * gates.flatten()[order, None]
        if isinstance(self.experts, QuantExperts):
            routed_out = self.experts(routed_in, counts)
        else:
            routed_out = grouped_swiglu(routed_in, counts, self.experts.gate_up_proj, self.experts.down_proj)
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
    model.decode_ready = True
    return model
