"""Logits parity with `transformers` in both directions, through herd's own checkpoint code."""

import json

import pytest
import torch

import herd
from herd.config import from_hf_dict, to_hf_dict
from herd.model import Llama4
from tests.hf_reference import IMAGE_TOKEN, build_hf_model, hf_config_dict, image_prompt, randomize_

transformers = pytest.importorskip("transformers")

SEQ = 40  # five chunks of 8: chunk boundaries and temperature tuning (floor_scale 4) both active


def assert_close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def text_ids(batch=2, seq=SEQ, seed=0):
    return torch.randint(3, 240, (batch, seq), generator=torch.Generator().manual_seed(seed))


CASES = {
    "default": {},
    "no-qk-norm": dict(qk_norm=False),
    "no-scaling": dict(llama3_scaling=False),
    "interleave-2": dict(moe_step=2),
    "top-2": dict(top_k=2),
    "old-rope-format": dict(old_rope_format=True),
    "maverick-like": dict(qk_norm=False, llama3_scaling=False, moe_step=2, nope_interval=4),
}


@pytest.mark.parametrize("case", CASES)
def test_text_logits_hf_to_herd(tmp_path, case):
    hf = build_hf_model(hf_config_dict(multimodal=False, **CASES[case]))
    hf.save_pretrained(tmp_path)
    ours = herd.from_pretrained(tmp_path)
    ids = text_ids()
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("case", ["default", "interleave-2", "top-2"])
def test_text_logits_herd_to_hf(tmp_path, case):
    config = from_hf_dict(hf_config_dict(multimodal=False, **CASES[case]))
    ours = Llama4(config).eval()
    randomize_(ours, seed=1)
    herd.save_pretrained(ours, tmp_path)
    hf, info = transformers.Llama4ForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info
    ids = text_ids()
    with torch.no_grad():
        assert_close(ours(ids).logits, hf.eval()(ids).logits)


def test_multimodal_logits_hf_to_herd(tmp_path):
    hf = build_hf_model(hf_config_dict(multimodal=True))
    hf.save_pretrained(tmp_path)
    ours = herd.from_pretrained(tmp_path)
    ids = image_prompt([3, 1, 2], tokens_per_tile=4)  # three images of 3, 1 and 2 tiles
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        assert_close(ours(ids, pixel_values=pixels).logits, theirs)
        # the images really matter: other pixels, other logits
        assert not torch.allclose(ours(ids, pixel_values=pixels.flip(0)).logits, theirs, atol=1e-3)


def test_multimodal_logits_herd_to_hf(tmp_path):
    config = from_hf_dict(hf_config_dict(multimodal=True, moe_step=2, top_k=2))
    ours = Llama4(config).eval()
    randomize_(ours, seed=2)
    herd.save_pretrained(ours, tmp_path, max_shard_size=100_000)  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    hf, info = transformers.Llama4ForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info
    ids = image_prompt([2, 4], tokens_per_tile=4)
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids, pixel_values=pixels).logits, hf.eval()(input_ids=ids, pixel_values=pixels).logits)


def test_left_padded_batch_matches_unpadded_rows(tmp_path):
    """Chunks and positions count from each row's first real token, so a left-padded batch gives
    each row the logits `transformers` gives that row alone."""
    hf = build_hf_model(hf_config_dict(multimodal=False))
    hf.save_pretrained(tmp_path)
    ours = herd.from_pretrained(tmp_path)
    rows = [text_ids(1, n, seed=n)[0] for n in (SEQ, 29, 13)]
    ids = torch.zeros(len(rows), SEQ, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, SEQ - len(r):], mask[i, SEQ - len(r):] = r, 1
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            assert_close(batched[i, SEQ - len(r):], hf(r[None]).logits[0])


def test_config_round_trip_through_hf(tmp_path):
    """herd's config.json is read back by transformers with the same iRoPE/MoE layout."""
    config = from_hf_dict(hf_config_dict(multimodal=True, moe_step=2, nope_interval=4))
    herd.save_pretrained(Llama4(config), tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    t = theirs.text_config
    assert t.moe_layers == [1, 3] and t.no_rope_layers == [1, 1, 1, 0]
    assert t.rope_parameters["rope_type"] == "llama3" and t.rope_parameters["factor"] == 8.0
    assert theirs.image_token_index == IMAGE_TOKEN
    # herd reads back the same model (explicit layer lists in place of the intervals it wrote)
    assert to_hf_dict(from_hf_dict(json.loads((tmp_path / "config.json").read_text()))) == to_hf_dict(config)
