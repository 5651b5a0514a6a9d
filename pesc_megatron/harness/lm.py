"""The megatron-core PESC model as an lm-evaluation-harness model (`pesc eval --tasks`).

It answers lm-eval's requests as its Hugging Face model (`--model hf`) does, so that scores
are comparable with an export's: the same tokenisation (the checkpoint's Hugging Face
tokenizer, BOS handling as HFLM's `tok_encode`), the same context/continuation split
(TemplateLM), the same left truncation to `max_length` (the model's maximum position), the
same rolling windows, and greedy generation cut at the same stop sequences. The model side
is harness/forward.py.

Every rank runs lm-eval with the same requests and sees itself as lm-eval's only rank: the
requests are shared between data-parallel replicas below lm-eval, in forward.py.
"""
from __future__ import annotations

import time

from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix,
                                  normalize_gen_kwargs, postprocess_generated_text)

from pesc_megatron.harness.forward import Forward
from pesc_megatron.schema import UserError

DEFAULT_MAX_GEN_TOKS = 256  # HFLM's max_gen_toks, used when a task gives none


class PESCLM(TemplateLM):
    """lm-eval's causal LM over `Forward` (the megatron model) and a Hugging Face tokenizer."""

    backend = "causal"

    def __init__(self, forward: Forward, tokenizer, max_length: int, stop_ids=()):
        super().__init__()
        self.forward, self.tokenizer, self._max_length = forward, tokenizer, max_length
        # generation stops at EOS and at the generation config's end tokens, as HF generate
        self.stop_ids = {tokenizer.eos_token_id, *stop_ids} - {None}
        self.timings: dict[str, dict] = {}  # request type -> {"requests", "seconds"}

    def _timed(self, kind: str, count: int, start: float) -> None:
        t = self.timings.setdefault(kind, {"requests": 0, "seconds": 0.0})
        t["requests"] += count
        t["seconds"] += time.perf_counter() - start

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # what an empty context is conditioned on (as HFLM)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        kw = _add_special_kwargs(add_special_tokens, None)
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False  # the string already starts with BOS
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(sum of the continuation's log-probabilities, whether it is the greedy one) for
        each (key, context ids, continuation ids)."""
        seqs, positions, targets = [], [], []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise UserError(f"lm-eval request with a context of {len(context)} and a "
                                f"continuation of {len(continuation)} tokens: both must be "
                                f"non-empty, the continuation at most {self.max_length}")
            # as HFLM: the last max_length + 1 tokens, the last one only a target
            inp = (context + continuation)[-(self.max_length + 1):][:-1]
            seqs.append(inp)
            positions.append(list(range(len(inp) - len(continuation), len(inp))))
            targets.append(continuation)
        scored = self.forward.score(seqs, positions, targets)
        return [(float(sum(s.logprobs)), s.argmax == list(t)) for s, t in zip(scored, targets)]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        start = time.perf_counter()
        out = super().loglikelihood(requests, disable_tqdm)
        self._timed("loglikelihood", len(requests), start)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string, over HFLM's disjoint rolling windows."""
        start = time.perf_counter()
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, target in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        self._timed("loglikelihood_rolling", len(requests), start)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generations, grouped by their generation arguments."""
        start = time.perf_counter()
        results = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]),
                                          DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample"):
                raise UserError(f"task asks for sampling ({requests[members[0]].args[1]}): "
                                "pesc eval --tasks generates greedily only")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise UserError(f"max_gen_toks {max_gen_toks} is not below the model's "
                                f"maximum length {self.max_length}")
            contexts = [self.tok_encode(requests[i].args[0],
                                        left_truncate_len=self.max_length - max_gen_toks)
                        for i in members]
            stops = [s for s in until if s]
            continuations = self.forward.generate(
                contexts, max_gen_toks, self.stop_ids,
                lambda toks: any(s in self.tok_decode(toks) for s in stops))
            for i, toks in zip(members, continuations):
                results[i] = postprocess_generated_text(self.tok_decode(toks), until, None)
        self._timed("generate_until", len(requests), start)
        return results
