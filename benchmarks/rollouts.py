"""Rollout speed for online RL: the same rollouts sampled by the training model's own modules and
by a prepared inference copy (`prepare_for_decoding` on a deep copy, what the RL loop syncs every
N steps), and plain `generate` on the same prompts (no rendering, scoring or rows: what rollouts
add to decoding). All in one run; compare the ratios (CPU timings on a shared machine are noisy).

    python benchmarks/rollouts.py [--threads 1] [--prompts 16] [--group 4] [--new 32] [--repeats 3]

Model: the `tiny` preset's shapes (vision tower included) with a 2,000-rank tokenizer trained on
the stdlib, random weights. Prompts: half letter counting, half scene questions (one 64-pixel tile
each). Sampling at temperature 1 with a fixed seed, so both models produce the same tokens; a
random model rarely stops, so nearly every row runs to --new tokens. Tokens/s counts every sampled
completion token (prefill included in the time). Each setting keeps its best of --repeats rounds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

from herd.data.corpora import stdlib_texts
from herd.data.images import ImageProcessor
from herd.chat import render_chat
from herd.inference import generate, pad_prompts, prepare_for_decoding
from herd.model import Llama4
from herd.presets import tiny
from herd.tasks import get_task
from herd.tokenizer import train_tokenizer
from herd.train.rollouts import sample_rollouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tok = train_tokenizer([d.text for d in stdlib_texts("train", max_bytes=1_000_000)], num_bpe_ranks=2000)
    base = tiny()
    text = dataclasses.replace(base.text, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                               eos_token_id=tok.eot_id, pad_token_id=tok.pad_id)
    config = dataclasses.replace(base, text=text, image_token_index=tok.patch_id,
                                 boi_token_index=tok.image_start_id, eoi_token_index=tok.image_end_id)
    torch.manual_seed(0)
    model = Llama4(config).eval()
    fast = prepare_for_decoding(copy.deepcopy(model))
    processor = ImageProcessor.from_config(config.vision, max_tiles=1)
    half = args.prompts // 2
    problems = get_task("letters").problems("train", half) + get_task("scenes").problems("train", args.prompts - half)

    rendered = [render_chat(p.messages(), tok, add_generation_prompt=True, image_processor=processor)
                for p in problems]
    prompt_ids, attention = pad_prompts([r.ids for r in rendered for _ in range(args.group)], tok.pad_id)
    pixels = torch.cat([r.pixel_values for r in rendered for _ in range(args.group) if r.pixel_values is not None])
    stops = [tok.eot_id, tok.eom_id, tok.end_of_text_id]

    best: dict[str, float] = {}
    completions: dict[str, list[str]] = {}
    for round_ in range(args.repeats + 1):  # round 0 warms up, untimed
        start = time.perf_counter()
        with torch.no_grad():  # as sample_rollouts runs it
            out = generate(model, prompt_ids, args.new, temperature=1.0, top_p=1.0, stop_token_ids=stops,
                           pixel_values=pixels, attention_mask=attention, seed=0)
        seconds = time.perf_counter() - start
        tokens = int((out[:, prompt_ids.shape[1]:] != tok.pad_id).sum())  # after a stop, generate pads
        if round_:
            best["plain generate (no rollouts)"] = max(best.get("plain generate (no rollouts)", 0.0), tokens / seconds)
        for name, sampler in (("training model (as trained)", model), ("prepared inference copy", fast)):
            start = time.perf_counter()
            rollouts = sample_rollouts(sampler, tok, problems, group_size=args.group, max_new_tokens=args.new,
                                       seed=0, image_processor=processor)
            seconds = time.perf_counter() - start
            tokens = int(rollouts.assistant_mask.sum())
            completions[name] = rollouts.completions
            if round_:
                best[name] = max(best.get(name, 0.0), tokens / seconds)
    same = len({tuple(c) for c in completions.values()}) == 1  # the two rollout samplers
    rows = args.prompts * args.group
    print(f"{rows} rollouts ({args.prompts} prompts x {args.group}), up to {args.new} new tokens, "
          f"{args.threads} thread(s); same completions from both: {same}")
    plain = best["training model (as trained)"]
    for name, rate in best.items():
        print(f"  {name:30s} {rate:8.0f} tokens/s  ({rate / plain:.2f}x)")


if __name__ == "__main__":
    main()
