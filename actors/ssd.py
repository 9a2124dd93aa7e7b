"""SSD, speculative speculative decoding (arXiv 2603.03251): the drafter's side.

sync drafts round r+1 only once round r's verdict is in, so every round pays a draft and a
verify one after the other. Here, while the target verifies round r, the drafter guesses
how that verify will end (how many of its k drafts the target keeps, j, and which token
it commits after them, the bonus b) and drafts round r+1 for the likeliest outcomes, most
likely first, each from the context it would continue: committed + d_1..d_j + b. When the
verdict names an outcome it holds (a hit), that draft goes out at once; otherwise (a miss)
it drafts afresh, as sync does.

Which outcomes: with `keep` the measured rate at which the target keeps a draft whose
predecessors it kept, and q_i the distribution d_i was drawn from, the target keeps
d_1..d_j and then commits b != d_{j+1} with probability about
keep^j (1 - keep) q_{j+1}(b) / (1 - q_{j+1}(d_{j+1})) (the draft's runners-up guess the
target's token), and keeps all k and commits b with about keep^k q_{k+1}(b), q_{k+1} being
the draft's distribution after d_k (one more draft step, the first thing pre-drafting
does). (The draft's own q_i(d_i) is a poor guess of `keep`: under greedy a draft is kept
when it is the target's top token, however unsure the draft was.) Outcomes are taken in that order (the
fan-out goes where the mass is, as SSD's does), up to `FANOUT`; pre-drafting stops the
moment the verdict arrives (asked between draft steps), so it delays the answer by at most
one draft step.

Lossless, greedy and sampling: the draft for outcome (j, b) was drawn, with the drafter's
own coins, from the draft's distributions given committed + d_1..d_j + b, and is sent only
when the verdict commits exactly that context: it is then a draft like any other for it,
with its q rows. Whether an outcome was covered depends on this round's draft and on
timing, how deep its branch got on timing and the draft's confidence, never on the
target's coins: the verify's rejection rule stays exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from actors.runner import ModelRunner, Proposal
from decoding.draft_length import DraftLengthPolicy
from decoding.request import DecodeConfig
from decoding.sampling import logits_to_probs
from protocol import CandidateTree, Message

FANOUT = 8  # most outcomes pre-drafted per round
RUNNERS_UP = 2  # bonus guesses per number of kept drafts


@dataclass(frozen=True)
class Outcome:
    kept: int  # drafts the target keeps
    bonus: int  # the token it commits after them
    prob: float  # the draft's estimate


def likely_outcomes(chain: list[int], rows: torch.Tensor, after: torch.Tensor | None, keep: float,
                    guesses: int = RUNNERS_UP, limit: int = FANOUT) -> list[Outcome]:
    """The verdict's likeliest outcomes for a drafted chain, likeliest first. `rows[i]`: the
    distribution `chain[i]` was drawn from; `after`: the one after the chain (None: the
    outcome "all kept" is not guessed); `keep`: the measured rate at which the target keeps
    a draft whose predecessors it kept."""
    found = []
    for j, token in enumerate(chain):
        row = rows[j].clone()
        rest = max(1e-9, 1.0 - float(row[token]))
        row[token] = 0  # rejected at depth j + 1: the target commits something else
        top = torch.topk(row, guesses)
        reach = keep**j * (1 - keep)
        found += [Outcome(j, b, reach * p / rest) for p, b in zip(top.values.tolist(), top.indices.tolist())]
    if after is not None:
        top = torch.topk(after, guesses)
        found += [Outcome(len(chain), b, keep ** len(chain) * p) for p, b in zip(top.values.tolist(),
                                                                                 top.indices.tolist())]
    found.sort(key=lambda o: -o.prob)
    return found[:limit]


class _Inbox:
    """The verifier's next message, taken off the socket as soon as it is there: the
    pre-drafting's stop signal."""

    def __init__(self, session):
        self.session, self.message, self.at = session, None, 0.0

    def arrived(self) -> bool:
        if self.message is None:
            self.message = self.session.recv(block=False)
            self.at = time.perf_counter()
        return self.message is not None

    def take(self) -> Message | None:
        message, self.message = self.message, None
        return message


