"""STAND-IN for the continuous-batching engine (issue 13, item 1): the same interface, none of the speed.

The real `Engine` (built separately) shares one iRoPE cache between rows and decodes every running
row in one forward call; this stand-in gives each request its own `StaticKVCache` and runs the rows
one after another inside a step. It exists so that `herd serve` can be built and tested against the
interface before the real engine lands, and is replaced by it when the branches merge.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.attention import TokenLayout
from ..model.llama4 import Llama4, token_layout
from .cache import StaticKVCache
from .sampling import check_sampling, sample


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None  # a seed gives the same tokens whatever else is batched
    stop_token_ids: tuple[int, ...] | None = None  # None = the model config's eos ids
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    prompt_logprobs: bool = False  # logprob of each prompt token given those before (for echo)


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
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[float | None] | None  # set once, on the request's first output
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" when finished
    prompt_tokens: int


@dataclass
class _Row:
    request: Request
    cache: StaticKVCache | None = None
    generator: torch.Generator | None = None
    logits: torch.Tensor | None = None  # [1, V] for the next token
    produced: int = 0
    stops: frozenset = field(default_factory=frozenset)


class Engine:
    def __init__(self, model: Llama4, *, max_batch: int = 8, max_seq_len: int | None = None,
                 token_budget: int = 512, compile: bool = False):
        self.model, self.max_batch = model, max_batch
        self.max_seq_len = max_seq_len or model.config.text.max_position_embeddings
        eos = model.config.text.eos_token_id
        self.default_stops = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self.waiting: deque[Request] = deque()
        self.running: dict[str, _Row] = {}
        self.aborted: set[str] = set()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, request: Request) -> None:
        s = request.sampling
        check_sampling(s.temperature, s.top_p, s.top_k)
        if not request.prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(request.prompt_ids) + s.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({s.max_tokens}) exceeds "
                             f"the engine's max_seq_len ({self.max_seq_len})")
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs = []
        for request in [r for r in self.waiting if r.id in self.aborted]:
            self.waiting.remove(request)
            outputs.append(StepOutput(request.id, [], None, None, True, "abort", len(request.prompt_ids)))
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            self.running[request.id] = _Row(request)
        for rid, row in list(self.running.items()):
            n = len(row.request.prompt_ids)
            if rid in self.aborted:
                del self.running[rid]
                outputs.append(StepOutput(rid, [], None, None, True, "abort", n))
                continue
            prompt_logprobs = self._prefill(row) if row.cache is None else None
            s = row.request.sampling
            if s.max_tokens == 0:
                del self.running[rid]
                outputs.append(StepOutput(rid, [], None, prompt_logprobs, True, "length", n))
                continue
            token = int(sample(row.logits, s.temperature, s.top_p, s.top_k, row.generator)[0])
            logprobs = None
            if s.logprobs is not None:
                lp = row.logits[0].log_softmax(-1)
                top = lp.topk(s.logprobs) if s.logprobs else None
                logprobs = [TokenLogprob(token, float(lp[token]),
                                         [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))]
            row.produced += 1
            reason = "stop" if token in row.stops else "length" if row.produced == s.max_tokens else None
            if reason:
                del self.running[rid]
            else:
                pos = torch.tensor([[n + row.produced - 1]])
                row.logits = self._forward(row, torch.tensor([[token]]), TokenLayout(pos), None)[:, -1]
            outputs.append(StepOutput(rid, [token], logprobs, prompt_logprobs, reason is not None, reason, n))
        self.aborted -= {o.request_id for o in outputs if o.finish_reason == "abort"}
        return outputs

    def _prefill(self, row: _Row) -> list[float | None]:
        r, s = row.request, row.request.sampling
        ids = torch.tensor([r.prompt_ids])
        row.cache = StaticKVCache(self.model.config.text, 1, len(r.prompt_ids) + max(s.max_tokens, 1),
                                  dtype=self.model.dtype)
        row.generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        row.stops = frozenset(s.stop_token_ids) if s.stop_token_ids is not None else self.default_stops
        logits = self._forward(row, ids, token_layout(ids), r.pixel_values)  # [1, T, V]
        row.logits = logits[:, -1]
        if not s.prompt_logprobs:
            return None
        lp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        return [None] + lp.tolist()

    def _forward(self, row: _Row, ids, layout, pixel_values) -> torch.Tensor:
        keep = None if row.request.sampling.prompt_logprobs and row.cache.length == 0 else 1
        h = self.model.embed(ids, pixel_values)
        return self.model(inputs_embeds=h, layout=layout, cache=row.cache, logits_to_keep=keep).logits.float()
