"""Reinforcement fine-tuning of a generation run's prefix: GRPO, and Prefix-RFT on top of it.

GRPO (Shao et al. 2024): for each input x, G texts y_1..y_G are sampled from the policy (the frozen LM with
the prefix routed once from x), and each text's reward is compared with its group's:

    A_i = (r_i - mean_j r_j) / std_j r_j        (rl.scale_advantages=false: r_i - mean_j r_j, as Dr. GRPO)

Every trained token y_it of text i carries A_i in PPO's clipped objective (Schulman et al. 2017),

    L = -(1/N) sum_{i,t} min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i),
    rho_it = pi_theta(y_it | x, y_i<t) / pi_old(y_it | x, y_i<t),

N the number of trained tokens in the batch (a token-level mean). pi_old is the policy that sampled: with one
optimiser step per batch that is the current policy, detached, so rho = 1 at the step and the gradient is
A_i grad log pi; the clip acts on any tokens whose policy moved since sampling (see `clipped_policy_loss`).
With equal rewards in a group every A_i is 0, and so is the gradient: a group learns only from differences.

Prefix-RFT (Huang et al. 2025, arXiv 2507.01679): in each group a share of the texts (rl.demo_share) starts
with the first L tokens of a reference y* and the policy continues from there; the rest start from scratch.
The demonstration tokens enter the same objective as if the policy had sampled them (pi_old = pi_theta,
detached: a trained demonstration token adds A_i grad log pi(y*_t), an advantage-weighted SFT term), but only
the highest-entropy share (rl.entropy_top_fraction) of each text's demonstration tokens trains, the entropy
being that of pi_theta at the token's position: entropy-based clipping, which leaves the tokens the policy
already predicts with confidence alone. L = ceil(f |y*|) with f ~ U(f_min, u(s)), and the bound decays by a
cosine over the S training steps,

    u(s) = f_min + (f_max - f_min) (1 + cos(pi s / (S - 1))) / 2,

so early texts lean on the demonstration (close to SFT) and late ones are nearly the policy's own (RFT).

The reward of a text is -SER (its slot error rate against the input's meaning representation, a fraction;
`e2e_slots`) plus rl.bleu_weight times its sentence BLEU / 100 against the input's references. With
rl.sft_weight w > 0 the training module adds w times SFT's loss on the batch's references (a likelihood
anchor, as InstructGPT's PPO-ptx mixes in the pretraining loss; `GenerationModule.rl_step`).

Randomness (demonstration lengths, router noise, sampling) comes from torch's global generator, which the
training module seeds from the step: a resumed run draws the rollouts an uninterrupted one would have drawn.

Axes: b - inputs, g - samples per input (a group), t - tokens, v - vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from . import e2e_slots
from .datamodule import pad_tokens
from .run_config import RLConfig, RunConfig

# -- the objective ------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """Rewards ((b g)), groups consecutive -> advantages ((b g)): reward minus group mean (over group std)."""
    r = rearrange(rewards.float(), "(b g) -> b g", g=group_size)
    advantages = r - r.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (r.std(-1, unbiased=False, keepdim=True) + eps)
    return rearrange(advantages, "b g -> (b g)")


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float
) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate as a token-level mean, and the share of tokens the clip holds.

    logp, old_logp, mask (n t); advantages (n). A token is held where its ratio left [1 - eps, 1 + eps] in
    the direction its advantage pushes (then min() takes the constant clipped term: no gradient).
    """
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None].to(ratio.dtype)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    weight = mask.to(ratio.dtype)
    n = weight.sum().clamp_min(1)
    held = ((ratio > 1 + clip) & (a > 0)) | ((ratio < 1 - clip) & (a < 0))
    return -(surrogate * weight).sum() / n, (held.to(ratio.dtype) * weight).sum().detach() / n


def demo_fraction_bound(step: int, total_steps: int, start: float, end: float) -> float:
    """u(s): the cosine from `start` (first step) to `end` (last step) that bounds demonstration fractions."""
    progress = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


