"""Typed configs for the Llama 4 model, and their translation to and from Hugging Face `config.json`.

One dataclass per concept: `TextConfig` (the MoE decoder), `VisionConfig` (the encoder and its
adapter) and `ModelConfig` (the two joined by early fusion, with the image token ids). Field names
follow `transformers` where a field exists there, so a reader can hold both side by side; the
awkward parts of the HF format (`no_rope_layers` as a 0/1 list where 1 means *uses* RoPE,
`rope_theta`/`rope_scaling` versus `rope_parameters`, booleans stored as ints) are translated once,
in `from_hf_dict` / `to_hf_dict`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value herd does not support or cannot make sense of."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling: wavelengths above `original_max_position_embeddings /
    low_freq_factor` are divided by `factor`, those below `.../high_freq_factor` are kept, and the
    band between is interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class TextConfig:
    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192  # width of each routed expert and of the shared expert
    intermediate_size_mlp: int = 16384  # width of the dense SwiGLU layers
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    # iRoPE: layer i is a NoPE (global attention) layer iff (i + 1) % interval == 0, unless
    # `nope_layers` lists them explicitly.
    no_rope_layer_interval: int = 4
    nope_layers: list[int] | None = None
    attention_chunk_size: int = 8192
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1
    # MoE: layers step-1, 2*step-1, ... are MoE unless `moe_layers` lists them explicitly.
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    interleave_moe_layer_step: int = 1
    moe_layers: list[int] | None = None
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    bos_token_id: int | None = 200000
    eos_token_id: int | list[int] | None = 200001
    pad_token_id: int | None = 200018

    def __post_init__(self):
        if self.rope_scaling is not None and isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "attention_chunk_size", "num_local_experts",
                     "num_experts_per_tok", "interleave_moe_layer_step", "floor_scale"):
            if getattr(self, name) < 1:
                raise ConfigError(f"text config: {name} must be a positive integer, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ConfigError(f"text config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"text config: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})")
        for name in ("nope_layers", "moe_layers"):
            layers = getattr(self, name)
            if layers is not None:
                bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
                if bad:
                    raise ConfigError(f"text config: {name} has layer indices {bad} outside "
                                      f"0..{self.num_hidden_layers - 1}")
                setattr(self, name, sorted(set(layers)))

    def uses_rope(self, layer: int) -> bool:
        """RoPE layers use chunked attention; NoPE layers attend globally (SPEC 2.1)."""
        if self.nope_layers is not None:
            return layer not in self.nope_layers
        return (layer + 1) % self.no_rope_layer_interval != 0

    def is_moe(self, layer: int) -> bool:
        if self.moe_layers is not None:
            return layer in self.moe_layers
        return (layer + 1) % self.interleave_moe_layer_step == 0


@dataclass
class VisionConfig:
    image_size: int = 336  # side of one square tile
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    num_hidden_layers: int = 34
    num_attention_heads: int = 16
    intermediate_size: int = 5632  # encoder MLP width; also the pixel-shuffled width (HF ties them)
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096  # adapter width
    projector_output_dim: int = 4096  # adapter output
    vision_output_dim: int = 4096  # projector input (must equal the adapter output)
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision config: image_size ({self.image_size}) must be a multiple of "
                              f"patch_size ({self.patch_size})")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision config: hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ConfigError("vision config: the head dimension must be a multiple of 4 for the 2D "
                              f"rotary embedding, got {self.hidden_size // self.num_attention_heads}")
        if self.pixel_shuffle_ratio != 0.5:
            raise ConfigError(f"vision config: pixel_shuffle_ratio {self.pixel_shuffle_ratio} is not "
                              "supported; Llama 4 uses 0.5 (2x2 patches per token)")
        if self.patches_per_side % 2:
            raise ConfigError(f"vision config: patches per side ({self.patches_per_side}) must be even "
                              "for the 2x2 pixel shuffle")
        if self.intermediate_size != 4 * self.hidden_size:
            raise ConfigError(
                f"vision config: intermediate_size ({self.intermediate_size}) must equal 4 * hidden_size "
                f"({4 * self.hidden_size}): the Hugging Face layout sizes the adapter's input (the "
                "pixel-shuffled width) with the same field")
        if self.vision_output_dim != self.projector_output_dim:
            raise ConfigError(f"vision config: vision_output_dim ({self.vision_output_dim}) must equal "
                              f"projector_output_dim ({self.projector_output_dim})")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Tokens one tile becomes after the 2x2 pixel shuffle (144 for 336/14)."""
        return (self.patches_per_side // 2) ** 2


@dataclass
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    image_token_index: int = 200092  # <|patch|>: each one is overwritten by one image feature
    boi_token_index: int = 200080  # <|image_start|>
    eoi_token_index: int = 200081  # <|image_end|>

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        text = TextConfig(**d.pop("text"))
        vision = d.pop("vision")
        return cls(text=text, vision=VisionConfig(**vision) if vision is not None else None, **d)


# --------------------------------------------------------------------------------------------
# Hugging Face config.json, both ways
# --------------------------------------------------------------------------------------------

MULTIMODAL_ARCH = "Llama4ForConditionalGeneration"
TEXT_ARCH = "Llama4ForCausalLM"

# HF fields herd reads but whose only supported value is fixed: a different value is an error.
_TEXT_FIXED = {"hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False}
# (`vision_config.norm_eps` is ignored, as in the HF reference: its LayerNorms always use 1e-5.)
_VISION_FIXED = {"hidden_act": "gelu", "multi_modal_projector_bias": False, "num_channels": 3}
_VISION_ACCEPTED = {"vision_feature_select_strategy": "default", "vision_feature_layer": -1}


def _rope_from_hf(tc: dict) -> tuple[float, RopeScaling | None]:
    """Old configs: `rope_theta` + `rope_scaling`; new ones: `rope_parameters` holding both."""
    params = tc.get("rope_parameters")
    if params:
        theta, scaling = params.get("rope_theta", tc.get("rope_theta", 500000.0)), params
    else:
        theta, scaling = tc.get("rope_theta", 500000.0), tc.get("rope_scaling")
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"text_config.rope_scaling: rope_type {kind!r} is not supported; Llama 4 uses "
                          "'llama3' scaling or none")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def _check_fixed(section: str, d: dict, fixed: dict):
    for key, want in fixed.items():
        if key in d and d[key] is not None and d[key] != want:
            raise ConfigError(f"{section}.{key} = {d[key]!r} is not supported by herd (expected {want!r})")


def text_from_hf(tc: dict) -> TextConfig:
    _check_fixed("text_config", tc, _TEXT_FIXED)
    theta, scaling = _rope_from_hf(tc)
    n_layers = tc.get("num_hidden_layers", 48)
    nope = None
    if tc.get("no_rope_layers"):
        flags = tc["no_rope_layers"]  # 1 = this layer USES rope (the name says the opposite)
        if len(flags) < n_layers:
            raise ConfigError(f"text_config.no_rope_layers has {len(flags)} entries for {n_layers} layers")
        nope = [i for i in range(n_layers) if not flags[i]]
    kept = {f.name for f in dataclasses.fields(TextConfig)} - {"rope_theta", "rope_scaling", "nope_layers"}
    kwargs = {k: tc[k] for k in kept if k in tc and tc[k] is not None}
    if "head_dim" not in kwargs and "hidden_size" in tc and "num_attention_heads" in tc:
        kwargs["head_dim"] = tc["hidden_size"] // tc["num_attention_heads"]
    if "attn_temperature_tuning" in kwargs:  # early configs store it as an int (e.g. 4)
        kwargs["attn_temperature_tuning"] = bool(kwargs["attn_temperature_tuning"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kwargs.setdefault(key, tc.get(key))
    if tc.get("attention_chunk_size") is None:
        raise ConfigError("text_config.attention_chunk_size is missing; herd needs the chunk size of the "
                          "RoPE layers (8192 in the released models)")
    return TextConfig(rope_theta=theta, rope_scaling=scaling, nope_layers=nope, **kwargs)


def vision_from_hf(vc: dict) -> VisionConfig:
    _check_fixed("vision_config", vc, _VISION_FIXED | _VISION_ACCEPTED)
    kept = {f.name for f in dataclasses.fields(VisionConfig)} - {"rope_theta"}
    kwargs = {k: vc[k] for k in kept if k in vc and vc[k] is not None}
    theta = (vc.get("rope_parameters") or {}).get("rope_theta", vc.get("rope_theta", 10000.0))
    return VisionConfig(rope_theta=float(theta), **kwargs)


def from_hf_dict(d: dict) -> ModelConfig:
    """Reads a `config.json` written by any `transformers` version that knows Llama 4."""
    arch = (d.get("architectures") or [None])[0]
    model_type = d.get("model_type")
    if arch == TEXT_ARCH or (arch is None and model_type == "llama4_text"):
        return ModelConfig(text=text_from_hf(d), vision=None)
    if arch == MULTIMODAL_ARCH or (arch is None and model_type == "llama4"):
        if "text_config" not in d:
            raise ConfigError("config.json: a Llama4ForConditionalGeneration config needs text_config")
        vision = vision_from_hf(d["vision_config"]) if d.get("vision_config") is not None else None
        return ModelConfig(
            text=text_from_hf(d["text_config"]), vision=vision,
            image_token_index=d.get("image_token_index", 200092),
            boi_token_index=d.get("boi_token_index", 200080),
            eoi_token_index=d.get("eoi_token_index", 200081))
    raise ConfigError(
        f"config.json: architecture {arch!r} (model_type {model_type!r}) is not a Llama 4 model; herd "
        f"loads {MULTIMODAL_ARCH} and {TEXT_ARCH}")


def text_to_hf(t: TextConfig) -> dict:
    d = {k: v for k, v in dataclasses.asdict(t).items()
         if k not in ("rope_theta", "rope_scaling", "nope_layers", "no_rope_layer_interval", "moe_layers")}
    rope = {"rope_type": "default", "rope_theta": t.rope_theta}
    if t.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": t.rope_theta, **dataclasses.asdict(t.rope_scaling)}
    # Both spellings, so that old and new `transformers` read the same rope settings.
    d["rope_parameters"] = rope
    d["rope_theta"] = t.rope_theta
    d["rope_scaling"] = None if t.rope_scaling is None else dict(rope)
    d["no_rope_layers"] = [int(t.uses_rope(i)) for i in range(t.num_hidden_layers)]
    d["moe_layers"] = [i for i in range(t.num_hidden_layers) if t.is_moe(i)]
    d["interleave_moe_layer_step"] = t.interleave_moe_layer_step
    d["layer_types"] = ["chunked_attention" if t.uses_rope(i) else "full_attention"
                        for i in range(t.num_hidden_layers)]
    d.update(model_type="llama4_text", hidden_act="silu", attention_bias=False, tie_word_embeddings=False)
    return d


def to_hf_dict(cfg: ModelConfig) -> dict:
    text = text_to_hf(cfg.text)
    if cfg.vision is None:
        return {"architectures": [TEXT_ARCH], **text, "torch_dtype": "float32"}
    vision = dataclasses.asdict(cfg.vision)
    vision["rope_parameters"] = {"rope_type": "default", "rope_theta": vision.pop("rope_theta")}
    vision.update(model_type="llama4_vision_model", hidden_act="gelu", multi_modal_projector_bias=False, norm_eps=1e-5,
                  vision_feature_select_strategy="default", vision_feature_layer=-1)
    return {
        "architectures": [MULTIMODAL_ARCH], "model_type": "llama4",
        "text_config": text, "vision_config": vision,
        "image_token_index": cfg.image_token_index, "boi_token_index": cfg.boi_token_index,
        "eoi_token_index": cfg.eoi_token_index, "tie_word_embeddings": False,
    }


def read_hf_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: a Hugging Face checkpoint directory holds config.json")
    try:
        d: Any = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    return from_hf_dict(d)
