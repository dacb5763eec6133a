"""Post-training math: DPO against the paper's formula (log 2 at step 0), GRPO's advantages,
clipping and KL against the formulas written out by hand, dynamic filtering, pass@k against the
combinatorial definition, and the easy-data filter."""

import copy
import math
from itertools import combinations

import pytest
import torch

from herd.config import from_hf_dict
from herd.model import Llama4
from herd.train.difficulty import drop_easy, keep_window, loss_difficulty, pass_at_k
from herd.train.losses import IGNORE, Batch
from herd.train.post_losses import (DPOLoss, GRPOLoss, PreferenceBatch, RLBatch, answer_rows, dpo_terms,
                                    group_advantages, grpo_terms, informative_groups, sequence_logprobs,
                                    target_logprobs, token_logprobs)
from tests.hf_reference import hf_config_dict, randomize_


def tiny_model(seed=0) -> Llama4:
    model = Llama4(from_hf_dict(hf_config_dict(multimodal=False, num_layers=2)))
    randomize_(model, std=0.05, seed=seed)
    return model


def answer_batch(rows, answer_starts, pad=0) -> Batch:
    """Right-padded rows whose targets are the tokens from answer_starts[i] on (labels shifted)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE)
    for i, (row, start) in enumerate(zip(rows, answer_starts)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, start - 1:len(row) - 1] = torch.tensor(row[start:])
    return Batch(ids, labels, attention_mask=mask)


def preference_pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(3, 240, (n,), generator=g).tolist()  # noqa: E731
    prompts = [r(5), r(3)]
    chosen = [p + r(4) for p in prompts]
    rejected = [prompts[0] + r(6), prompts[1] + r(2)]
    return answer_batch(chosen + rejected, [5, 3, 5, 3])


def naive_logprobs(model, batch):
    """Summed log-probability of each row's answer tokens, one position at a time."""
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    sums = []
    for row in range(logits.shape[0]):
        total = 0.0
        for t in range(logits.shape[1]):
            y = int(batch.labels[row, t])
            if y != IGNORE:
                total += float(torch.log_softmax(logits[row, t], -1)[y])
        sums.append(total)
    return sums


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    model, batch = tiny_model(), preference_pairs()
    prefs = PreferenceBatch(batch, sequence_logprobs(model, batch))
    out = DPOLoss(beta=0.1)(model, prefs)
    assert out.count == 2
    assert float(out.loss_sum.detach()) / out.count == pytest.approx(math.log(2), abs=1e-7)
    assert out.metrics["reward_margin"][0] == 0.0 and out.metrics["reward_accuracy"][0] == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_the_papers_formula(beta):
    policy, reference, batch = tiny_model(seed=1), tiny_model(seed=2), preference_pairs()
    prefs = PreferenceBatch(batch, sequence_logprobs(reference, batch))
    out = DPOLoss(beta=beta)(policy, prefs)
    expected, margins = 0.0, []
    pi, ref = naive_logprobs(policy, batch), naive_logprobs(reference, batch)
    for i in range(2):  # rows i (chosen) and i + 2 (rejected)
        pc, pr, rc, rr = pi[i], pi[i + 2], ref[i], ref[i + 2]
        h = beta * ((pc - rc) - (pr - rr))
        expected += -math.log(1 / (1 + math.exp(-h)))
        margins.append(h)
    assert float(out.loss_sum.detach()) == pytest.approx(expected, rel=1e-4)
    assert out.metrics["reward_margin"][0] == pytest.approx(sum(margins), rel=1e-3, abs=1e-5)
    assert out.metrics["reward_accuracy"][0] == sum(m > 0 for m in margins)
    terms = dpo_terms(*(torch.tensor([x]) for x in (pi[0], pi[2], ref[0], ref[2])), beta=beta)
    assert float(terms.chosen_rewards) == pytest.approx(beta * (pi[0] - ref[0]), rel=1e-5)
    assert float(terms.rejected_rewards) == pytest.approx(beta * (pi[2] - ref[2]), rel=1e-5)


