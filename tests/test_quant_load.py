"""Quantizing while loading (herd.hf.from_pretrained(..., quantize=...)): the same model as
`quantize_` on a plainly loaded one, a peak memory near the quantized size, the CUDA kernels' layout,
and `herd params --deploy`."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import herd.quant
from herd.cli import main
from herd.config import ModelConfig, TextConfig
from herd.hf import from_pretrained
from herd.inference.cache import StaticKVCache
from herd.model import Llama4
from herd.params import deployment
from herd.presets import get_preset
from herd.quant import METHODS, QuantExperts, quantize_, quantize_in_blocks
from herd.quant import cuda_kernels
from herd.quant.fp8 import Fp8Weight
from herd.quant.int4 import Int4Weight, _pack_nibbles, _unpack_nibbles
from herd.quant.int8 import Int8Weight

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "load_memory.py"
MiB = 2**20


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # fp8 has no torch.equal


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(_bits(sa[name]), _bits(sb[name])), name


@pytest.fixture(scope="module")
def sharded_tiny(tmp_path_factory):
    """The tiny preset (vision, dense and MoE layers) in fp32, saved in shards of at most 1 MiB."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    herd.save_pretrained(Llama4(get_preset("tiny")), path, max_shard_size=MiB)
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path


@pytest.mark.parametrize("method", METHODS)
def test_streaming_load_equals_quantize_after_load(sharded_tiny, monkeypatch, method):
    monkeypatch.setattr(herd.quant, "BLOCK_WEIGHTS", 5000)  # every large weight in several blocks
    streamed = from_pretrained(sharded_tiny, quantize=method)
    after = quantize_(from_pretrained(sharded_tiny), method)
    assert isinstance(streamed.layers[1].feed_forward.experts, QuantExperts)
    assert streamed.quantization == after.quantization
    assert_same_state(streamed, after)
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, after(ids).logits)


def test_streaming_load_casts_before_quantizing(sharded_tiny, tmp_path):
    streamed = from_pretrained(sharded_tiny, dtype=torch.bfloat16, quantize="int4")
    after = quantize_(from_pretrained(sharded_tiny, dtype=torch.bfloat16), "int4")
    assert_same_state(streamed, after)
    assert streamed.embed_tokens.weight.dtype == torch.bfloat16
    # a saved quantized checkpoint keeps its layers' dtypes (fp32 scales) whatever `dtype` says
    herd.save_pretrained(streamed, tmp_path)
    again = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert again.lm_head.scale.dtype == torch.float32
    assert_same_state(again, streamed)


@pytest.mark.parametrize("make", [Int8Weight.from_float, Fp8Weight.from_float,
                                  lambda w: Int4Weight.from_float(w, 32), lambda w: Int4Weight.from_float(w, 48)])
def test_blocks_give_the_bytes_of_the_whole(monkeypatch, make):
    monkeypatch.setattr(herd.quant, "BLOCK_WEIGHTS", 700)
    stack = torch.randn(3, 64, 40).transpose(1, 2)  # an expert stack as read: [E, in, out] viewed [E, out, in]
    for weight in (stack, torch.randn(37, 64)):  # 37 rows: the last block is short
        whole = make(weight)
        with torch.device("meta"):
            like = make(weight.to("meta"))
        assert_same_state(quantize_in_blocks(make, weight, like), whole)


