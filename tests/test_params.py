"""Preset parameter counts against the published figures, and `herd params`."""

import json

import pytest

from herd.cli import main
from herd.params import count_parameters
from herd.presets import get_preset


@pytest.mark.parametrize("preset, total, active", [
    ("scout", 108_641_793_536, 17_172_894_720),
    ("maverick", 401_583_781_376, 17_184_691_200),
])
def test_published_counts_to_the_parameter(preset, total, active):
    assert count_parameters(get_preset(preset)) == {"total": total, "active": active}


def test_behemoth_is_near_its_published_size():
    counts = count_parameters(get_preset("behemoth"))
    assert counts["active"] == pytest.approx(288e9, rel=0.01)
    assert counts["total"] == pytest.approx(2e12, rel=0.05)


def test_tiny_is_small_and_has_every_feature():
    cfg = get_preset("tiny")
    t = cfg.text
    counts = count_parameters(cfg)
    assert 1e6 < counts["active"] < counts["total"] < 10e6
    layers = range(t.num_hidden_layers)
    assert any(not t.uses_rope(i) for i in layers) and any(t.uses_rope(i) for i in layers)
    assert any(t.is_moe(i) for i in layers) and any(not t.is_moe(i) for i in layers)
    assert t.attention_chunk_size < 256 and t.use_qk_norm and cfg.vision is not None


def test_cli_json(capsys):
    assert main(["params", "scout", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"total": 108_641_793_536, "active": 17_172_894_720}


def test_cli_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        main(["params", "llama5"])
    assert "invalid choice" in capsys.readouterr().err
