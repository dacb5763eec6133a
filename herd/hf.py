"""Hugging Face checkpoints in and out (SPEC 4).

herd's module names follow the reference's inside each block, so the mapping is a short table of
prefixes, read top to bottom in either direction. Expert weights already share the HF layout
([E, D, 2I] and [E, I, D], no `.weight` suffix), so no tensor is transposed or split.

Loading builds the model on the meta device and assigns each tensor as safetensors reads it
(memory-mapped), so the weights are never held twice, and keeps the checkpoint's dtype unless
`dtype` says otherwise. Every tensor is checked: a missing, unexpected or wrongly shaped one is an
error that names it; nothing the checkpoint should provide is ever random-initialised. Loading with
`quantize` quantizes each weight as it is read (herd.quant.load_quantized), so the peak is the
quantized model plus about one tensor (docs/deployment.md has the measurement).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig, read_hf_config, to_hf_dict
from .model import Llama4

# (herd prefix, HF prefix in Llama4ForConditionalGeneration, HF prefix in Llama4ForCausalLM)
KEY_TABLE = [
    ("embed_tokens.", "language_model.model.embed_tokens.", "model.embed_tokens."),
    ("layers.", "language_model.model.layers.", "model.layers."),
    ("norm.", "language_model.model.norm.", "model.norm."),
    ("lm_head.", "language_model.lm_head.", "lm_head."),
    ("vision.patch_embedding.", "vision_model.patch_embedding.linear.", None),
    ("vision.layers.", "vision_model.model.layers.", None),
    ("vision.adapter.", "vision_model.vision_adapter.mlp.", None),
    ("vision.", "vision_model.", None),  # class/positional embeddings, layernorm_pre/post
    ("projector.", "multi_modal_projector.linear_1.", None),
]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model its config describes."""


def _rename(name: str, src: int, dst: int) -> str | None:
    for row in KEY_TABLE:
        if row[src] is not None and row[dst] is not None and name.startswith(row[src]):
            return row[dst] + name[len(row[src]):]
    return None


def to_hf_key(name: str, multimodal: bool) -> str:
    key = _rename(name, 0, 1 if multimodal else 2)
    assert key is not None, f"no HF name for herd parameter {name}"
    return key


def from_hf_key(key: str, multimodal: bool) -> str | None:
    return _rename(key, 1 if multimodal else 2, 0)


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {path}: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise CheckpointError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json "
                          "(herd reads safetensors only; convert .bin/.pth checkpoints first)")


def _place(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device, copy: bool) -> torch.Tensor:
    """The tensor on `device`, in `dtype` if it is a float tensor; a copy if `copy`, else on the CPU
    it may stay a view of the memory map."""
    if dtype is not None and tensor.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return tensor.to(device=device, dtype=dtype, copy=copy)  # (quantized values keep their integer/fp8 dtype)
    return tensor.to(device=device, copy=copy)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device,
            copy: bool) -> nn.Module:
    """Puts the checkpoint's tensor in the model as `name`; returns the module that holds it."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._buffers:  # a quantized layer's weights and scales: their saved dtypes, and
        # copied out of the memory map: the CPU kernels read aligned memory, and a safetensors
        # mapping gives only 8-byte alignment (a segfault, not an error).
        module._buffers[leaf] = _place(tensor, None, device, copy=True)
    else:
        tensor = _place(tensor, dtype, device, copy)
        setattr(module, leaf, nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    return module


def _quantization_config(path: Path) -> dict | None:
    """herd's own `quantization_config` in config.json, or None for a full-precision checkpoint."""
    q = json.loads((path / "config.json").read_text()).get("quantization_config")
    if q is None:
        return None
    if q.get("quant_method") != "herd":
        raise CheckpointError(f"{path}: quantization_config.quant_method {q.get('quant_method')!r} is not "
                              "supported; herd loads full-precision checkpoints and its own quantized ones")
    return q


