"""An ensemble decoding batched (`ensemble` + `pipeline: local` + batching): CoS in the one
round. The ensemble's smallest member (or `proposer`) drafts chains for every running
request from its own distribution, batched like any draft model (`DraftModelDrafter`),
and the ensemble verifies them all at once (`EnsembleVerifier`: every member scores every
tree, their logits combined by the rule). A request without speculation decodes from the
combination alone, one token per round, so both give the ensemble's output.

Unlike the one-request loop (`actors.ensemble.cos_generate`), the proposer does not rotate:
one proposer drafts for the whole batch, and its KV is held twice (as a member and as the
drafter), which costs the smallest member's cache only. Nothing is lost by it: CoS rotates
so that, after an all-accepted round, a verifier's own row at the next position becomes
the next proposal (the loop there never has r at that position). Here every member scores
the whole chain, its last draft included, so r is known at the next position and the
bonus token is drawn from r itself, a committed token rather than a proposal to test.
"""

from __future__ import annotations

from actors.drafters.draft_model import DraftModelDrafter
from actors.ensemble_verifier import EnsembleVerifier
from cluster.batching.engine import BatchEngine
from cluster.batching.scheduler import BatchConfig
from cluster.engine import EngineConfig
from cluster.ensemble import EnsembleConfig, LocalEnsemble

COST_SIZES = (1, 2, 4, 8, 16, 32, 64)  # verify rows the scheduler weighs drafting against


class LoadedEnsemble:
    """The members loaded in this process, seen as the batched engine sees a loaded target:
    the first member's tokenizer and end tokens, the members' summed verify costs."""

    def __init__(self, cfg: EnsembleConfig, progress: bool = False):
        self.ensemble = LocalEnsemble(cfg, progress=progress)
        self.proposer = self.ensemble.info.default_proposer
        self.target_runner = self.ensemble.runners[0]
        self.draft_runner = None
        self.cfg = EngineConfig(cfg.models[0], max_len=cfg.max_len)
        self.tokenizer, self.context_length = self.ensemble.tokenizer, self.ensemble.info.context_length
        self.eos_token_ids = tuple(self.ensemble.eos_token_ids)
        costs = [r.measure_verify_costs(COST_SIZES) for r in self.ensemble.runners]
        self.verify_costs = {k: sum(c[k] for c in costs) for k in COST_SIZES}

    def runtime_info(self) -> dict:
        info = self.ensemble.runtime_info()
        info["ensemble"] = {"combine": self.ensemble.cfg.rule.describe(), "batched": True,
                            "proposer": self.ensemble.cfg.models[self.proposer]}
        return info


def ensemble_engine(cfg: EnsembleConfig, batch: BatchConfig, progress: bool = False) -> BatchEngine:
    loaded = LoadedEnsemble(cfg, progress)
    runners, slots = loaded.ensemble.runners, batch.max_seqs
    max_len = min(cfg.max_len, loaded.context_length)
    proposer = runners[loaded.proposer]
    drafter = DraftModelDrafter(proposer.model, slots, max_len + batch.max_draft + 2, batch.max_draft)
    drafter.measure(proposer, loaded.verify_costs)
    models = [r.model for r in runners]
    return BatchEngine(loaded, batch, drafter=drafter,
                       verifier=lambda room: EnsembleVerifier(models, cfg.rule, slots, room))
