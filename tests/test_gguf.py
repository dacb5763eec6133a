"""GGUF export (herd/export/gguf.py): llama.cpp's logits and greedy tokens equal herd's.

The export tests need the `gguf` package (extra `gguf`) and the llama.cpp ones `llama-cpp-python`
(extra `llamacpp`; not in `test`: it compiles llama.cpp at install); each is skipped with its
reason where its package is missing.
"""

from __future__ import annotations

import pytest
import torch

import herd
from herd.config import ModelConfig, RopeScaling, TextConfig
from herd.data.corpora import stdlib_texts
from herd.export.gguf import check_exportable, exact_positions
from herd.inference import generate
from herd.model import Llama4
from herd.tokenizer import train_tokenizer

PROMPTS = ["def quicksort(items):\n    return sorted(items)", "import os\nfor name in os.listdir('.'):", "x = 1"]


def tiny_text(**overrides) -> TextConfig:
    # 4 layers: dense, MoE, dense, MoE; layer 3 is the NoPE (global) layer. Llama-3 RoPE scaling
    # whose band falls inside head_dim 16's wavelengths, so the rope_freqs tensor matters.
    text = dict(vocab_size=556, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                interleave_moe_layer_step=2, rope_theta=10000.0, max_position_embeddings=2048,
                rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=256))
    return TextConfig(**(text | overrides))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=30_000)], num_bpe_ranks=300)
    text = tiny_text(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eot_id,
                     pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = Llama4(ModelConfig(text=text, vision=None))
    with torch.no_grad():  # norms away from 1 and larger weights: logits with a spread worth comparing
        for name, p in model.named_parameters():
            p.mul_(1 + torch.rand_like(p) if "norm" in name else 5)
    path = tmp_path_factory.mktemp("ckpt")
    herd.save_pretrained(model, path)
    tok.save(path)
    return path, model.eval(), tok


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    pytest.importorskip("gguf", reason="the GGUF export needs the gguf package (pip install 'herd[gguf]')")
    from herd.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(checkpoint[0], out / f"model-{t}.gguf", t)["path"] for t in ("f32", "q8_0")}


def test_layer_patterns_llama_cpp_cannot_hold_are_refused():
    check_exportable(tiny_text())
    with pytest.raises(ValueError, match="NoPE layers"):
        check_exportable(tiny_text(no_rope_layer_interval=2))
    with pytest.raises(ValueError, match="interleave_moe_layer_step"):
        check_exportable(tiny_text(moe_layers=[0, 1]))
    with pytest.raises(ValueError, match="use_qk_norm"):
        check_exportable(tiny_text(use_qk_norm=False))
    with pytest.raises(ValueError, match="at least 4"):
        check_exportable(tiny_text(num_hidden_layers=2))


def test_exact_positions():
    assert exact_positions(tiny_text()) is None  # chunk and temperature tuning as llama.cpp's
    assert exact_positions(tiny_text(attention_chunk_size=256)) == 256
    assert exact_positions(tiny_text(floor_scale=100)) == 99
    assert exact_positions(tiny_text(attn_temperature_tuning=False)) == 8191


def test_export_layout(exported, checkpoint):
    from gguf import GGMLQuantizationType, GGUFReader

    text = checkpoint[1].config.text
    for kind, path in exported.items():
        reader = GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        assert tensors["blk.1.ffn_gate_exps.weight"].shape.tolist() == [64, 64, 4]  # ne: {D, I, E}
        assert tensors["blk.1.ffn_down_exps.weight"].shape.tolist() == [64, 64, 4]
        assert tensors["blk.0.ffn_gate.weight"].shape.tolist() == [64, 128]
        assert tensors["rope_freqs.weight"].shape.tolist() == [text.head_dim // 2]
        assert "blk.0.ffn_gate_inp.weight" not in tensors and "blk.1.ffn_gate_inp.weight" in tensors
        quantized = {n for n, t in tensors.items() if t.tensor_type == GGMLQuantizationType.Q8_0}
        if kind == "f32":
            assert not quantized
        else:  # the matrices herd's int8 quantizes; embedding, router, norms stay f32
            assert "output.weight" in quantized and "blk.1.ffn_up_exps.weight" in quantized
            assert not quantized & {"token_embd.weight", "blk.1.ffn_gate_inp.weight", "output_norm.weight"}


def test_refuses_a_quantized_checkpoint(checkpoint, tmp_path):
    pytest.importorskip("gguf", reason="the GGUF export needs the gguf package (pip install 'herd[gguf]')")
    from herd.export.gguf import export_gguf
    from herd.quant import quantize_

    model = herd.from_pretrained(checkpoint[0])
    herd.save_pretrained(quantize_(model, "int8"), tmp_path / "int8")
    with pytest.raises(ValueError, match="full-precision"):
        export_gguf(tmp_path / "int8", tmp_path / "x.gguf")


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="the llama.cpp comparison needs llama-cpp-python (pip install "
                               "'herd[llamacpp]'; it compiles llama.cpp)")


def load_llama(llama_cpp, path):
    # f32 KV cache (llama.cpp's default is f16, which alone moves the logits by ~0.3% of their spread)
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False, seed=0)


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_llama_cpp_logits_equal_herds(llama_cpp, exported, checkpoint, kind):
    _, model, tok = checkpoint
    llm = load_llama(llama_cpp, exported[kind])
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        # the tokenizer travelled too: llama.cpp's "llama4" pre-tokenizer and herd's merges
        assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(llm.scores[:len(ids)].copy())
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0]
        spread = ours.std().item()
        assert spread > 0.5  # the model's logits are not all near zero
        errors = (theirs - ours).abs().amax(-1) / spread  # per position, relative to the logits' spread
        if kind == "f32":  # rounding only
            assert errors.max() < 1e-3, (prompt, errors)
            assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
        else:
            # Q8_0 rounds weights and activations to 8 bits: a few percent of the spread, but the
            # noise flips the top-1 expert where two router logits are close, and that position
            # moves a lot. A transposed or misnamed tensor moves every position by several spreads.
            assert errors.median() < 0.3, (prompt, errors)


def test_llama_cpp_greedy_tokens_equal_herds(llama_cpp, exported, checkpoint):
    _, model, tok = checkpoint
    llm = load_llama(llama_cpp, exported["f32"])
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        ours = generate(model, torch.tensor([ids]), 8, temperature=0.0, stop_token_ids=[])[0, len(ids):].tolist()
        llm.reset()
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            theirs.append(token)
            if len(theirs) == 8:
                break
        assert theirs == ours, prompt
        ordinary = [t for t in ours if not tok.is_special(t)]
        assert llm.detokenize(ordinary).decode("utf-8", "replace") == tok.decode(ordinary)