def from_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    config: ModelConfig | None = None, quantize: str | None = None) -> Llama4:
    """Loads a directory in the Hugging Face Llama 4 layout (one file or shards with an index).

    `quantize` ("int8", "int4", "fp8") loads a full-precision checkpoint into weight-only quantized
    layers (herd.quant): the layers are swapped on the meta device first, then each weight (an
    expert stack at most) is quantized as it is read, a block of rows at a time, on `device`. The
    full-precision model never exists: peak memory is the quantized model plus about one tensor.
    Everything else is copied out of the memory map, so each shard's mapping closes once it is read.
    On CUDA each quantized layer makes its kernel's form as soon as it is complete (herd.quant.int4:
    the saved form then waits in host memory), so the GPU never holds two forms of the weights."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; herd.from_pretrained expects a checkpoint "
                                "directory holding config.json and safetensors weights")
    from .quant import load_quantized, quantize_

    config = config or read_hf_config(path)
    multimodal = config.vision is not None
    device = torch.device(device)
    saved_quant = _quantization_config(path)
    if saved_quant is not None and quantize not in (None, saved_quant["method"]):
        raise CheckpointError(f"{path} holds {saved_quant['method']} weights; quantize={quantize!r} "
                              "needs the full-precision checkpoint")
    with torch.device("meta"):
        model = Llama4(config)
        if saved_quant is not None:  # the checkpoint holds the quantized layers' own buffers
            quantize_(model, saved_quant["method"], saved_quant["group_size"])
    expected = {name: t.shape for name, t in model.state_dict().items()}  # what the checkpoint must hold
    streaming = saved_quant is None and quantize is not None
    if streaming:
        quantize_(model, quantize)  # on the meta device: shapes only
    seen: set[str] = set()
    for file in _checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:  # memory-mapped: nothing read yet
            for key in f.keys():
                name = from_hf_key(key, multimodal)
                if name is None or name not in expected:
                    raise CheckpointError(
                        f"unexpected tensor {key!r} in {file.name}: the config describes a "
                        f"{'multimodal' if multimodal else 'text-only'} model without it (does config.json "
                        "match these weights?)")
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(f"tensor {key!r} in {file.name} has shape {list(shape)}, but the config "
                                          f"gives {list(expected[name])}")
                tensor = f.get_tensor(key)  # a view of the map
                layer = None
                if streaming:
                    layer = load_quantized(model, name, tensor, lambda block: _place(block, dtype, device, False))
                if layer is None:
                    layer = _assign(model, name, tensor, dtype, device, copy=streaming)
                if device.type == "cuda" and hasattr(layer, "prepare_kernel") and not any(
                        b.is_meta for b in layer.buffers()):  # a complete quantized layer
                    layer.prepare_kernel()
                seen.add(name)
    missing = [to_hf_key(n, multimodal) for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s) the config needs: "
                              f"{', '.join(missing[:5])}{more}")
    return model.eval()


def _write_atomic(target: Path, write):
    """Writes through a temporary file in the same directory, then renames: a crash never leaves a
    half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: Llama4, path: str | Path, max_shard_size: int = 5 * 2**30):
    """Writes a checkpoint directory that `transformers` and `herd.from_pretrained` both load (a
    quantized model writes herd's own quantized layout, which herd loads)."""
    if getattr(model, "decode_ready", False):
        # Its fused, blocked weights have no Hugging Face names: the saved keys would load nowhere.
        raise ValueError("save_pretrained: this model was prepared for decoding (prepare_for_decoding fuses and "
                         "re-blocks its weights); save the model before preparing it, or load the checkpoint again")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    multimodal = model.config.vision is not None
    # state_dict: parameters, plus the buffers that hold quantized weights
    tensors = {to_hf_key(n, multimodal): p.detach().contiguous() for n, p in model.state_dict().items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    for name, shard in zip(names, shards):
        _write_atomic(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    index_file = path / "model.safetensors.index.json"
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        _write_atomic(index_file, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    else:
        index_file.unlink(missing_ok=True)
    for old in path.glob("model*.safetensors"):  # shards of an earlier save, removed only now
        if old.name not in names:
            old.unlink()
    config = to_hf_dict(model.config)
    dtype = str(model.dtype).removeprefix("torch.")
    (config["text_config"] if multimodal else config)["torch_dtype"] = dtype
    config["torch_dtype"] = dtype
    quant = getattr(model, "quantization", None)
    if quant is not None:  # herd's own format; transformers does not read it
        config["quantization_config"] = {"quant_method": "herd", **quant}
    _write_atomic(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