def draft_ssd(runner: ModelRunner, s, cfg: DecodeConfig, policy: DraftLengthPolicy | None, gen,
              stats: dict) -> None:
    """The SSD loop for one request (`s`: the `actors.proposing` session)."""
    policy = policy or DraftLengthPolicy(max_len=cfg.max_draft_length, fixed=cfg.draft_length)
    stats.update(predrafted=0, hits=0, misses=0, wasted=0, hit_ranks=[0] * FANOUT)
    inbox, step, ready, keep = _Inbox(s), 0, None, 0.6
    while not s.done:
        if not s.started:
            s.recv(block=True)
            continue
        context = list(s.committed)
        remaining = cfg.max_new_tokens - (len(context) - len(s.prompt))
        proposal = ready or runner.propose(context, cfg.sampling, policy, max_depth=max(1, remaining - 1),
                                           generator=gen, keep_rows=True)
        if ready is None:
            stats["draft_s"] += proposal.seconds
            stats["drafted"] += proposal.depth
        tree = CandidateTree(session_id=s.session, step=step, position=len(context) - 1,
                             token_ids=proposal.tree.tokens, parents=proposal.tree.parents,
                             draft_probs=proposal.draft_probs)
        step += 1
        sent = time.perf_counter()
        s.channel.send(tree)
        branches = _pre_draft(runner, context, proposal, remaining, cfg, policy, gen, inbox, keep, stats)
        received = inbox.take()
        verdict = s.verdict_for(tree, received)
        if verdict is None:
            return
        # what a verify costs us, transport included (to the draft step that noticed it)
        policy.costs.observe_verify((inbox.at if received is not None else time.perf_counter()) - sent,
                                    proposal.tree.size)
        policy.costs.observe_draft(proposal.seconds, proposal.depth)
        policy.observe_acceptance(len(verdict.accepted_path), proposal.predicted)
        kept = len(verdict.accepted_path)
        keep = 0.7 * keep + 0.3 * kept / min(kept + 1, proposal.depth)  # kept of the drafts tested
        stats["rounds"] += 1
        rank, ready = branches.pop((len(verdict.accepted_path), verdict.bonus_token_id), (None, None))
        stats["wasted"] += sum(b.depth for _, b in branches.values())
        if ready is None:
            stats["misses"] += 1
        else:
            stats["hits"] += 1
            stats["hit_ranks"][rank] += 1


Branches = dict[tuple[int, int], tuple[int, Proposal]]  # (kept, bonus) -> (rank, the draft after it)


def _pre_draft(runner: ModelRunner, context: list[int], proposal: Proposal, remaining: int, cfg: DecodeConfig,
               policy: DraftLengthPolicy, gen, inbox: _Inbox, keep: float, stats: dict) -> Branches:
    """Drafts for the likeliest outcomes of the round in flight, until its verdict arrives:
    {(kept, bonus): (rank, draft)}."""
    chain = proposal.tree.tokens[1:].tolist()
    if inbox.arrived() or not chain:
        return {}
    # the distribution after the last draft: the first step of the branch "all kept"
    logits = runner.feed(runner.sync(context + chain[:-1]) + chain[-1:])
    after = torch.softmax(logits.float(), -1) if cfg.sampling.greedy else logits_to_probs(logits, cfg.sampling)
    branches = {}
    for rank, outcome in enumerate(likely_outcomes(chain, proposal.rows, after, keep)):
        left = remaining - outcome.kept - 1  # tokens still due after this outcome
        if left < 1 or inbox.arrived():
            continue
        branch = runner.propose(context + chain[:outcome.kept] + [outcome.bonus], cfg.sampling, policy,
                                max_depth=max(1, left - 1), generator=gen, stop=inbox.arrived, keep_rows=True)
        branches[(outcome.kept, outcome.bonus)] = (rank, branch)
        stats["draft_s"] += branch.seconds
        stats["drafted"] += branch.depth
        stats["predrafted"] += branch.depth
    return branches