def test_dpo_nll_term_is_the_chosen_answers_per_token_nll():
    policy, reference, batch = tiny_model(seed=1), tiny_model(seed=2), preference_pairs()
    prefs = PreferenceBatch(batch, sequence_logprobs(reference, batch))
    plain, with_nll = DPOLoss(beta=0.1)(policy, prefs), DPOLoss(beta=0.1, nll_weight=0.5)(policy, prefs)
    pi = naive_logprobs(policy, batch)
    nll = -(pi[0] / 4 + pi[1] / 4)
    assert float((with_nll.loss_sum - plain.loss_sum).detach()) == pytest.approx(0.5 * nll, rel=1e-4)
    with pytest.raises(ValueError, match="beta"):
        DPOLoss(beta=0)


def test_group_advantages_and_dynamic_filtering():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.1]])
    adv = group_advantages(rewards)
    s = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4))
    assert (adv[1] == 0).all() and (adv[2] == 0).all()  # all-equal groups: zero advantage
    torch.testing.assert_close(group_advantages(rewards, scale=False)[3], torch.tensor([-0.275] * 3 + [0.825]))
    assert informative_groups(rewards).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_grpo_clips_asymmetrically_and_kl_is_k3():
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.25, 1.5, 0.75, 0.9]]))  # ratios
    mask = torch.ones(1, 4, dtype=torch.bool)
    pos = grpo_terms(logps, old, torch.tensor([2.0]), mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(pos.losses, -2.0 * torch.tensor([[1.25, 1.28, 0.75, 0.9]]))
    assert pos.clipped.tolist() == [[False, True, False, False]]  # 1.5 > 1 + eps_high; 1.25 is inside
    neg = grpo_terms(logps, old, torch.tensor([-1.0]), mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(neg.losses, torch.tensor([[1.25, 1.5, 0.8, 0.9]]))  # -min(r*A, clip(r)*A)
    assert neg.clipped.tolist() == [[False, False, True, False]]  # 0.75 < 1 - eps_low
    ref = torch.log(torch.tensor([[1.0, 1.0, 1.0, 0.9]]))
    kl = grpo_terms(logps, old, torch.tensor([0.0]), mask, ref_logps=ref, kl_beta=0.1).kl
    r = torch.exp(ref - logps)
    torch.testing.assert_close(kl, r - torch.log(r) - 1)
    assert kl[0, 3] == 0 and (kl >= 0).all()
    masked = grpo_terms(logps, old, torch.tensor([2.0]), torch.tensor([[True, False, True, False]]))
    assert masked.losses[0, 1] == 0 and masked.losses[0, 3] == 0 and not masked.clipped[0, 1]


def test_grpo_loss_is_the_token_mean_policy_gradient():
    model, batch = tiny_model(), answer_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]], [2, 3])
    advantages = torch.tensor([1.5, -0.5])
    out = GRPOLoss()(model, RLBatch(batch, advantages))
    n = (batch.labels != IGNORE).sum()
    assert out.count == n == 4 + 1
    # On-policy the ratio is 1: the loss is -sum(A) over tokens, the gradient that of -A * log p.
    assert float(out.loss_sum.detach()) == pytest.approx(-(4 * 1.5 - 0.5), abs=1e-6)
    out.loss_sum.backward()
    grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logp = token_logprobs(model(batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    (-(advantages[:, None] * logp).sum()).backward()
    for a, p in zip(grad, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
    assert out.metrics["clip_fraction"] == (0.0, 5) and "kl" not in out.metrics  # no reference, no KL
    assert out.metrics["entropy"][0] / 5 == pytest.approx(math.log(256), rel=0.1)  # near-uniform tiny model


def test_grpo_kl_needs_the_reference_and_is_zero_against_itself():
    model, batch = tiny_model(), answer_batch([[5, 6, 7, 8]], [2])
    with pytest.raises(ValueError, match="ref_logps"):
        GRPOLoss(kl_beta=0.1)(model, RLBatch(batch, torch.tensor([1.0])))
    out = GRPOLoss(kl_beta=0.1)(model, RLBatch(batch, torch.tensor([1.0]), ref_logps=target_logprobs(model, batch)))
    assert out.metrics["kl"][0] == pytest.approx(0.0, abs=1e-6)
    # a frozen reference model gives the batch its log-probabilities; a moved policy has KL > 0
    reference = copy.deepcopy(model)
    loss = GRPOLoss(kl_beta=0.1, reference=reference)
    assert loss.frozen == {"reference": reference}
    assert loss(model, RLBatch(batch, torch.tensor([1.0]))).metrics["kl"][0] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    assert loss(model, RLBatch(batch, torch.tensor([1.0]))).metrics["kl"][0] > 1e-3


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 5, 2), (8, 3, 8), (4, 4, 2)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    expected = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_drop_easy_and_the_curriculum_window():
    kept, dropped = drop_easy(["a", "b", "c", "d"], [1.0, 0.2, 0.9, 0.5], threshold=0.8)
    assert kept == ["b", "d"] and dropped == 0.5
    kept, dropped = keep_window(["a", "b", "c", "d"], [1.0, 0.0, 0.25, 0.75])
    assert kept == ["c", "d"] and dropped == 0.5
    with pytest.raises(ValueError, match="one score per item"):
        drop_easy(["a"], [0.1, 0.2], 0.5)
    # keep: of what is not easy, only the hardest share of all items stays, in the items' order;
    # tuples rank by pass rate first, then by minus the answer loss (a higher loss is harder)
    items = ["a", "b", "c", "d", "e", "f"]
    easiness = [(0.0, -2.0), (0.0, -5.0), (1.0, -9.0), (0.25, -9.0), (0.0, -1.0), (0.0, -3.0)]
    kept, dropped = drop_easy(items, easiness, threshold=0.5, keep=0.5)
    assert kept == ["a", "b", "f"] and dropped == 0.5
    assert drop_easy(items, easiness, threshold=0.5, keep=1.0)[0] == ["a", "b", "d", "e", "f"]
    with pytest.raises(ValueError, match="keep must be in"):
        drop_easy(items, easiness, 0.5, keep=0.0)


def test_loss_difficulty_is_the_mean_answer_loss():
    model = tiny_model()
    batch = answer_batch([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]], [2, 3])
    scores = loss_difficulty(model, batch)
    logps = naive_logprobs(model, batch)
    expected = [-logps[0] / 4, -logps[1] / 1]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Rollouts on a tiny random chat model
# --------------------------------------------------------------------------------------------

from dataclasses import replace  # noqa: E402

from herd.chat import render_chat  # noqa: E402
from herd.data.images import ImageProcessor  # noqa: E402
from herd.tasks import Arithmetic, Score, get_task  # noqa: E402
from herd.train.difficulty import pass_rates  # noqa: E402
from herd.train.rollouts import completion_rows, sample_rollouts  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def chat_model(tok):
    config = tiny_config(tok, hidden_size=32)
    torch.manual_seed(0)
    return tok, Llama4(config).eval(), ImageProcessor.from_config(config.vision, max_tiles=1)


def test_completion_rows_mark_what_the_chat_renderer_marks(chat_model):
    tok = chat_model[0]
    for problem in get_task("arithmetic").problems("train", 4):
        prompt = render_chat(problem.messages(), tok, add_generation_prompt=True).ids
        full = render_chat(problem.messages(with_answer=True), tok)
        assert full.ids[:len(prompt)] == prompt
        batch, assistant = completion_rows([prompt], [full.ids[len(prompt):]], tok.pad_id)
        assert batch.input_ids[0].tolist() == full.ids and assistant[0].tolist() == full.loss_mask
        assert torch.equal(batch.labels, answer_rows([full], tok.pad_id).labels)


class Lucky(Arithmetic):
    """Marks an answer right iff the completion has an even number of characters: a checker whose
    verdicts vary, so that groups have something to compare."""

    def check(self, problem, completion, *, stopped=True):
        return Score(float(stopped), float(len(completion) % 2 == 0))


def test_rollouts_sample_groups_score_them_and_feed_grpo(chat_model):
    tok, model, processor = chat_model
    problems = get_task("arithmetic").problems("train", 2) + get_task("scenes").problems("train", 1)
    kwargs = dict(group_size=3, max_new_tokens=6, seed=0, image_processor=processor)
    rollouts = sample_rollouts(model, tok, problems, **kwargs)
    assert len(rollouts) == 9 and rollouts.batch.input_ids.shape[0] == 9
    assert rollouts.batch.pixel_values.shape[0] == 3 and rollouts.tiles_per_row.tolist() == [0] * 6 + [1] * 3
    for i in range(9):
        ids = rollouts.batch.input_ids[i][rollouts.assistant_mask[i]].tolist()
        assert len(ids) <= 6 and tok.patch_id not in ids
        assert rollouts.stopped[i] == (len(ids) > 0 and ids[-1] in (tok.eot_id, tok.eom_id, tok.end_of_text_id))
        targets = rollouts.batch.labels[i][rollouts.batch.labels[i] != IGNORE].tolist()
        assert targets == ids  # the completion, and only it, is the target
        problem = problems[i // 3]
        score = get_task(problem.task).check(problem, rollouts.completions[i], stopped=bool(rollouts.stopped[i]))
        assert (rollouts.format_rewards[i], rollouts.answer_rewards[i]) == (score.format, score.answer)
        assert rollouts.rewards[i] == pytest.approx(score.reward)
    again = sample_rollouts(model, tok, problems, **kwargs)
    assert again.completions == rollouts.completions  # seeded
    out = GRPOLoss()(model, rollouts.rl_batch())
    assert out.count == int(rollouts.assistant_mask.sum()) and torch.isfinite(out.loss_sum)
    assert set(rollouts.metrics()) >= {"reward", "accuracy", "zero_advantage_groups", "completion_tokens"}


def test_dynamic_filtering_keeps_groups_with_signal_and_their_images(chat_model):
    tok, model, processor = chat_model
    problems = get_task("arithmetic").problems("train", 2) + get_task("scenes").problems("train", 1)
    rollouts = sample_rollouts(model, tok, problems, group_size=3, max_new_tokens=4, seed=1,
                               image_processor=processor)
    rollouts = replace(rollouts, rewards=torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.1, 0.0]))
    keep = rollouts.informative()
    assert keep.tolist() == [False, False, True]
    assert (rollouts.advantages()[:6] == 0).all()  # all-equal groups carry no signal
    assert rollouts.metrics()["zero_advantage_groups"] == pytest.approx(2 / 3)
    kept = rollouts.select(keep)
    assert len(kept) == 3 and kept.problems == problems[2:] and kept.completions == rollouts.completions[6:]
    torch.testing.assert_close(kept.batch.pixel_values, rollouts.batch.pixel_values)  # the scene's tiles
    out = GRPOLoss()(model, kept.rl_batch())
    assert out.count == int(kept.assistant_mask.sum()) and torch.isfinite(out.loss_sum)
    text_only = rollouts.select(torch.tensor([True, False, False]))
    assert text_only.batch.pixel_values is None and len(text_only) == 3


