"""Llama 4: the MoE decoder with the vision tower fused early into its token stream (SPEC 2, 3).

`Llama4(config)` is the whole model; a text-only config (`vision=None`) gives the text decoder
alone. Images enter by *early fusion*: every `<|patch|>` placeholder embedding in `input_ids` is
overwritten, in order, by one projected image feature, and from there on image tokens are ordinary
positions for masks and RoPE.

The model has no parallelism and no buffers: FSDP, expert parallelism, compilation and
quantization are applied from outside, and a meta-device construction needs nothing rebuilt
after the weights are assigned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import KVCache, TokenLayout
from .decoder import DecoderLayer
from .head_loss import IGNORE, head_cross_entropy
from .moe import Experts, RouterStats
from .norm import RMSNorm
from .rope import text_angles, text_inv_freq
from .vision import VisionEncoder


@dataclass
class Llama4Output:
    logits: torch.Tensor | None  # [B, T, V]; None when `targets` were given
    router: list[RouterStats] = field(default_factory=list)  # one per MoE layer, in layer order
    loss_sum: torch.Tensor | None = None  # summed next-token cross-entropy, when `targets` were given


def token_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 document_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                 ) -> TokenLayout:
    """Positions and documents of a batch. Positions restart at 0 on each document's first real
    token (left padding is skipped); padding (attention_mask == 0) becomes document -1."""
    B, T = input_ids.shape
    if attention_mask is None and document_ids is None and position_ids is None:
        return TokenLayout(torch.arange(T, device=input_ids.device).expand(B, T), None, plain=True)
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    docs = document_ids if document_ids is not None else torch.zeros_like(input_ids)
    docs = torch.where(valid, docs, torch.full_like(docs, -1))
    if position_ids is None:
        idx = torch.arange(T, device=input_ids.device).expand(B, T)
        starts = torch.ones_like(valid)
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]  # a token that opens a new document (or pad run)
        start_idx = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        position_ids = torch.where(valid, idx - start_idx, torch.zeros_like(idx))
    return TokenLayout(position_ids, docs)


class Llama4(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        t = config.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t, i) for i in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.lm_head = nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.vision = self.projector = None
        if config.vision is not None:
            self.vision = VisionEncoder(config.vision)
            self.projector = nn.Linear(config.vision.vision_output_dim, t.hidden_size, bias=False)
        self.reset_parameters()

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def reset_parameters(self):
        """Normal(0, initializer_range) for every matrix, ones for norms, as the reference; the
        vision class and position embeddings use width^-0.5. A no-op on the meta device."""
        std = self.config.text.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, std=std)
                nn.init.normal_(module.down_proj, std=std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()
        if self.vision is not None:
            scale = self.config.vision.hidden_size**-0.5
            nn.init.normal_(self.vision.class_embedding, std=scale)
            nn.init.normal_(self.vision.positional_embedding_vlm, std=scale)

    # ---------------------------------------------------------------- forward
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [B, T, D] with image features written over the `<|patch|>` tokens."""
        h = self.embed_tokens(input_ids)
        if pixel_values is None:
            return h
        if self.vision is None:
            raise ValueError("pixel_values given, but this model has no vision tower (a text-only "
                             "checkpoint); pass text only or load a Llama4ForConditionalGeneration model")
        features = self.projector(self.vision(pixel_values))  # [N_tiles, tokens_per_tile, D]
        features = features.reshape(-1, h.shape[-1]).to(h.dtype)
        is_patch = input_ids == self.config.image_token_index
        n_tokens = int(is_patch.sum())
        if n_tokens != features.shape[0]:
            raise ValueError(
                f"image tokens and image features do not match: input_ids hold {n_tokens} <|patch|> tokens "
                f"(id {self.config.image_token_index}) but pixel_values give {features.shape[0]} features "
                f"({pixel_values.shape[0]} tiles x {self.config.vision.tokens_per_tile} per tile); build the "
                "prompt and the tiles with the same image processor")
        return h.masked_scatter(is_patch[..., None], features)

    def forward(self, input_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                layout: TokenLayout | None = None, logits_to_keep: int | None = None,
                inputs_embeds: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> Llama4Output:
        """input_ids [B, T]; pixel_values [N_tiles, C, S, S]; attention_mask [B, T] (1 = real,
        0 = padding); document_ids [B, T] for packed sequences; position_ids [B, T] to override
        the positions derived from those. A cache (herd.inference) passes the layout it computed.
        `logits_to_keep=n` projects only the last n positions to the vocabulary (generation);
        `inputs_embeds` [B, T, D] replaces input_ids (e.g. pieces of a prompt embedded once).
        `targets` [B, T] (the token after each position, -100 where none) returns the summed
        cross-entropy instead of logits, computed in chunks that never hold all the logits
        (herd.model.head_loss); the loss is taken inside forward so that a sharded head is whole."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
        if inputs_embeds is None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, tokens], got shape {list(input_ids.shape)}")
            h = self.embed(input_ids, pixel_values)
        else:
            if pixel_values is not None:
                raise ValueError("pixel_values go with input_ids; inputs_embeds already hold the image features")
            h = inputs_embeds
        if layout is None:
            ids = input_ids if input_ids is not None else h.new_zeros(h.shape[:2], dtype=torch.long)
            layout = token_layout(ids, attention_mask, document_ids, position_ids)
        t = self.config.text
        rope = text_angles(layout.positions, text_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling))
        router = []
        for layer in self.layers:
            h, stats = layer(h, rope, layout, cache)
            if stats is not None:
                router.append(stats)
        if targets is not None:
            h = self.norm(h).flatten(0, 1)
            if type(self.lm_head) is nn.Linear:
                loss = head_cross_entropy(h, self.lm_head.weight, targets.flatten())
            else:  # a swapped head (quantized, float8) computes its own logits
                loss = F.cross_entropy(self.lm_head(h).float(), targets.flatten(), ignore_index=IGNORE,
                                       reduction="sum")
            return Llama4Output(logits=None, router=router, loss_sum=loss)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        return Llama4Output(logits=self.lm_head(self.norm(h)), router=router)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def num_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.parameters())
