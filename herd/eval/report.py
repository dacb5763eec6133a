"""report.md of `herd eval`: one section per evaluation, each saying what it measures, with its
numbers and figures (built from results.json, so it can be rewritten without rerunning)."""

from __future__ import annotations

from pathlib import Path


def _perplexity(r: dict) -> list[str]:
    lines = ["## Perplexity and bits per byte", "",
             f"Whole documents, scored in windows of {r['window']} tokens (each token predicted once). Bits per "
             "byte divide the summed NLL by the documents' UTF-8 bytes, so they compare models with different "
             "tokenizers; perplexity is per token of this model's tokenizer.", "",
             "| text | bits/byte | perplexity | loss (nats/token) | documents | tokens |", "|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['bpb']:.3f} | {row['perplexity']:.2f} | {row['loss']:.3f} | {row['documents']} | "
                     f"{row['tokens']:,} |")
    return lines + [""]


def _position(r: dict, train_len: int, chunk: int | None) -> list[str]:
    fit = r["fit"]
    lines = ["## NLL by position", "",
             f"Cumulative average NLL of the token at position t over {r['files']} long held-out code files, to "
             f"{r['length']} tokens (training length {train_len}" + (f", RoPE chunk {chunk}" if chunk else "") + "). "
             "It should fall with position and flatten; a rise past the training length means the model is confused "
             "by context longer than it was trained on.", "",
             f"Power-law fit {fit['form']}: a = {fit['a']:.3f}, b = {fit['b']:.3f}, c = {fit['c']:.3f}, "
             f"R² = {fit['r2']:.4f}." + (" c lies at the edge of the search: the curve does not bend like a power "
                                         "law here, and the fit is in effect a line in ln t." if fit.get("c_at_bound") else ""),
             "",
             "![NLL by position](nll_by_position.png)", "",
             "| positions | mean NLL (nats) |", "|---|---|"]
    lines += [f"| {s['from']}-{s['to']} | {s['mean_nll']:.3f} |" for s in r["segments"]]
    return lines + [""]


def _needle(r: dict) -> list[str]:
    eff = r["effective_length"]
    lines = ["## Needle in a haystack", "",
             "A line `PASSKEY = <5 digits>` hidden at a depth of held-out code, the context ending in "
             "`assert PASSKEY == `. Exact match: greedy generation gives the value. Likelihood: the value outranks "
             f"{r['distractors']} random 5-digit distractors (chance {r['chance_top1']:.0%}). "
             f"{r['trials']} trial(s) per cell.", "",
             f"Effective length (the longest context at which, and at every shorter one, the mean over depths is at "
             f"least {eff['threshold']:.0%}): exact match **{eff['exact_match'] or 'none'}**, likelihood "
             f"**{eff['likelihood_top1'] or 'none'}** tokens.", "",
             "![needle](needle.png)", "",
             "| context length | exact match | likelihood top-1 | mean rank of the value |", "|---|---|---|---|"]
    for j, length in enumerate(r["lengths"]):
        col = lambda grid: sum(row[j] for row in grid) / len(grid)  # noqa: E731
        lines.append(f"| {length} | {col(r['exact_match']):.0%} | {col(r['likelihood_top1']):.0%} | "
                     f"{col(r['mean_rank']):.2f} of {r['distractors'] + 1} |")
    return lines + [""]


def _speed(r: dict) -> list[str]:
    return ["## Speed", "",
            f"herd's inference engine on {r['device']} ({r['threads']} threads, {r['dtype']}), batch {r['batch']}, "
            "best of the timed runs after a warm-up.", "",
            "| prefill | decode |", "|---|---|",
            f"| {r['prefill_tokens_per_s']:,.0f} tokens/s ({r['prompt_tokens']}-token prompt) | "
            f"{r['decode_tokens_per_s']:,.1f} tokens/s ({r['new_tokens']} tokens) |", ""]


def _tasks(r: dict) -> list[str]:
    kinds = r["kinds"]
    ks = sorted({k for kind in kinds.values() for k in kind if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    lines = ["## Verifiable tasks", "", "Held-out problems (the test split of herd.tasks, never trained on), asked as a "
             f"chat; sampled answers of at most {r['max_new_tokens']} tokens, each checked by its task's own checker "
             "(the last `Answer:` line must be right). pass@k is the unbiased estimator over the samples.", "",
             "| task | problems | samples | " + " | ".join(ks) + " |", "|---|---|---|" + "---|" * len(ks)]
    for name, kind in kinds.items():
        lines.append(f"| {name} | {kind['tasks']} | {kind['samples']} | "
                     + " | ".join(f"{kind[k]:.0%}" for k in ks) + " |")
    lines += [""] + [f"Not scored: {name}: {why}." for name, why in r["skipped"].items()]
    for name, kind in kinds.items():
        example = kind["examples"][0]
        lines += [f"An answer to {name} ({'right' if example['correct'] else 'wrong'}): "
                  f"`{example['completion'][:120]!r}`"]
    return lines + [""]


def write_report(out: Path, results: dict) -> Path:
    lines = [f"# herd eval: {results['model']}", "",
             f"{results['kind']} checkpoint, {results['params']:,} parameters; training length {results['train_len']} "
             f"tokens ({results['train_len_source']}); context {results['context']:,}; on {results['device']}.", ""]
    if "perplexity" in results:
        lines += _perplexity(results["perplexity"])
    if "position" in results:
        lines += _position(results["position"], results["train_len"], results["chunk_size"])
    if "needle" in results:
        lines += _needle(results["needle"])
    if "tasks" in results:
        lines += _tasks(results["tasks"])
    if "speed" in results:
        lines += _speed(results["speed"])
    for section, why in results.get("skipped", {}).items():
        lines += [f"Skipped {section}: {why}.", ""]
    lines += ["Time per section: " + ", ".join(f"{k} {v:.1f} s" for k, v in results["seconds"].items()), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
