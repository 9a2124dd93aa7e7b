"""A sparse (TidalDecode) drafter in the Ray pipelines: the drafter actor attends sparsely
over its own cache, the verifier actor with full attention, so the output is the target's,
in the sync and the async pipeline (where the drafter rolls back by cropping)."""

from __future__ import annotations

import pytest

from actors import loading
from actors.pipeline_options import PipelineOptions
from actors.runner import ModelRunner
from cluster.local import autoregressive_generate
from cluster.pipeline import PipelineConfig, RayPipeline
from decoding.request import DecodeConfig

PROMPTS = [[(7 * i + 3) % 60 + 2 for i in range(200)], [(11 * i) % 50 + 3 for i in range(150)]]


@pytest.fixture(scope="module")
def models(tiny_dir):
    return tiny_dir("llama"), tiny_dir("llama", noise=0.3)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_sparse_drafter_actor_gives_the_targets_output(local_ray, models, mode):
    target, draft = models
    reference = ModelRunner(loading.load(target, progress=False).build(), 512)
    cfg = PipelineConfig(target, draft, draft_dtype="float32", draft_attention="tidal:8", drafter_ready_s=60,
                         request_timeout_s=120)
    with RayPipeline(cfg) as pipe:
        assert pipe.drafter_info["attention"].startswith("tidal:8") and "attention" not in pipe.verifier_info
        for prompt in PROMPTS:
            decode = DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,))
            result = pipe.generate(prompt, decode, PipelineOptions(mode=mode, lookahead=4))
            assert result.token_ids == autoregressive_generate(reference, prompt, decode).token_ids
            assert result.stats.verify_rounds > 0 and not result.stats.drafter_lost
            labels = result.stats.as_dict()
            assert labels["draft_attention"] == "tidal:8" and labels["approximate"] is False


def test_a_sparse_verifier_actor_is_labelled_approximate(local_ray, models):
    """Use 3 in a Ray pipeline: the verifier actor itself attends sparsely; every answer says so."""
    target, draft = models
    cfg = PipelineConfig(target, draft, draft_dtype="float32", attention="tidal:8", drafter_ready_s=60,
                         request_timeout_s=120)
    with RayPipeline(cfg) as pipe:
        assert pipe.verifier_info["attention"].startswith("tidal:8") and "attention" not in pipe.drafter_info
        decode = DecodeConfig(max_new_tokens=16, eos_token_ids=(-1,))
        result = pipe.generate(PROMPTS[0], decode, PipelineOptions(mode="sync"))
        labels = result.stats.as_dict()
        assert len(result.token_ids) == 16 and labels["approximate"] is True and labels["attention"] == "tidal:8"
