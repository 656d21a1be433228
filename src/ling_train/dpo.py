"""`task = "dpo"` (`ling-train dpo`): Direct Preference Optimization on KG near-miss pairs.

DPO (Rafailov et al., 2023) raises the policy's log-likelihood ratio to a frozen reference on
the chosen continuation over the rejected one: with `pi`/`ref` the summed log-probabilities of
what the assistant writes in a continuation,

    loss = -log sigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

The pairs come free from `ling_data.kg.preference` (the verified turn vs a wrong tool, a wrong
argument, a skipped hop or a wrong answer). Each packed row holds one pair: the chosen sample as
segment 1, the rejected as segment 2, attending only within itself. The reference is the `init`
checkpoint (normally an SFT run), loaded again and frozen; it lives outside the module tree, so
checkpoints, DDP and Local SGD see only the policy. Everything else is the SFT run.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ling_data.sft import IGNORE_INDEX

log = logging.getLogger("ling_train")
CHOSEN, REJECTED = 1, 2  # segment ids of a packed pair row


def segment_logps(logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(chosen, rejected) [batch]: the summed log-probability of the labelled tokens of each segment,
    in fp32 whatever the logits' dtype."""
    target = labels.clamp(min=0)
    logp = -F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(labels)
    logp = logp * (labels != IGNORE_INDEX)
    return tuple((logp * (segment_ids == segment)).sum(dim=1) for segment in (CHOSEN, REJECTED))


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss over the pairs and what to log: the implicit rewards
    beta * (policy - reference) of each side, their margin, and how often chosen wins."""
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    metrics = {"dpo_loss": loss, "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean(),
               "reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}
    return loss, {name: value.detach() for name, value in metrics.items()}


@dataclass
class DPOOutput:
    """What the Trainer reads from a forward: the loss, the MoE auxiliaries, extra metrics."""

    loss: torch.Tensor
    lm_loss: torch.Tensor  # the policy's NLL per target token of the chosen sides (not optimised)
    balance_loss: torch.Tensor
    router_z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class DPOObjective(nn.Module):
    """Calls the policy (bare, DDP- or FSDP-wrapped) and the frozen reference on pair rows and
    returns the DPO loss plus the policy's weighted router auxiliaries."""

    def __init__(self, policy: nn.Module, reference: nn.Module, beta: float, balance_weight: float,
                 z_loss_weight: float):
        super().__init__()
        self.policy = policy
        reference.requires_grad_(False).eval()
        self._reference = (reference,)  # a tuple: not a submodule, so not trained, saved or synced
        self.beta, self.balance_weight, self.z_loss_weight = beta, balance_weight, z_loss_weight

    def set_step(self, step: int) -> None:
        for model in (self.policy, self._reference[0]):
            inner = getattr(model, "module", model)
            if hasattr(inner, "set_step"):
                inner.set_step(step)

    def train(self, mode: bool = True) -> "DPOObjective":
        super().train(mode)
        self._reference[0].eval()
        return self

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor) -> DPOOutput:
        out = self.policy(input_ids, segment_ids=segment_ids)
        policy_chosen, policy_rejected = segment_logps(out.logits, labels, segment_ids)
        with torch.no_grad():
            reference_logits = self._reference[0](input_ids, segment_ids=segment_ids).logits
            reference_chosen, reference_rejected = segment_logps(reference_logits, labels, segment_ids)
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, self.beta)
        chosen_tokens = ((labels != IGNORE_INDEX) & (segment_ids == CHOSEN)).sum().clamp(min=1)
        metrics["beta"] = torch.tensor(self.beta)
        total = loss + self.balance_weight * out.balance_loss + self.z_loss_weight * out.router_z_loss
        return DPOOutput(total, (-policy_chosen.sum() / chosen_tokens).detach(), out.balance_loss,
                         out.router_z_loss, out.tokens_per_expert, metrics)


def build_loader(config, tokenizer, rank: int, world_size: int):
    """(SFTLoader over pair rows, counts): pairs made from the samples, encoded, shuffled by the
    seed; one pair per row."""
    from ling_data.kg.preference import read_preference_pairs
    from ling_data.sft import SFTLoader, encode_samples, pack_pairs
    from ling_train.sft import sample_file
    pairs = read_preference_pairs(sample_file(config.data), seed=config.seed)
    chosen = encode_samples(tokenizer, [p.chosen for p in pairs], start_ids=(tokenizer.eos_id,))
    rejected = encode_samples(tokenizer, [p.rejected for p in pairs], start_ids=(tokenizer.eos_id,))
    encoded = list(zip(chosen, rejected))
    random.Random(config.seed).shuffle(encoded)
    rows = pack_pairs(encoded, config.seq_len, tokenizer.pad_id)
    kinds: dict[str, int] = {}
    for pair in pairs:
        kinds[pair.kind] = kinds.get(pair.kind, 0) + 1
    counts = {"pairs": len(pairs), "kinds": kinds, "rows": len(rows), "target_tokens": rows.target_tokens,
              "context_tokens": rows.context_tokens, "padding_tokens": rows.padding_tokens}
    log.info("dpo: %d pairs (%s) in rows of %d tokens: %d target, %d context, %d padding", len(pairs),
             ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())), config.seq_len, rows.target_tokens,
             rows.context_tokens, rows.padding_tokens)
    loader = SFTLoader(rows, seed=config.seed, rank=rank, world_size=world_size,
                       batch_sizes=config.batch_sizes(world_size))
    return loader, counts
