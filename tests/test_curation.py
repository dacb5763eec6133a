import random

import pytest

from herd.data.curation import exact_dedup, match_concepts, metaclip_balance, quality_filter
from herd.data.synthetic import scene_concepts, synthetic_scenes


def _skewed_captions(seed: int = 0) -> list[str]:
    """A head concept (cat: 5000 pairs), a mid one (dog: 400), a tail (owl: 30, lynx: 5), pairs
    with two concepts, and captions matching nothing."""
    rng = random.Random(seed)
    texts = [f"a photo of a cat number {i}" for i in range(5000)]
    texts += [f"a dog in the park {i}" for i in range(400)]
    texts += [f"an owl at night {i}" for i in range(30)]
    texts += [f"a lynx in snow {i}" for i in range(5)]
    texts += [f"a cat and an owl {i}" for i in range(20)]  # tail concept shared with the head
    texts += [f"a landscape {i}" for i in range(100)]
    rng.shuffle(texts)
    return texts


def test_metaclip_caps_the_head_and_keeps_the_tail(capsys):
    texts = _skewed_captions()
    result = metaclip_balance(texts, ["cat", "dog", "owl", "lynx"], t=100, seed=0)
    print(result.report())
    by = {c.concept: c for c in result.concepts}
    assert (by["cat"].matched, by["dog"].matched, by["owl"].matched, by["lynx"].matched) == (5020, 400, 50, 5)
    # Head: kept ~ t (binomial 5020 x 100/5020, plus the 20 cat+owl pairs the owl keeps whole).
    assert 80 <= by["cat"].kept <= 145
    assert 75 <= by["dog"].kept <= 125
    # Tail (n <= t): every pair survives.
    assert by["owl"].kept == 50 and by["lynx"].kept == 5
    assert result.unmatched == 100
    assert all("landscape" not in texts[i] for i in result.kept)
    report = capsys.readouterr().out
    assert "t = 100" in report and "lynx" in report
    print(report)  # shown with -s: per-concept matched / kept / dropped


def test_metaclip_is_deterministic_for_a_seed():
    texts = _skewed_captions()
    a = metaclip_balance(texts, ["cat", "dog", "owl"], t=50, seed=7)
    b = metaclip_balance(texts, ["cat", "dog", "owl"], t=50, seed=7)
    c = metaclip_balance(texts, ["cat", "dog", "owl"], t=50, seed=8)
    assert a.kept == b.kept and a.kept != c.kept
    assert a.kept == sorted(a.kept)


def test_substring_matching_is_case_insensitive_by_default():
    assert match_concepts(["A Red Circle", "concatenate"], ["red circle", "cat"]) == [[0], [1]]
    assert match_concepts(["A Red Circle"], ["red circle"], lowercase=False) == [[]]
    with pytest.raises(ValueError, match="duplicates"):
        metaclip_balance(["x"], ["a", "a"], t=1)
    with pytest.raises(ValueError, match="positive"):
        metaclip_balance(["x"], ["a"], t=0)


def test_balancing_synthetic_scene_captions():
    captions = [s.caption for s in synthetic_scenes(300, seed=0)]
    result = metaclip_balance(captions, scene_concepts(), t=20, seed=0)
    assert all(c.matched > 20 for c in result.concepts)  # every colour-shape pair is frequent here
    assert len(result.kept) < len(captions) and result.unmatched == 0
    assert all(c.kept >= 10 for c in result.concepts)


def test_exact_dedup_and_quality_hook():
    kept, dropped = exact_dedup(["a", "b", "a", "c", "b"])
    assert kept == ["a", "b", "c"] and dropped == 2
    docs = [{"text": "x"}, {"text": "y"}, {"text": "x"}]
    kept, dropped = exact_dedup(docs, key=lambda d: d["text"])
    assert kept == docs[:2] and dropped == 1
    kept, dropped = quality_filter(["ok text", "", "   ", "fine"], keep=lambda s: len(s.strip()) > 0)
    assert kept == ["ok text", "fine"] and dropped == 2