def test_pass_rates_tag_problems_from_sampled_answers(chat_model):
    tok, model, _ = chat_model
    problems = get_task("arithmetic").problems("train", 3)
    rates = pass_rates(model, tok, problems, n=4, k=2, max_new_tokens=5, seed=3, tasks={"arithmetic": Lucky()})
    rollouts = sample_rollouts(model, tok, problems, group_size=4, max_new_tokens=5, seed=3,
                               tasks={"arithmetic": Lucky()})
    correct = [sum(len(c) % 2 == 0 for c in rollouts.completions[4 * g:4 * g + 4]) for g in range(3)]
    assert rates == [pass_at_k(4, c, 2) for c in correct]
    with pytest.raises(ValueError, match="group_size"):
        sample_rollouts(model, tok, problems, group_size=1, max_new_tokens=5)
    with pytest.raises(ValueError, match="image_processor"):
        sample_rollouts(model, tok, get_task("scenes").problems("train", 1), group_size=2, max_new_tokens=5)


def test_preference_pairs_from_the_policys_own_samples(chat_model):
    tok, model, processor = chat_model
    problems = get_task("scenes").problems("train", 1) + get_task("arithmetic").problems("train", 2)
    rollouts = sample_rollouts(model, tok, problems, group_size=3, max_new_tokens=5, seed=2,
                               image_processor=processor)
    # Group 0: row 1 right and tidy, rows 0 and 2 wrong; group 1: all right; group 2: right but untidy only.
    rollouts = replace(rollouts, answer_rewards=torch.tensor([0.0, 1, 0, 1, 1, 1, 1, 0, 0]),
                       format_rewards=torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1, 0]))
    rollouts = replace(rollouts, rewards=rollouts.answer_rewards + 0.1 * rollouts.format_rewards)
    assert rollouts.preference_pairs() == [(1, 2)]  # row 2 is wrong *and* untidy: the lowest reward
    prefs = rollouts.preference_batch([(1, 2)], reference=model)
    torch.testing.assert_close(prefs.batch.pixel_values, rollouts.batch.pixel_values[1:3])
    assert prefs.batch.input_ids.tolist() == rollouts.batch.input_ids[[1, 2]].tolist()
    out = DPOLoss()(model, prefs)
    assert float(out.loss_sum.detach()) == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference


