"""The continuous-batching engine: requests join and leave a running batch, one step at a time.

    engine = Engine(model, max_batch=8, token_budget=512)
    engine.add(Request("a", prompt_ids, SamplingParams(max_tokens=64, temperature=0.6, seed=1)))
    while engine.has_unfinished():
        for out in engine.step():          # StepOutput: new tokens, logprobs, finished?
            ...

The KV cache (herd.inference.cache) has `max_batch` rows, each holding one sequence at its own
length. A step:
1. drops aborted requests, freeing their rows;
2. decodes every running row that has a token to feed, in one forward call of one token per row
   over rows 0..n-1 (n = the highest such row + 1). Rows in that range that are free or still
   prefilling ride along as idle rows: they write at their own next slot with document EMPTY, which
   no real query sees and which their next token overwrites, so the call needs no gather of the
   cache (copying a long cache each step would cost more than the idle rows' compute);
3. admits waiting requests into free rows (lowest first; rows that finished in step 2 included): the
   row is emptied (its slots marked EMPTY, which the visibility rule hides, so nothing is zeroed)
   and an image request's tiles are encoded, once, into its prompt embeddings;
4. prefills waiting prompt pieces, oldest request first, one forward call per piece, within
   `token_budget` tokens for the whole step (each decoding row counts one). The budget bounds the
   work, and so the latency, of a step when a long prompt arrives while others decode; a prompt
   longer than the budget is prefilled over several steps. The piece that completes a prompt gives
   its first token.
Every row samples with its own parameters and its own `torch.Generator`, so a seeded request gets
the same tokens whatever else is batched. `generate` and `generate_stream` (herd.inference.engine)
run on this engine; `compile=True` runs step 2 as a compiled graph (herd.inference.compiled), with
the batch and cache sizes rounded up to powers of two so that few graphs are compiled.

The engine is synchronous and not thread-safe: one thread owns it. Stop *strings* and
detokenization are the caller's (text-level); the engine stops on token ids and token limits.
Logprobs are those of the model's distribution (log-softmax of the raw logits, before temperature
and filtering), the convention of vLLM's default and of scoring with `echo`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.llama4 import Llama4
from .cache import EMPTY, StaticKVCache
from .compiled import check_compilable, compiled_step
from .sampling import check_sampling, sample_rows


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None  # a seed gives the same tokens whatever else is batched
    stop_token_ids: tuple[int, ...] | None = None  # None = the model config's eos ids
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    prompt_logprobs: bool = False  # logprob of each prompt token given those before, and the top 1 (for echo)


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    pixel_values: torch.Tensor | None = None  # image tiles for the image tokens in prompt_ids, in order


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top `logprobs` (token id, logprob), best first


@dataclass
class StepOutput:
    request_id: str
    token_ids: list[int]  # tokens produced for this request by this step (0 or more; a stop token included)
    logprobs: list[TokenLogprob] | None
    # set once, on the request's first output (None for token 0); `top` holds the most likely token
    prompt_logprobs: list[TokenLogprob | None] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished
    prompt_tokens: int


@dataclass
class _Sequence:
    """A request admitted into a row."""

    request: Request
    row: int
    order: int  # admission order: older prompts are prefilled first
    prompt: torch.Tensor  # [T] on the model's device
    embeds: torch.Tensor | None  # [T, D] prompt embeddings with image features, when it has images
    stops: frozenset[int]
    generator: torch.Generator | None
    prefilled: int = 0  # prompt tokens in the cache
    tokens: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    reported: bool = False  # has the first output (with prompt_logprobs) gone out?

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prompt.numel()


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Engine:
    """Continuous batching over `max_batch` cache rows (see the module docstring).

    max_seq_len bounds prompt + generated tokens per request (default: the model's
    max_position_embeddings); the global layers' buffers grow to it on demand. token_budget bounds
    the tokens one step computes (decoding rows + prompt pieces; it must exceed max_batch).
    prefill_chunk (default: token_budget) bounds one prompt piece, and so a piece's activations.
    """

    def __init__(self, model: Llama4, *, max_batch: int = 8, max_seq_len: int | None = None,
                 token_budget: int = 512, compile: bool = False, prefill_chunk: int | None = None):
        text = model.config.text
        max_seq_len = text.max_position_embeddings if max_seq_len is None else max_seq_len
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("token_budget", token_budget)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if token_budget <= max_batch:
            raise ValueError(f"token_budget ({token_budget}) must exceed max_batch ({max_batch}): every running "
                             "row decodes one token a step, and the rest of the budget prefills prompts")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive integer or None, got {prefill_chunk!r}")
        if compile:
            check_compilable(model)
        self.model, self.compile = model, compile
        self.max_batch, self.max_seq_len, self.token_budget = max_batch, max_seq_len, token_budget
        self.prefill_chunk = prefill_chunk or token_budget
        self.device = model.device
        eos = text.eos_token_id
        self.default_stops = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.cache = StaticKVCache(text, max_batch, max_seq_len, dtype=model.dtype, device=self.device,
                                   capacity=self._capacity_for(1))
        self.rows: list[_Sequence | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self._ids: set[str] = set()  # waiting or running
        self._aborts: set[str] = set()
        self._admitted = 0

    # ---------------------------------------------------------------- public API
    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.rows)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._ids)

    def add(self, request: Request) -> None:
        """Queues a request; ValueError (naming the problem) if it is malformed or can never fit."""
        self._check(request)
        self._ids.add(request.id)
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Frees the request's row at the next step, which reports it finished with reason "abort".
        Unknown or already finished ids are ignored (a request may finish before its abort lands)."""
        if request_id in self._ids:
            self._aborts.add(request_id)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One engine step (module docstring); returns the outputs of requests with news."""
        outputs: list[StepOutput] = []
        self._drop_aborted(outputs)
        decoding = [s for s in self.rows if s is not None and s.decoding]
        if decoding:
            self._decode(decoding, outputs)
        self._admit()
        budget = self.token_budget - len(decoding)
        for seq in sorted((s for s in self.rows if s is not None and not s.decoding), key=lambda s: s.order):
            if budget <= 0:
                break
            n = min(seq.prompt.numel() - seq.prefilled, budget, self.prefill_chunk)
            budget -= n
            self._prefill(seq, n, outputs)
        return outputs

    # ---------------------------------------------------------------- checks and admission
    def _check(self, request: Request):
        if not isinstance(request, Request):
            raise TypeError(f"Engine.add takes a Request, got {type(request).__name__}")
        if request.id in self._ids:
            raise ValueError(f"request id {request.id!r} is already waiting or running; ids must be unique")
        text, sp = self.model.config.text, request.sampling
        ids = request.prompt_ids
        if not ids or not all(isinstance(i, int) and 0 <= i < text.vocab_size for i in ids):
            raise ValueError(f"prompt_ids must be a non-empty list of token ids in [0, {text.vocab_size})")
        check_sampling(sp.temperature, sp.top_p, sp.top_k)
        if not isinstance(sp.max_tokens, int) or sp.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {sp.max_tokens!r}")
        if sp.logprobs is not None and (not isinstance(sp.logprobs, int) or not 0 <= sp.logprobs <= text.vocab_size):
            raise ValueError(f"logprobs must be None or an integer in [0, {text.vocab_size}], got {sp.logprobs!r}")
        if sp.seed is not None and not isinstance(sp.seed, int):
            raise ValueError(f"seed must be an integer or None, got {sp.seed!r}")
        T, limit = len(ids), text.max_position_embeddings
        if T + sp.max_tokens > limit:
            raise ValueError(f"prompt ({T} tokens) + max_tokens ({sp.max_tokens}) exceeds the model's context "
                             f"(config.text.max_position_embeddings = {limit}); shorten the prompt or lower max_tokens")
        if T + max(sp.max_tokens - 1, 0) > self.max_seq_len:  # the last token is never fed back
            raise ValueError(f"prompt ({T} tokens) + max_tokens ({sp.max_tokens}) exceeds the engine's max_seq_len "
                             f"({self.max_seq_len}); shorten the prompt, lower max_tokens or raise max_seq_len")
        if request.pixel_values is not None:
            if self.model.vision is None:
                raise ValueError("pixel_values given, but this model has no vision tower (a text-only checkpoint); "
                                 "drop the image or load a multimodal (Llama4ForConditionalGeneration) checkpoint")
            vision, pixels = self.model.config.vision, request.pixel_values
            tile = (vision.num_channels, vision.image_size, vision.image_size)
            if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or tuple(pixels.shape[1:]) != tile:
                shape = list(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
                raise ValueError(f"pixel_values must be a tensor [tiles, {', '.join(map(str, tile))}] (this model's "
                                 f"tiles), got {shape}; make them with the model's image processor")
            per_tile = vision.tokens_per_tile
            patches, tiles = ids.count(self.model.config.image_token_index), pixels.shape[0]
            if patches != tiles * per_tile:
                raise ValueError(f"image tokens and image features do not match: the prompt holds {patches} "
                                 f"<|patch|> tokens but pixel_values give {tiles} tiles x {per_tile} per tile; "
                                 "build the prompt and the tiles with the same image processor")

    def _drop_aborted(self, outputs: list[StepOutput]):
        if not self._aborts:
            return
        for request in [r for r in self.waiting if r.id in self._aborts]:
            self.waiting.remove(request)
            self._ids.discard(request.id)
            outputs.append(StepOutput(request.id, [], None, None, True, "abort", len(request.prompt_ids)))
        for seq in [s for s in self.rows if s is not None and s.request.id in self._aborts]:
            outputs.append(self._output(seq, [], None, "abort"))
            self._free(seq)
        self._aborts.clear()

    def _admit(self):
        model = self.model
        for row in range(self.max_batch):
            if not self.waiting:
                return
            if self.rows[row] is not None:
                continue
            request = self.waiting.popleft()
            sp = request.sampling
            prompt = torch.tensor(request.prompt_ids, dtype=torch.long, device=self.device)
            embeds = None
            if request.pixel_values is not None:  # tiles encoded once; pieces take slices
                embeds = model.embed(prompt[None], request.pixel_values.to(self.device))[0]
            generator = None
            if sp.seed is not None:  # any integer: torch takes seeds modulo 2**64
                generator = torch.Generator(self.device).manual_seed(sp.seed % 2**64)
            stops = self.default_stops if sp.stop_token_ids is None else frozenset(sp.stop_token_ids)
            self.rows[row] = _Sequence(request, row, self._admitted, prompt, embeds, stops, generator,
                                       prompt_logprobs=[None] if sp.prompt_logprobs else None)
            self._admitted += 1

    def _free(self, seq: _Sequence):
        self.rows[seq.row] = None
        self.cache.reset(seq.row)
        self._ids.discard(seq.request.id)

    def _capacity_for(self, tokens: int) -> int:
        """Global buffers grow in powers of two (a compiled step is compiled per capacity)."""
        return min(_pow2(max(tokens, 256 if self.compile else 64)), self.max_seq_len)

    # ---------------------------------------------------------------- the forward calls
    def _decode(self, seqs: list[_Sequence], outputs: list[StepOutput]):
        """One token for every row in `seqs`, in one call over rows 0..n-1 (idle rows ride along)."""
        n = max(s.row for s in seqs) + 1
        if self.compile:
            n = min(_pow2(n), self.max_batch)
        lengths = self.cache.lengths[:n]
        self.cache.reserve(self._capacity_for(max(lengths) + 1))
        tokens = torch.zeros(n, dtype=torch.long)
        documents = torch.full((n,), EMPTY, dtype=torch.long)
        for s in seqs:
            tokens[s.row], documents[s.row] = s.tokens[-1], 0
        tokens, documents = tokens.to(self.device), documents.to(self.device)
        positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
        if self.compile:
            logits = compiled_step(self.model, self.cache, tokens, positions, documents)
        else:
            step = self.cache.step(positions, documents, end=max(lengths) + 1)
            out = self.model(input_ids=tokens[:, None], layout=step.layout, cache=step, logits_to_keep=1)
            logits = out.logits[:, -1].float()
        for s in seqs:
            self.cache.lengths[s.row] += 1
        self._next_tokens(seqs, logits[[s.row for s in seqs]], outputs)

    def _prefill(self, seq: _Sequence, n: int, outputs: list[StepOutput]):
        """The next n prompt tokens of `seq`; the piece that completes the prompt gives its first token."""
        a, b, T = seq.prefilled, seq.prefilled + n, seq.prompt.numel()
        self.cache.reserve(self._capacity_for(b))
        piece = self.cache.piece(seq.row, n)
        h = seq.embeds[a:b][None] if seq.embeds is not None else self.model.embed_tokens(seq.prompt[a:b][None])
        all_logits = seq.prompt_logprobs is not None
        logits = self.model(inputs_embeds=h, layout=piece.layout, cache=piece,
                            logits_to_keep=None if all_logits else 1).logits[0].float()  # [n or 1, V]
        if all_logits:  # position i predicts prompt token i + 1
            targets = seq.prompt[a + 1:b + 1]
            lp = logits[:targets.numel()].log_softmax(-1)
            chosen, best = lp.gather(-1, targets[:, None])[:, 0], lp.max(-1)
            seq.prompt_logprobs += [TokenLogprob(t, c, [(i, v)]) for t, c, i, v in zip(
                targets.tolist(), chosen.tolist(), best.indices.tolist(), best.values.tolist())]
        seq.prefilled = b
        if b < T:
            return
        if seq.request.sampling.max_tokens == 0:
            outputs.append(self._output(seq, [], None, "length"))
            self._free(seq)
            return
        self._next_tokens([seq], logits[-1:], outputs)

    # ---------------------------------------------------------------- tokens and outputs
    def _next_tokens(self, seqs: list[_Sequence], logits: torch.Tensor, outputs: list[StepOutput]):
        """Samples each seq's next token from its row of logits [len(seqs), V], with its own
        parameters and generator, in one call for the batch (herd.inference.sampling)."""
        params = [s.request.sampling for s in seqs]
        tokens = sample_rows(logits, [(sp.temperature, sp.top_p, sp.top_k) for sp in params],
                             [s.generator for s in seqs]).tolist()
        for seq, sp, row, token in zip(seqs, params, logits, tokens):
            seq.tokens.append(token)
            logprobs = None
            if sp.logprobs is not None:
                lp = row.log_softmax(-1)
                top = torch.topk(lp, sp.logprobs) if sp.logprobs else None
                best = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
                logprobs = [TokenLogprob(token, float(lp[token]), best)]
            reason = "stop" if token in seq.stops else "length" if len(seq.tokens) >= sp.max_tokens else None
            outputs.append(self._output(seq, [token], logprobs, reason))
            if reason is not None:
                self._free(seq)

    def _output(self, seq: _Sequence, tokens: list[int], logprobs, reason: str | None) -> StepOutput:
        prompt_logprobs = None
        if not seq.reported:
            seq.reported, prompt_logprobs = True, seq.prompt_logprobs
        return StepOutput(seq.request.id, tokens, logprobs, prompt_logprobs, reason is not None, reason,
                          seq.prompt.numel())
