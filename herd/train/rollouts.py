"""Rollouts for online RL: G sampled completions per prompt, scored by the tasks' checkers, laid
out as rows the GRPO loss reads.

    rollouts = sample_rollouts(policy, tokenizer, problems, group_size=8, max_new_tokens=64)
    keep = rollouts.informative()             # groups whose rewards are not all equal
    loss_fn(model, rollouts.select(keep).rl_batch())

Generation is herd's batched, cached `generate` (herd.inference); the model that samples may be
the policy itself or a prepared inference copy (`prepare_for_decoding` on a copy whose weights are
synced from the policy; faster at batch 1, not yet for batched rollouts: docs/post-training.md).
The prompt is rendered by the chat renderer with the generation prompt; the completion is kept as
the sampled ids (re-encoding its text could give other ids than the ones whose probabilities the
policy gave), up to and including the stop token (`<|eot|>`, `<|eom|>` or `<|end_of_text|>`). Those
ids are what the assistant wrote, so they are the assistant mask, as the renderer would mark them
(tested against `render_chat`). A completion cut off at `max_new_tokens` has no stop token and gets
no format reward. A sampled `<|patch|>` id (an untrained model may emit one) would claim an image
feature in the training forward that has no tile, so the completion is cut just before it (possibly
to nothing) and counts as cut off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..chat import parse_assistant, render_chat
from ..inference import generate, pad_prompts
from ..tasks import Problem, Score, Task, get_task
from .losses import IGNORE, Batch
from .post_losses import PreferenceBatch, RLBatch, group_advantages, informative_groups, sequence_logprobs

if TYPE_CHECKING:
    from ..data.images import ImageProcessor
    from ..tokenizer import Tokenizer


@dataclass
class Rollouts:
    batch: Batch  # [B, T] prompt + completion rows, right-padded; labels = the completion's ids
    assistant_mask: torch.Tensor  # [B, T] bool: ids the assistant wrote (completion and its stop)
    group_size: int  # G; rows g*G .. g*G + G - 1 answer problems[g]
    problems: list[Problem]  # [N] one per group
    completions: list[str]  # [B] the replies' text
    stopped: torch.Tensor  # [B] bool: ended with a stop token (not cut off)
    format_rewards: torch.Tensor  # [B]
    answer_rewards: torch.Tensor  # [B]
    rewards: torch.Tensor  # [B] what RL maximises (Score.reward)
    tiles_per_row: torch.Tensor  # [B] image tiles of each row, in batch.pixel_values' order

    def __len__(self) -> int:
        return len(self.completions)

    def grouped(self, values: torch.Tensor) -> torch.Tensor:
        """[B] -> [N, G]."""
        return values.view(-1, self.group_size)

    def advantages(self, scale: bool = True) -> torch.Tensor:
        """[B] group-relative advantages of the rewards."""
        return group_advantages(self.grouped(self.rewards), scale=scale).flatten()

    def informative(self) -> torch.Tensor:
        """[N] groups whose rewards are not all equal (the others have zero advantage)."""
        return informative_groups(self.grouped(self.rewards))

    def rows(self, index: Sequence[int]) -> Batch:
        """Rows `index` of the batch (any order), with their image tiles."""
        b, idx = self.batch, torch.as_tensor(list(index), dtype=torch.long)
        pixels = None
        if b.pixel_values is not None:  # each row's tiles, in the order of the chosen rows
            first = torch.cumsum(self.tiles_per_row, 0) - self.tiles_per_row
            tiles = [torch.arange(first[i], first[i] + self.tiles_per_row[i]) for i in idx.tolist()]
            tiles = torch.cat(tiles) if tiles else torch.zeros(0, dtype=torch.long)
            pixels = b.pixel_values[tiles] if len(tiles) else None
        return Batch(b.input_ids[idx], b.labels[idx], pixel_values=pixels, attention_mask=b.attention_mask[idx])

    def select(self, keep: torch.Tensor) -> "Rollouts":
        """Only the groups where `keep` [N] is True (dynamic filtering)."""
        rows = keep.repeat_interleave(self.group_size)
        index = rows.nonzero().flatten().tolist()
        return Rollouts(self.rows(index), self.assistant_mask[rows], self.group_size,
                        [p for p, k in zip(self.problems, keep.tolist()) if k], [self.completions[i] for i in index],
                        self.stopped[rows], self.format_rewards[rows], self.answer_rewards[rows], self.rewards[rows],
                        self.tiles_per_row[rows])

    def preference_pairs(self) -> list[tuple[int, int]]:
        """(chosen, rejected) rows for DPO from the policy's own samples, at most one pair a group:
        chosen is right and well-formed (the shortest such), rejected is wrong, ill-formed or cut
        off (the lowest reward, the longest among equals). Groups without both give none."""
        lengths = self.assistant_mask.sum(1).tolist()
        pairs = []
        for g in range(len(self.problems)):
            rows = range(g * self.group_size, (g + 1) * self.group_size)
            good = [i for i in rows if self.answer_rewards[i] == 1 and self.format_rewards[i] == 1]
            bad = [i for i in rows if self.answer_rewards[i] == 0 or self.format_rewards[i] == 0]
            if good and bad:
                pairs.append((min(good, key=lambda i: lengths[i]),
                              min(bad, key=lambda i: (float(self.rewards[i]), -lengths[i]))))
        return pairs

    def preference_batch(self, pairs: Sequence[tuple[int, int]], reference: nn.Module) -> PreferenceBatch:
        """The pairs' rows (chosen first) with the frozen reference's log-probabilities."""
        batch = self.rows([c for c, _ in pairs] + [r for _, r in pairs])
        return PreferenceBatch(batch, sequence_logprobs(reference, batch))

    def rl_batch(self, *, scale: bool = True, ref_logps: torch.Tensor | None = None) -> RLBatch:
        return RLBatch(self.batch, self.advantages(scale), ref_logps=ref_logps)

    def metrics(self) -> dict[str, float]:
        lengths = self.assistant_mask.sum(1).float()
        return {"reward": float(self.rewards.mean()), "accuracy": float(self.answer_rewards.mean()),
                "format": float(self.format_rewards.mean()), "stopped": float(self.stopped.float().mean()),
                "completion_tokens": float(lengths.mean()),
                "zero_advantage_groups": float(1 - self.informative().float().mean())}


def concat_rollouts(parts: Sequence[Rollouts], pad_id: int) -> Rollouts:
    """Rollouts of the same group size as one: rows right-padded to the longest, tiles in row order."""
    if not parts or len({r.group_size for r in parts}) != 1:
        raise ValueError("concat_rollouts needs at least one Rollouts, all with the same group_size")
    T = max(r.batch.input_ids.shape[1] for r in parts)

    def cat(get, fill):
        rows = [get(r) for r in parts]
        out = torch.full((sum(len(x) for x in rows), T), fill, dtype=rows[0].dtype)
        start = 0
        for x in rows:
            out[start:start + len(x), :x.shape[1]] = x
            start += len(x)
        return out

    tiles = [r.batch.pixel_values for r in parts if r.batch.pixel_values is not None]
    batch = Batch(cat(lambda r: r.batch.input_ids, pad_id), cat(lambda r: r.batch.labels, IGNORE),
                  pixel_values=torch.cat(tiles) if tiles else None, attention_mask=cat(lambda r: r.batch.attention_mask, 0))
    joined = lambda name: torch.cat([getattr(r, name) for r in parts])  # noqa: E731
    return Rollouts(batch, cat(lambda r: r.assistant_mask, False), parts[0].group_size,
                    [p for r in parts for p in r.problems], [c for r in parts for c in r.completions],
                    joined("stopped"), joined("format_rewards"), joined("answer_rewards"), joined("rewards"),
                    joined("tiles_per_row"))


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                    ) -> tuple[Batch, torch.Tensor]:
    """Right-padded prompt + completion rows: (Batch with labels on the completion ids, assistant
    mask [B, T]). labels[t] = ids[t + 1] where ids[t + 1] belongs to the completion."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    B = len(prompts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros(B, T, dtype=torch.long)
    assistant = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n, m = len(p), len(c)
        ids[i, :n + m] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention[i, :n + m] = 1
        assistant[i, n:n + m] = True
        labels[i, n - 1:n + m - 1] = ids[i, n:n + m]
    return Batch(ids, labels, attention_mask=attention), assistant


