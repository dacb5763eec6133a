"""A `herd` model type for lm-evaluation-harness (`pip install herd[eval]`).

lm-eval asks a model for three things; each is one forward pass of the plain herd model:
- loglikelihood(context, continuation): the summed log-probability of the continuation's tokens
  and whether greedy decoding would produce them. lm-eval's `TemplateLM` splits the text into
  tokens (context + continuation encoded together, the context's tokens cut off), as it does for
  its `hf` and `local-completions` models, so the three see the same tokens and can be compared.
- loglikelihood_rolling(text): the text's total log-probability in windows of `max_length`
  predicted tokens (each window conditioned on the one token before it), begin-of-text first. The
  same number as `herd eval`'s perplexity with window = max_length + 1.
- generate_until(context, until=[...]): herd's engine, greedy unless `do_sample`, cut at the first
  stop string.
`add_bos_token` (default true: herd models are trained with it at the start of each document)
puts begin-of-text before every context.

lm-eval 0.4 finds models only in its own registry, with no plugin entry point, so its `lm_eval`
script does not know `herd`. Importing this module registers it; `python -m herd.eval.lm_eval_model`
registers it and runs lm-eval's command line unchanged:

    python -m herd.eval.lm_eval_model --model herd --model_args pretrained=runs/main/model --tasks hellaswag
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    # lm-eval fills its model registry on first use only while the registry is empty: load its own
    # types first, or registering `herd` would hide them (`local-completions`, `hf`, ...)
    import lm_eval.models  # noqa: F401
except ImportError as e:  # an optional extra: say how to get it
    raise ImportError("herd.eval.lm_eval_model needs lm-evaluation-harness: pip install 'herd[eval]'") from e

from ..hf import from_pretrained
from ..tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("herd")
class HerdLM(TemplateLM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str = "cpu", dtype: str | None = None,
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool = True, max_batch_size: int | None = None):
        """`max_batch_size` comes with every lm-eval call; it bounds an automatic batch size, which
        herd does not search for (batch_size must be a number), so it is unused."""
        super().__init__()
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        try:
            self.batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size must be a whole number for the herd model, got {batch_size!r}") from None
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes device="cuda" unless told otherwise (as its hf model does)
            print(f"herd lm-eval model: device {device!r} asked for, but CUDA is not available; using the CPU")
            device = "cpu"
        self.model = from_pretrained(pretrained, dtype=DTYPES.get(dtype), device=device).eval()
        self.tokenizer_ = Tokenizer.from_dir(tokenizer or pretrained)
        context = self.model.config.text.max_position_embeddings
        self.max_length = min(int(max_length), context) if max_length else context
        self.max_gen_toks, self.add_bos_token = int(max_gen_toks), bool(add_bos_token)

    # ---- tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.end_of_text_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer_.encode(string, bos=bos)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer_.decode(ids, skip_special=True)

    # ---- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids). Rows are right-padded into batches; the
        causal model's positions never see the padding after them."""
        results = []
        for start in range(0, len(requests), self.batch_size):
            rows, lengths = [], []
            for _, context, continuation in requests[start:start + self.batch_size]:
                if not 0 < len(continuation) <= self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored with "
                                     f"max_length {self.max_length}")
                rows.append(torch.tensor((context + continuation)[-(self.max_length + 1):][:-1]))  # [T]
                lengths.append(len(continuation))
            batch = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.tokenizer_.pad_id)
            logp = F.log_softmax(self.model(batch.to(self.model.device)).logits.float(), -1).cpu()  # [B, T, V]
            for i, (ids, n) in enumerate(zip(rows, lengths)):
                # the last n positions of the row predict the n continuation tokens
                piece, target = logp[i, len(ids) - n: len(ids)], torch.tensor(requests[start + i][2])
                results.append((float(piece.gather(1, target[:, None]).sum()), bool((piece.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)]
            scores = self._loglikelihood_tokens([(None, context, pred) for context, pred in windows])
            out.append(sum(s for s, _ in scores))
        return out

    # ---- generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..inference import generate

        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
            ids = self.tok_encode(context)[-(self.max_length - new):]
            tokens = generate(self.model, torch.tensor([ids]), new, temperature=temperature,
                              top_p=float(kwargs.get("top_p", 1.0)), seed=0,
                              stop_token_ids=list(self.tokenizer_.stop_ids))
            text = self.tok_decode(tokens[0, len(ids):].tolist())
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