def demo_lengths(reference_lengths: list[int], group_size: int, num_demo: int, bound: float, low: float) -> Tensor:
    """Demonstration tokens per rollout ((b g)): ceil(f |y*|), f ~ U(low, bound), for the first num_demo of
    each group; 0 (from scratch) for the others. Draws from the global generator."""
    b = len(reference_lengths)
    fractions = low + (bound - low) * torch.rand(b, num_demo)
    full = torch.tensor(reference_lengths, dtype=torch.long)[:, None]
    lengths = torch.zeros(b, group_size, dtype=torch.long)
    lengths[:, :num_demo] = torch.minimum(torch.ceil(fractions * full).long(), full)
    return rearrange(lengths, "b g -> (b g)")


def top_entropy_mask(entropy: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """Of each row's masked tokens (n t), the ceil(fraction * count) with the highest entropy (n t, bool)."""
    keep = torch.ceil(mask.sum(-1) * fraction - 1e-6).long()  # - 1e-6: 5 * 0.2 is 1, not 1.0000001 -> 2
    order = entropy.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True, stable=True)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return mask & (rank < keep[:, None])


# -- rollouts ---------------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """G texts per input, laid out for the policy's forward: left-padded prompt and demonstration, then the
    sampled tokens (right-padded)."""

    input_ids: Tensor  # ((b g) t)
    attention_mask: Tensor  # ((b g) t)
    sampled: Tensor  # ((b g) t) bool: the tokens the policy drew, up to and with the one that ended the text
    demo: Tensor  # ((b g) t) bool: demonstration tokens
    tokens: list[list[int]]  # each text: demonstration + sampled tokens, without the one that ended it


def split_pairs(batch: dict, eos_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """A batch of (prompt + reference + eos) pairs -> each row's prompt tokens and reference tokens."""
    prompts, references = [], []
    for i in range(batch["input_ids"].shape[0]):
        prompts.append(batch["router_input_ids"][i][batch["router_attention_mask"][i].bool()].tolist())
        target = batch["input_ids"][i][batch["labels"][i] != -100].tolist()
        references.append(target[:-1] if target and target[-1] == eos_id else target)
    return prompts, references


