"""A reward model (a converted HF sequence classifier) on its OWN tp/pp process groups over the
same ranks as the policy, scoring the last real token of prompt + response.

Every rank calls ``score`` with its policy data-parallel rank's rollouts. One rank per policy
data-parallel group contributes them to a world-wide list; the reward model's data-parallel
ranks score disjoint slices of it; the scores are shared with everyone again.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..data.tokenizer import load_tokenizer
from ..models.checkpoint import load_model, read_checkpoint
from ..ops.padding import position_ids
from ..rollout.attention import padded_causal_attention
from ..rollout.forward import StageForward
from ..runtime.groups import build_process_groups
from . import Reward, Scored

log = logging.getLogger(__name__)


def same_tokenizer(a, b) -> bool:
    return type(a) is type(b) and a.get_vocab() == b.get_vocab()


class RewardModelReward(Reward):
    collective = True  # its forward and all_gathers span every rank

    def __init__(self, load: str, tp: int, pp: int, micro_batch_size: int, policy_tokenizer,
                 tokenizer_dir: str | None, contributes: bool, device,
                 dtype: torch.dtype | None = None):
        checkpoint = read_checkpoint(load)
        self.groups = build_process_groups(tp, pp, checkpoint.config)
        self.model, self.checkpoint = load_model(load, pg_collection=self.groups,
                                                 expect_kind="reward")
        if dtype is not None:  # the policy's precision (bf16 on GPU), cast before the move
            self.model = self.model.to(dtype)
        self.model = self.model.to(device).eval()
        self.tokenizer = load_tokenizer(checkpoint, tokenizer_dir)
        self.retokenize = not same_tokenizer(self.tokenizer, policy_tokenizer)
        if self.retokenize:
            log.info("reward model tokenizer differs from the policy's: re-tokenizing text")
        self.micro_batch_size = micro_batch_size
        self.contributes = contributes  # this rank speaks for its policy data-parallel group
        self.forward = StageForward(self.model)
        self.max_positions = checkpoint.config.max_position_embeddings
        self.truncated = 0

    def _ids(self, item: Scored) -> list[int]:
        if not self.retokenize:
            ids = item.prompt_ids + item.response_ids
        else:
            ids = list(self.tokenizer(item.prompt_text + item.response_text).input_ids)
            if item.ended_with_eos and self.tokenizer.eos_token_id is not None:
                ids.append(self.tokenizer.eos_token_id)
        if len(ids) > self.max_positions:
            self.truncated += 1  # keep the end: the score is read at the last token
            ids = ids[-self.max_positions:]
        return ids

    @torch.no_grad()
    def _score_sequences(self, sequences: list[list[int]]) -> list[float]:
        out = []
        for start in range(0, len(sequences), self.micro_batch_size):
            chunk = sequences[start:start + self.micro_batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            ids, mask = ids.to(self.forward.device), mask.to(self.forward.device)
            positions = position_ids(mask)
            last = mask.sum(-1) - 1

            def attend(_, q, k, v):
                return padded_causal_attention(q, k, v, mask)

            hidden = self.forward.hidden(ids, positions, attend, pick=last)
            scores = torch.zeros(len(chunk), dtype=torch.float32, device=ids.device)
            if hidden is not None:
                scores = self.forward.scores(hidden)
            out += self.forward.pipe.from_last(scores).tolist()
        return out

    def score(self, items: list[Scored]) -> torch.Tensor:
        world = [None] * dist.get_world_size()
        self.truncated = 0
        mine = [(i.uid, self._ids(i)) for i in items] if self.contributes else []
        if self.truncated:
            log.warning("%d reward-model inputs were longer than its %d positions: their starts "
                        "were cut", self.truncated, self.max_positions)
        dist.all_gather_object(world, mine)
        everything = sorted((entry for part in world for entry in part), key=lambda e: e[0])
        dp, dp_rank = self.groups.dp.size(), self.groups.dp.rank()
        share = everything[dp_rank::dp]
        scores = self._score_sequences([ids for _, ids in share]) if share else []
        tp_rank, pp_first = self.groups.tp.rank(), self.forward.pipe.first
        result = list(zip((uid for uid, _ in share), scores)) if tp_rank == 0 and pp_first else []
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        table = {uid: s for part in gathered for uid, s in part}
        return torch.tensor([table[i.uid] for i in items], dtype=torch.float32)