@torch.no_grad()
def sample_rollouts(model: nn.Module, tokenizer: "Tokenizer", problems: Sequence[Problem], *, group_size: int,
                    max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                    image_processor: "ImageProcessor | None" = None, tasks: Mapping[str, Task] | None = None
                    ) -> Rollouts:
    """`group_size` completions of each problem sampled from `model`, scored by the problems' tasks
    (`tasks` overrides the default instance of a task by name)."""
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 (advantages are relative to the group), got {group_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if any(p.image is not None for p in problems) and image_processor is None:
        raise ValueError("these problems show images: pass image_processor=ImageProcessor.from_config(config.vision)")
    tasks = dict(tasks or {})
    for p in problems:
        if p.task not in tasks:
            tasks[p.task] = get_task(p.task)
    rendered = [render_chat(p.messages(), tokenizer, add_generation_prompt=True, image_processor=image_processor)
                for p in problems]
    prompts = [r.ids for r in rendered for _ in range(group_size)]
    tiles = [r.pixel_values for r in rendered for _ in range(group_size) if r.pixel_values is not None]
    pixels = torch.cat(tiles) if tiles else None
    tiles_per_row = torch.tensor([0 if r.pixel_values is None else len(r.pixel_values)
                                  for r in rendered for _ in range(group_size)])
    input_ids, attention = pad_prompts(prompts, tokenizer.pad_id)
    stops = [tokenizer.eot_id, tokenizer.eom_id, tokenizer.end_of_text_id]
    out = generate(model, input_ids, max_new_tokens, temperature=temperature, top_p=top_p, stop_token_ids=stops,
                   pixel_values=pixels, attention_mask=attention, seed=seed)
    new = out[:, input_ids.shape[1]:].cpu().tolist()

    patch_id = model.config.image_token_index
    completions, texts, stopped, scores = [], [], [], []
    for row, ids in enumerate(new):
        cut = next((k for k, t in enumerate(ids) if t in stops or t == patch_id), None)
        if cut is not None and ids[cut] == patch_id:
            ids, cut = ids[:cut], None  # may leave nothing: a row without targets
        else:
            ids = ids if cut is None else ids[:cut + 1]  # after a stop, generate fills with pad
        reply = parse_assistant(ids, tokenizer)
        problem = problems[row // group_size]
        completions.append(ids)
        texts.append(reply.content)
        stopped.append(cut is not None)
        scores.append(tasks[problem.task].check(problem, reply.content, stopped=cut is not None))
    batch, assistant = completion_rows(prompts, completions, tokenizer.pad_id)
    batch.pixel_values = pixels
    return Rollouts(batch, assistant, group_size, list(problems), texts, torch.tensor(stopped),
                    torch.tensor([s.format for s in scores]), torch.tensor([s.answer for s in scores]),
                    torch.tensor([s.reward for s in scores]), tiles_per_row)


@torch.no_grad()
def task_scores(model: nn.Module, tokenizer: "Tokenizer", problems: Sequence[Problem], *, max_new_tokens: int,
                image_processor: "ImageProcessor | None" = None, batch_size: int = 32) -> list[Score]:
    """The checkers' score of a greedy answer to each problem."""
    stops = [tokenizer.eot_id, tokenizer.eom_id, tokenizer.end_of_text_id]
    scores = []
    was_training = model.training
    model.eval()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        rendered = [render_chat(p.messages(), tokenizer, add_generation_prompt=True, image_processor=image_processor)
                    for p in chunk]
        tiles = [r.pixel_values for r in rendered if r.pixel_values is not None]
        input_ids, attention = pad_prompts([r.ids for r in rendered], tokenizer.pad_id)
        out = generate(model, input_ids, max_new_tokens, temperature=0.0, stop_token_ids=stops,
                       pixel_values=torch.cat(tiles) if tiles else None, attention_mask=attention)
        for p, ids in zip(chunk, out[:, input_ids.shape[1]:].tolist()):
            cut = next((k for k, t in enumerate(ids) if t in stops), None)
            reply = parse_assistant(ids if cut is None else ids[:cut + 1], tokenizer)
            scores.append(get_task(p.task).check(p, reply.content, stopped=cut is not None))
    model.train(was_training)
    return scores


def sampled_scores(model: nn.Module, tokenizer: "Tokenizer", problems: Sequence[Problem], *, samples: int,
                   max_new_tokens: int, temperature: float, seed: int = 0,
                   image_processor: "ImageProcessor | None" = None) -> list[Score]:
    """The checkers' scores of `samples` sampled answers to each problem, problem by problem (how a
    chat model is used: the response quality DPO's pairs target)."""
    was_training = model.training
    model.eval()
    rollouts = sample_rollouts(model, tokenizer, problems, group_size=samples, max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=seed, image_processor=image_processor)
    model.train(was_training)
    return [Score(format=f, answer=a) for f, a in zip(rollouts.format_rewards.tolist(),
                                                      rollouts.answer_rewards.tolist())]


def accuracy_by_task(problems: Sequence[Problem], scores: Sequence[Score], suffix: str = "") -> dict[str, float]:
    """{task + suffix: accuracy} plus {task + suffix + "_format": share well-formed and stopped}, the
    held-out measure every post-training stage reports. `scores` may hold several per problem, in
    order (`sampled_scores`)."""
    right: dict[str, list[float]] = {}
    tidy: dict[str, list[float]] = {}
    per_problem = len(scores) // max(len(problems), 1)
    if per_problem * len(problems) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(problems)} problems; give the same number for each")
    for i, score in enumerate(scores):
        task = problems[i // per_problem].task
        right.setdefault(task, []).append(score.answer)
        tidy.setdefault(task, []).append(score.format)
    return {**{f"{t}{suffix}": sum(v) / len(v) for t, v in right.items()},
            **{f"{t}{suffix}_format": sum(v) / len(v) for t, v in tidy.items()}}


def task_accuracy(model: nn.Module, tokenizer: "Tokenizer", problems: Sequence[Problem], *, max_new_tokens: int,
                  image_processor: "ImageProcessor | None" = None, batch_size: int = 32) -> dict[str, float]:
    """Greedy answers to `problems`, scored by their tasks' checkers: `accuracy_by_task`."""
    return accuracy_by_task(problems, task_scores(model, tokenizer, problems, max_new_tokens=max_new_tokens,
                                                  image_processor=image_processor, batch_size=batch_size))


def dpo_pairs(rollouts: Rollouts, tokenizer: "Tokenizer", image_processor: "ImageProcessor | None" = None
              ) -> tuple[list[tuple], float]:
    """Preference pairs from the policy's own graded samples, as (prompt ids, chosen ids, rejected ids,
    image tiles or None). A group with a right, well-formed sample and a wrong or ill-formed one gives
    those (`Rollouts.preference_pairs`); a group where no sample is right pairs the problem's worked
    answer with its worst sample. Returns (pairs, share of pairs whose chosen answer is the policy's own)."""
    lengths = rollouts.assistant_mask.sum(1).tolist()
    own = {c // rollouts.group_size: (c, r) for c, r in rollouts.preference_pairs()}
    first_tile = (torch.cumsum(rollouts.tiles_per_row, 0) - rollouts.tiles_per_row).tolist()
    pairs, n_own = [], 0
    for g, problem in enumerate(rollouts.problems):
        rows = range(g * rollouts.group_size, (g + 1) * rollouts.group_size)
        prompt = render_chat(problem.messages(), tokenizer, add_generation_prompt=True, image_processor=image_processor)
        completion = lambda i: rollouts.batch.input_ids[i][rollouts.assistant_mask[i]].tolist()  # noqa: E731
        if g in own:
            chosen, rejected = own[g]
            chosen_ids = completion(chosen)
            n_own += 1
        elif all(rollouts.answer_rewards[i] == 0 for i in rows):
            full = render_chat(problem.messages(with_answer=True), tokenizer, image_processor=image_processor)
            chosen_ids = full.ids[len(prompt.ids):]
            rejected = min(rows, key=lambda i: (float(rollouts.rewards[i]), -lengths[i]))
        else:
            continue  # every sample right: nothing to prefer
        tiles = None
        if rollouts.batch.pixel_values is not None and rollouts.tiles_per_row[rejected] > 0:
            start = first_tile[rejected]
            tiles = rollouts.batch.pixel_values[start:start + int(rollouts.tiles_per_row[rejected])]
        pairs.append((prompt.ids, chosen_ids, completion(rejected), tiles))
    return pairs, n_own / max(len(pairs), 1)


def preference_rows(pairs: Sequence[tuple], pad_id: int) -> PreferenceBatch:
    """`dpo_pairs` output as one PreferenceBatch: the chosen rows, then the rejected rows."""
    prompts = [p for p, _, _, _ in pairs] * 2
    completions = [c for _, c, _, _ in pairs] + [r for _, _, r, _ in pairs]
    batch, _ = completion_rows(prompts, completions, pad_id)
    tiles = [t for _, _, _, t in pairs if t is not None] * 2
    batch.pixel_values = torch.cat(tiles) if tiles else None
    return PreferenceBatch(batch)
