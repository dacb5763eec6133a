"""Checkpoint import/export: exact round trips, dtypes, and bad checkpoints named precisely."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd.config import ConfigError, from_hf_dict
from herd.hf import CheckpointError
from herd.model import Llama4
from tests.hf_reference import hf_config_dict

LAYER0_Q = "language_model.model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def saved(tmp_path):
    model = Llama4(from_hf_dict(hf_config_dict(multimodal=True, moe_step=2)))
    herd.save_pretrained(model, tmp_path)
    return model, tmp_path


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def _rewrite_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_round_trip_is_exact_single_and_sharded(saved, tmp_path):
    model, path = saved
    for target, shard in ((path, None), (tmp_path / "sharded", 50_000)):
        if shard:
            herd.save_pretrained(model, target, max_shard_size=shard)
            assert len(list(target.glob("model-*.safetensors"))) > 2
        loaded = herd.from_pretrained(target)
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name


def test_resaving_with_fewer_shards_removes_stale_ones(saved):
    model, path = saved
    herd.save_pretrained(model, path, max_shard_size=50_000)
    herd.save_pretrained(model, path)
    assert [p.name for p in path.glob("model*")] == ["model.safetensors"]
    herd.from_pretrained(path)


def test_checkpoint_dtype_is_kept_unless_asked(saved):
    model, path = saved
    herd.save_pretrained(model.to(torch.bfloat16), path)
    assert herd.from_pretrained(path).dtype == torch.bfloat16
    assert herd.from_pretrained(path, dtype=torch.float32).dtype == torch.float32


def test_text_only_checkpoint(tmp_path):
    model = Llama4(from_hf_dict(hf_config_dict(multimodal=False)))
    herd.save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"]
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    assert herd.from_pretrained(tmp_path).vision is None


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop(LAYER0_Q))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*layers\.0\.self_attn\.q_proj\.weight"):
        herd.from_pretrained(path)


def test_unexpected_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"language_model.model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'language_model\.model\.layers\.0\.extra\.weight'"):
        herd.from_pretrained(path)


def test_wrong_shape_is_named_with_both_shapes(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({LAYER0_Q: torch.zeros(32, 64)}))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*shape \[32, 64\].*config gives \[64, 64\]"):
        herd.from_pretrained(path)


def test_text_weights_with_multimodal_config_fail_clearly(tmp_path):
    herd.save_pretrained(Llama4(from_hf_dict(hf_config_dict(multimodal=False))), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(multimodal=True)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor '(lm_head\.|model\.).*multimodal model without it"):
        herd.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"), "not a Llama 4 model"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), r"text_config\.hidden_act = 'gelu' is not supported"),
    (lambda c: c["text_config"].update(attention_bias=True), r"text_config\.attention_bias"),
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_type 'yarn' is not supported"),
    (lambda c: c["text_config"].update(num_attention_heads=3), "multiple of num_key_value_heads"),
    (lambda c: c["text_config"].pop("attention_chunk_size"), "attention_chunk_size is missing"),
    (lambda c: c["vision_config"].update(intermediate_size=100), r"intermediate_size \(100\) must equal"),
])
def test_unsupported_config_values_are_named(saved, edit, message):
    _, path = saved
    _rewrite_config(path, edit)
    with pytest.raises(ConfigError, match=message):
        herd.from_pretrained(path)


def test_old_style_config_values_are_read(saved):
    """Early Llama 4 configs: temperature tuning stored as an int, rope_theta + rope_scaling."""
    model, path = saved

    def to_old(c):
        t = c["text_config"]
        t["attn_temperature_tuning"] = 4
        rope = t.pop("rope_parameters")
        t["rope_theta"] = rope.pop("rope_theta")
        t["rope_scaling"] = rope
    _rewrite_config(path, to_old)
    loaded = herd.from_pretrained(path)
    assert loaded.config.text.attn_temperature_tuning is True
    assert loaded.config.text.rope_scaling == model.config.text.rope_scaling


def test_not_a_directory_and_no_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        herd.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(multimodal=False)))
    with pytest.raises(CheckpointError, match="expected model.safetensors"):
        herd.from_pretrained(tmp_path)


def test_failed_save_keeps_the_previous_checkpoint(saved, monkeypatch):
    model, path = saved
    before = load_file(path / "model.safetensors")

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("herd.hf.save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        herd.save_pretrained(model, path)
    assert not list(path.glob(".*.tmp"))  # no temporary left behind
    after = load_file(path / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loading_builds_on_meta_and_never_initialises(saved, monkeypatch):
    """Weights come only from the file: random initialisation never runs on real memory."""
    _, path = saved
    real_normal = torch.nn.init.normal_

    def only_meta(tensor, *args, **kwargs):
        assert tensor.is_meta, "from_pretrained initialised a real tensor"
        return real_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", only_meta)
    herd.from_pretrained(path)


def test_a_model_prepared_for_decoding_refuses_to_save(tmp_path):
    from herd.inference import prepare_for_decoding

    model = prepare_for_decoding(Llama4(from_hf_dict(hf_config_dict(multimodal=False))))
    with pytest.raises(ValueError, match="prepared for decoding.*save the model before preparing"):
        herd.save_pretrained(model, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_dependencies_point_down():
    """herd/model imports only herd/model and herd/config; the tokenizer never imports the chat
    renderer (chat -> tokenizer is the one direction)."""
    import ast
    from pathlib import Path

    root = Path(herd.__file__).parent

    def herd_imports(path: Path) -> set[str]:
        package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                name = ".".join(p for p in (base, node.module or "") if p)
                found |= {name} if node.module else {f"{name}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        return {n for n in found if n == "herd" or n.startswith("herd.")}

    for file in (root / "model").glob("*.py"):
        upward = {n for n in herd_imports(file) if not n.startswith(("herd.model", "herd.config"))}
        assert not upward, f"{file.name} imports {upward}"
    assert not {n for n in herd_imports(root / "tokenizer.py") if n.startswith("herd.chat")}
    assert not hasattr(Llama4, "generate") and not hasattr(Llama4, "from_pretrained")