def _load_memory_benchmark():
    spec = importlib.util.spec_from_file_location("load_memory", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_streaming_peak_memory_is_near_the_quantized_size(tmp_path):
    """Both roads measured in fresh processes (benchmarks/load_memory.py --measure). The streaming
    road stays within the quantized model plus the largest tensor plus a fixed overhead, in
    anonymous memory and in all memory (file pages of the mapped shards included, bounded by one
    shard); loading the full-precision model first does not."""
    bench = _load_memory_benchmark()
    text = TextConfig(vocab_size=8192, hidden_size=512, intermediate_size=1024, intermediate_size_mlp=2048,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                      num_local_experts=8, interleave_moe_layer_step=1, attention_chunk_size=64,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2)
    bench.write_random_checkpoint(ModelConfig(text=text, vision=None), tmp_path, 16 * MiB)
    facts = bench.checkpoint_facts(tmp_path)
    assert facts["shards"] > 4 and facts["bytes"] > 120 * MiB
    streaming = bench.measure_in_subprocess(tmp_path, "streaming", "int4")
    after = bench.measure_in_subprocess(tmp_path, "after", "int4")
    overhead = 64 * MiB  # the blocks' temporaries and the allocator's slack: 10-35 MiB in 12 runs
    bound = streaming["model_bytes"] + facts["largest_tensor"] + overhead
    assert streaming["peak_anon"] <= bound, streaming
    assert streaming["peak_total"] <= bound + facts["largest_shard"], streaming
    assert streaming["end_file"] < 4 * MiB, streaming  # no shard stays mapped
    assert after["peak_total"] > bound + facts["largest_shard"], after  # the bound tells the roads apart


# ------------------------------------------------------------------ CUDA kernels: layout and checks
def test_tinygemm_reads_even_columns_from_the_high_nibble():
    q = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    swapped = cuda_kernels.high_nibble_first(_pack_nibbles(q))
    assert torch.equal(swapped >> 4, q[:, 0::2]) and torch.equal(swapped & 15, q[:, 1::2])
    assert torch.equal(_unpack_nibbles(cuda_kernels.high_nibble_first(swapped)), q)


def test_int4_operands_shapes_on_meta():
    with torch.device("meta"):
        layer = Int4Weight.from_float(torch.empty(4, 48, 256), 64)  # an expert stack
    tiles, scales_zeros = cuda_kernels.int4_operands(layer.qweight, layer.scale, layer.zero)
    assert tiles.shape == (4, 48 // 8, 256 // 128, 32, 4) and tiles.dtype == torch.int32
    assert tiles.numel() * 4 == layer.qweight.numel()  # the same bytes as the saved nibbles
    assert scales_zeros.shape == (4, 4, 48, 2) and scales_zeros.dtype == torch.bfloat16
    assert cuda_kernels.int4_takes(48, 256, 64) and cuda_kernels.inner_k_tiles(96) == 2
    assert not cuda_kernels.int4_takes(44, 256, 64)  # N not a multiple of 8
    assert not cuda_kernels.int4_takes(48, 256, 16)  # a group the kernel has no variant for


def test_cuda_kernels_do_not_run_off_cuda():
    for device in ("cpu", "meta"):
        assert not cuda_kernels.int4_runs_on(torch.device(device))
        assert not cuda_kernels.int8_runs_on(torch.device(device))
    layer = Int4Weight.from_float(torch.randn(48, 64), 32)
    assert layer.prepare_kernel()[0] in ("herd", "aten")  # CPU: the CPU kernels as before


def test_fusing_joins_the_cuda_kernel_forms():
    """prepare_for_decoding fuses q/k/v with `cat`; on CUDA the parts' saved forms are on the host and
    the joined layer must take their kernel forms along (faked here on the meta device)."""
    parts = [Int4Weight.from_float(torch.randn(n, 256), 32) for n in (16, 8)]
    for p in parts:
        with torch.device("meta"):
            p._kernel = ("cuda", *cuda_kernels.int4_operands(p.qweight.to("meta"), p.scale.to("meta"),
                                                              p.zero.to("meta")))
    joined = Int4Weight.cat(parts)
    assert joined._kernel[0] == "cuda"
    assert joined._kernel[1].shape == (3, 2, 32, 4) and joined._kernel[2].shape == (8, 24, 2)
    assert torch.equal(joined.qweight, torch.cat([p.qweight for p in parts]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_cuda_load_runs_the_low_bit_kernels(sharded_tiny, method):
    cpu = quantize_(from_pretrained(sharded_tiny), method)
    gpu = from_pretrained(sharded_tiny, device="cuda", quantize=method)
    layer = gpu.layers[0].self_attn.q_proj
    if method == "int4":
        assert cuda_kernels.int4_runs_on(torch.device("cuda"))
        assert layer._kernel[0] == "cuda" and layer.qweight.device.type == "cpu"  # saved form on the host
    assert_same_state(gpu, cpu)  # state_dict moves nothing back: compare on the CPU
    ids = torch.randint(0, 8000, (2, 24))
    with torch.no_grad():
        expected = cpu.float()(ids).logits
        got = gpu(ids.cuda()).logits.float().cpu()
    assert (got - expected).norm() / expected.norm() < 0.03  # bf16 activations in the kernels


# ------------------------------------------------------------------ herd params --deploy
def test_deployment_counts_what_quantize_and_the_cache_allocate():
    config = get_preset("tiny")
    d = deployment(config, "int4", context=300, batch=2)
    model = quantize_(Llama4(config).to(torch.bfloat16), "int4")
    assert d["checkpoint"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # On the GPU int4 layers keep bf16 scales and zeros: half of theirs, where tinygemm takes the shape.
    taken = [m for m in model.modules() if isinstance(m, Int4Weight)
             and cuda_kernels.int4_takes(m.qweight.shape[-2], 2 * m.qweight.shape[-1], m.group_size)]
    assert taken
    assert d["weights"] == d["checkpoint"] - sum(m.scale.nbytes + m.zero.nbytes for m in taken) // 2
    t = config.text
    per_token_layer = 2 * t.num_key_value_heads * t.head_dim * 2  # keys and values, bf16
    chunked = sum(t.uses_rope(i) for i in range(t.num_hidden_layers))
    assert d["kv_unbounded"] == 2 * 300 * t.num_hidden_layers * per_token_layer
    assert d["kv_bounded"] == 2 * per_token_layer * (chunked * t.attention_chunk_size
                                                     + (t.num_hidden_layers - chunked) * 300)
    assert d["kv_bounded"] == StaticKVCache(t, 2, 300, torch.bfloat16, "meta").nbytes()


def test_scout_int4_fits_one_80_gib_gpu_at_128k(capsys):
    assert main(["params", "scout", "--deploy", "int4", "--context", "131072", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fits"] and not d["fits_unbounded"]
    assert d["kv_bounded"] == (36 * 8192 + 12 * 131072) * 4096  # 4 KiB per token and layer
    assert main(["params", "scout", "--deploy", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "KV cache, bounded" in out
    assert main(["params", "scout", "--deploy", "int4", "--context", "0"]) == 2