def test_one_step_of_each_loss_moves_the_policy_the_right_way():
    """Signs: GRPO raises the log-probability of a positive-advantage completion and lowers a
    negative one's; DPO raises the chosen-minus-rejected margin."""
    model, batch = tiny_model(), answer_batch([[5, 6, 7, 8, 9], [5, 6, 11, 12, 13]], [2, 2])
    before = target_logprobs(model, batch).sum(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = GRPOLoss()(model, RLBatch(batch, torch.tensor([1.0, -1.0])))
    (out.loss_sum / out.count).backward()
    opt.step()
    after = target_logprobs(model, batch).sum(1)
    assert after[0] > before[0] and after[1] < before[1]

    model, batch = tiny_model(), preference_pairs()
    prefs = PreferenceBatch(batch, sequence_logprobs(model, batch))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = DPOLoss(beta=0.5)(model, prefs)
    (first.loss_sum / first.count).backward()
    opt.step()
    second = DPOLoss(beta=0.5)(model, prefs)
    assert second.metrics["reward_margin"][0] > 0 and float(second.loss_sum.detach()) < float(first.loss_sum.detach())


def test_rollouts_cut_at_stop_at_a_sampled_patch_id_and_at_the_limit(chat_model, monkeypatch):
    """With generate's output fixed: a reply that stops, one cut off at max_new_tokens, and one that
    samples <|patch|> (an image feature without a tile) and is cut before it."""
    import herd.train.rollouts as rollouts_module

    tok, model, _ = chat_model
    problem = get_task("arithmetic").problems("train", 1)[0]
    right = tok.encode(f"Answer: {problem.answer}")
    replies = [right + [tok.eot_id, tok.pad_id, tok.pad_id],  # stopped; generate pads after the stop
               (right * 3)[:len(right) + 3],  # never stopped
               right[:2] + [tok.patch_id] + right[2:4]]  # a <|patch|> id mid-reply
    width = max(map(len, replies))

    def fake_generate(model, input_ids, max_new_tokens, **kwargs):
        new = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in replies])
        return torch.cat([input_ids, new], 1)

    monkeypatch.setattr(rollouts_module, "generate", fake_generate)
    rollouts = sample_rollouts(model, tok, [problem], group_size=3, max_new_tokens=width)
    written = [rollouts.batch.input_ids[i][rollouts.assistant_mask[i]].tolist() for i in range(3)]
    assert written == [right + [tok.eot_id], replies[1], right[:2]]
    assert rollouts.stopped.tolist() == [True, False, False]
    assert rollouts.answer_rewards.tolist() == [1.0, 0.0, 0.0] and rollouts.format_rewards.tolist() == [1.0, 0.0, 0.0]
    out = GRPOLoss()(model, rollouts.rl_batch())  # no <|patch|> reaches the forward
    assert out.count == len(right) + 1 + len(replies[1]) + 2
