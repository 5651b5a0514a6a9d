"""What lm-evaluation-harness asks of a language model, answered by the megatron-core model at
any parallel layout: the log-probabilities of given next tokens (and whether each is the
argmax), and greedy continuations. No lm-eval import here (harness/lm.py is the adapter).

Every rank calls these with the same list of sequences. Sequences are sorted by length, cut into
batches of `batch_size`, and the batches dealt round-robin over the data-parallel replicas; each
replica's ranks run its batches through megatron-core's forward-only pipeline schedule (one
micro-batch per call, right-padded to a multiple of the TP size for sequence parallelism), and
the last pipeline stage's results are gathered to every rank. All replicas make the same number
of forward calls (a replica with fewer batches repeats one and drops its results), since expert
parallelism exchanges tokens between replicas in every MoE layer.

Right padding changes nothing before it (causal attention, dropless routing), so a sequence's
results do not depend on the batch it is in, up to float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from pesc_megatron.parallel.distributed import device, max_over_ranks


@dataclass
class Scored:
    """One sequence's results at the positions asked for: the log-probability of each given
    target token (float64 sums are taken by the caller) and the argmax token there."""
    logprobs: list[float]
    argmax: list[int]


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted longest first (padding is then small), cut into batches."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]


def _my_batches(batches: list[list[int]]) -> list[list[int] | None]:
    """This data-parallel replica's share of `batches`, padded with None (a forward call whose
    results are dropped) to the same count on every replica."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = batches[rank::dp]
    return mine + [None] * (math.ceil(len(batches) / dp) - len(mine))


class Forward:
    """The PESC model (one pipeline stage of it on this rank), in eval mode, as a function of
    token sequences."""

    def __init__(self, model, batch_size: int):
        self.model, self.batch_size = model, batch_size
        model.eval()

    @torch.no_grad()
    def _run(self, seqs: list[list[int]], positions: list[list[int]],
             targets: list[list[int]] | None) -> list[Scored] | None:
        """One forward call over one batch: on the last pipeline stage the results at
        `positions` of each sequence, elsewhere None."""
        tp = ps.get_tensor_model_parallel_world_size()
        length = max(len(s) for s in seqs)
        length = -(-length // tp) * tp  # sequence parallelism splits the sequence over TP
        tokens = torch.zeros(len(seqs), length, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(s)
        tokens = tokens.to(device())
        # the output layer runs at these positions only (PESCGPTModel), in (batch, position)
        # order: positions must be ascending within each sequence
        at = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, p in enumerate(positions):
            at[i, p] = True
        at = at.to(device())
        flat_targets = None if targets is None else torch.tensor(
            [t for ts in targets for t in ts], device=device())

        def step(data_iterator, model):
            next(data_iterator)
            position_ids = torch.arange(length, device=device()).expand_as(tokens)
            return model(tokens, position_ids, None, loss_mask=at), score

        def score(logits):  # [n, vocab / TP] on the last stage
            picked = gather_from_tensor_model_parallel_region(logits.float())
            out = {"argmax": picked.argmax(-1)}
            if flat_targets is not None:
                logp = torch.log_softmax(picked, dim=-1)
                out["logprobs"] = logp.gather(1, flat_targets[:, None])[:, 0]
            return torch.zeros((), device=logits.device), out

        stored = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([None]), model=[self.model],
            num_microbatches=1, seq_length=length, micro_batch_size=len(seqs),
            forward_only=True)
        if not ps.is_pipeline_last_stage():
            return None
        out, results, start = stored[0], [], 0
        for p in positions:
            end = start + len(p)
            results.append(Scored(
                out["logprobs"][start:end].tolist() if "logprobs" in out else [],
                out["argmax"][start:end].tolist()))
            start = end
        return results

    def _gather(self, local: dict[int, object], keep: bool) -> dict[int, object]:
        """The results of the ranks where `keep` holds (one rank per replica), on every rank."""
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, local if keep else {})
        return {k: v for part in everyone for k, v in part.items()}

    def score(self, seqs: list[list[int]], positions: list[list[int]],
              targets: list[list[int]]) -> list[Scored]:
        """For each sequence, the log-probability of `targets[i][j]` as the token after
        position `positions[i][j]`, and the argmax there."""
        local = {}
        for batch in _my_batches(_batches([len(s) for s in seqs], self.batch_size)):
            idx = batch if batch is not None else [0]
            res = self._run([seqs[i] for i in idx], [positions[i] for i in idx],
                            [targets[i] for i in idx])
            if batch is not None and res is not None:
                local.update(zip(batch, res))
        # the last stage's TP rank 0 of each replica holds its results
        merged = self._gather(local, ps.is_pipeline_last_stage()
                              and ps.get_tensor_model_parallel_rank() == 0)
        return [merged[i] for i in range(len(seqs))]

    def generate(self, contexts: list[list[int]], max_new_tokens: int,
                 stop_ids: set[int], stopped: Callable[[list[int]], bool]) -> list[list[int]]:
        """Greedy continuations of each context (without the context): up to `max_new_tokens`
        tokens, ending after a token in `stop_ids` (included) or once `stopped(continuation)`
        holds. One full forward per new token: there is no KV cache."""
        local = {}
        for batch in _my_batches(_batches([len(c) for c in contexts], self.batch_size)):
            idx = batch if batch is not None else [0]
            seqs = [list(contexts[i]) for i in idx]
            new = [[] for _ in idx]
            done = [batch is None] * len(idx)
            # Every rank takes a step while any replica still generates (EP exchanges tokens).
            for _ in range(max_new_tokens):
                if max_over_ranks(0.0 if all(done) else 1.0) == 0:
                    break
                res = self._run(seqs, [[len(s) - 1] for s in seqs], None)
                last = [r.argmax[0] for r in res] if res is not None else None
                last = self._broadcast_last_stage(last, len(seqs))
                for j, token in enumerate(last):
                    if done[j]:
                        continue
                    seqs[j].append(token)
                    new[j].append(token)
                    done[j] = token in stop_ids or stopped(new[j])
            if batch is not None:
                local.update(zip(batch, new))
        # every rank of a replica holds its continuations: take them from one
        merged = self._gather(local, ps.is_pipeline_first_stage()
                              and ps.get_tensor_model_parallel_rank() == 0)
        return [merged[i] for i in range(len(contexts))]

    def _broadcast_last_stage(self, tokens: list[int] | None, n: int) -> list[int]:
        """The last stage's next tokens, on every stage of this pipeline."""
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return tokens
        t = torch.zeros(n, dtype=torch.long, device=device())
        if tokens is not None:
            t.copy_(torch.tensor(tokens))
        dist.broadcast(t, ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return t.tolist()