@torch.no_grad()
def sample_rollouts(
    network,
    state,
    prompts: list[list[int]],
    references: list[list[int]],
    lengths: Tensor,
    cfg: RLConfig,
    stop_ids: list[int],
    pad_id: int,
) -> Rollouts:
    """Sample cfg.group_size texts per prompt through `generate()` with the given prefix state (routed once
    from each prompt, shared by its group); rollout (i g) first copies lengths[(i g)] reference tokens."""
    g = cfg.group_size
    demos = [references[i // g][: int(n)] for i, n in enumerate(lengths)]
    given = [prompts[i // g] + d for i, d in enumerate(demos)]
    device = next(network.parameters()).device
    ids, mask = (x.to(device) for x in pad_tokens(given, pad_id, left=True))
    extra = {} if network.mixture is None else {"state": state}
    out = network.generate(
        ids,
        mask,
        do_sample=True,
        temperature=cfg.temperature,
        top_k=0,  # plain sampling from the policy: the objective's log-probabilities are the sampler's
        top_p=1.0,
        max_new_tokens=cfg.max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        **extra,
    )
    new = out[:, ids.shape[1] :]
    # A text ends with its first stop token (eos, or a line break in single-line data): the last action.
    stops = torch.isin(new, torch.tensor(stop_ids, device=new.device))
    before = stops.long().cumsum(-1) - stops.long()  # stop tokens strictly before each position
    sampled_new = before == 0
    width = ids.shape[1]
    demo = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    for i, d in enumerate(demos):
        demo[i, width - len(d) : width] = True
    tokens = [
        d + [t for t, s, keep in zip(row, stop, kept, strict=True) if keep and not s]
        for d, row, stop, kept in zip(demos, new.tolist(), stops.tolist(), sampled_new.tolist(), strict=True)
    ]
    return Rollouts(
        input_ids=out,
        attention_mask=torch.cat([mask, sampled_new.long()], 1),
        sampled=torch.cat([torch.zeros_like(mask, dtype=torch.bool), sampled_new], 1),
        demo=demo,
        tokens=tokens,
    )


def policy_logits(network, state, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits (n t v) of the trained policy on rollouts, with the prefix state they were sampled with."""
    if network.mixture is None:
        return network(input_ids, attention_mask).logits
    return network.mixture.run_backbone(state, input_ids=input_ids, attention_mask=attention_mask).logits


def rollout_loss(logits: Tensor, rollouts: Rollouts, advantages: Tensor, cfg: RLConfig) -> tuple[Tensor, dict]:
    """The clipped objective over sampled tokens and the top-entropy demonstration tokens; and statistics."""
    z = logits[:, :-1]  # position t predicts token t + 1
    targets = rollouts.input_ids[:, 1:]
    sampled, demo = rollouts.sampled[:, 1:], rollouts.demo[:, 1:]
    acting = sampled | demo
    picked = z[acting].float() / cfg.temperature  # (N v): only the positions that predict an action
    logp = torch.zeros(acting.shape, dtype=picked.dtype, device=picked.device)
    logp[acting] = picked.log_softmax(-1).gather(-1, targets[acting][:, None]).squeeze(-1)
    entropy = torch.zeros(acting.shape, device=picked.device)
    with torch.no_grad():
        at_demo = z[demo].float() / cfg.temperature
        entropy[demo] = torch.logsumexp(at_demo, -1) - (at_demo.softmax(-1) * at_demo).sum(-1)  # H = lse(z) - E_p[z]
    kept = top_entropy_mask(entropy, demo, cfg.entropy_top_fraction)
    trained = sampled | kept
    loss, held = clipped_policy_loss(logp, logp.detach(), advantages, trained, cfg.clip)
    stats = {
        "clip_fraction": held,
        "sampled_tokens": sampled.sum(-1).float().mean(),
        "demo_trained": kept.sum().float(),
        "demo_entropy": entropy[demo].mean() if demo.any() else torch.tensor(float("nan")),
    }
    return loss, stats


# -- rewards ------------------------------------------------------------------------------------------------


def sentence_bleu(text: str, references: list[str]) -> float:
    """Smoothed sentence BLEU (0-100, SacreBLEU 13a tokenisation): a short text rarely has a 4-gram match."""
    from torchmetrics.functional.text import sacre_bleu_score

    return 100 * float(sacre_bleu_score([text], [references], tokenize="13a", smooth=True))


def rollout_rewards(
    texts: list[str], mrs: list[str], references: list[list[str]], bleu_weight: float
) -> tuple[Tensor, list[float | None]]:
    """Rewards (n): -SER (0 where the input is no MR) + bleu_weight * BLEU / 100; and each text's SER, a fraction."""
    slots = [e2e_slots.parse_mr(mr) for mr in mrs]
    sers = [None if s is None else e2e_slots.check_slots(t, s).ser for t, s in zip(texts, slots, strict=True)]
    rewards = [-(s or 0.0) for s in sers]
    if bleu_weight:
        bleu = [sentence_bleu(t, refs) for t, refs in zip(texts, references, strict=True)]
        rewards = [r + bleu_weight * b / 100 for r, b in zip(rewards, bleu, strict=True)]
    return torch.tensor(rewards), sers


def expand_groups(values: list, group_size: int) -> list:
    """Per input -> per rollout, groups consecutive: [a, b] -> [a, a, b, b] for g = 2."""
    return [v for v in values for _ in range(group_size)]


def stop_tokens(tokenizer, single_line: bool) -> list[int]:
    """eos, and for single-line data every token that contains a line break (the text ends there)."""
    stops = [tokenizer.eos_token_id]
    if single_line:
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        stops += [i for i, piece in enumerate(pieces) if "\n" in piece and i != tokenizer.eos_token_id]
    return stops


# -- one training step ------------------------------------------------------------------------------------


class StepResult(NamedTuple):
    loss: Tensor  # scalar: the clipped objective
    logits: Tensor  # ((b g) t v) the policy's logits on the rollouts
    routing: object  # MixtureRouting of the b prompts (None without a mixture)
    rows: list[dict]  # per rollout: id, input, demo_tokens, text, reward, ser, advantage
    logs: dict[str, float]  # train/... statistics of the rollouts


def rl_step(network, batch, records, cfg: RunConfig, progress, tokenizer, decode, stop_ids) -> StepResult:
    """Sample, reward and score one group per (input, reference) pair of the batch (cfg.rl.group_size texts each).

    records: the pairs' inputs {id, input, targets}; progress: (step, total steps); decode: tokens -> text as
    validation reads it. prefix_rft: the pair's reference is the group's demonstration.
    """
    rl, objective = cfg.rl, cfg.optim.objective
    g, pad = rl.group_size, tokenizer.pad_token_id
    prompts, references = split_pairs(batch, tokenizer.eos_token_id)
    num_demo = round(rl.demo_share * g) if objective == "prefix_rft" else 0
    bound = demo_fraction_bound(*progress, rl.demo_max_fraction, rl.demo_min_fraction)
    lengths = demo_lengths([len(r) for r in references], g, num_demo, bound, rl.demo_min_fraction)
    routing = state = None
    if network.mixture is not None:  # routed once per input from its prompt; its group shares the prefix
        device = next(network.parameters()).device
        ids, mask = (x.to(device) for x in pad_tokens(prompts, pad, left=True))
        routing, state = network.mixture.prepare(ids, mask)
    rollouts = sample_rollouts(network, state, prompts, references, lengths, rl, stop_ids, pad)
    texts = [decode(t) for t in rollouts.tokens]
    mrs = expand_groups([r["input"] for r in records], g)
    targets = expand_groups([r["targets"] for r in records], g)
    rewards, sers = rollout_rewards(texts, mrs, targets, rl.bleu_weight)
    advantages = group_advantages(rewards, g, rl.scale_advantages)
    logits = policy_logits(network, state, rollouts.input_ids, rollouts.attention_mask)
    loss, stats = rollout_loss(logits, rollouts, advantages.to(logits.device), rl)
    ids = expand_groups([r["id"] for r in records], g)
    rows = [
        {"id": i, "input": mr, "demo_tokens": int(n), "text": text, "reward": float(r), "ser": s, "advantage": float(a)}
        for i, mr, n, text, r, s, a in zip(ids, mrs, lengths, texts, rewards, sers, advantages, strict=True)
    ]
    return StepResult(loss, logits, routing, rows, _logs(objective, rewards, sers, advantages, lengths, bound, stats))


def _logs(objective, rewards, sers, advantages, lengths, bound, stats) -> dict[str, float]:
    """train/reward (all texts), train/reward_scratch (texts without a demonstration: comparable over training),
    train/ser (percent), the advantages' spread, the demonstration schedule and the objective's statistics."""
    scratch = lengths == 0
    known = [s for s in sers if s is not None]
    logs = {
        "train/reward": rewards.mean(),
        "train/advantage_std": advantages.std(unbiased=False),
        "train/sampled_tokens": stats["sampled_tokens"],
        "train/clip_fraction": stats["clip_fraction"],
    }
    if scratch.any():
        logs["train/reward_scratch"] = rewards[scratch].mean()
    if known:
        logs["train/ser"] = 100 * sum(known) / len(known)
    if objective == "prefix_rft":
        logs["train/demo_bound"] = bound
        logs["train/demo_trained"] = stats["demo_trained"]
        if (~scratch).any():
            logs["train/demo_tokens"] = lengths[~scratch].float().mean()
            logs["train/demo_entropy"] = stats["demo_entropy"]
    return {k: float(v) for k, v in logs.items()}
