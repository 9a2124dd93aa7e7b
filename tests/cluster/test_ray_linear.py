"""Linearized models in the Ray pipelines: a linearized verifier actor keeps its recurrent
state across verifies (committing accepted paths), a linearized drafter actor rolls back
by cropping, in the sync and the async pipeline; the output is the linearized target's."""

from __future__ import annotations

import pytest

from actors import loading
from actors.pipeline_options import PipelineOptions
from actors.runner import ModelRunner
from cluster.local import autoregressive_generate
from cluster.pipeline import PipelineConfig, RayPipeline
from decoding.request import DecodeConfig

PROMPTS = [[(7 * i + 3) % 60 + 2 for i in range(90)], [(11 * i) % 50 + 3 for i in range(13)]]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("which", ["target", "draft"])
def test_a_linearized_actor_gives_the_targets_output(local_ray, tiny_dir, tiny_linear, mode, which):
    if which == "target":
        target, draft = tiny_linear("llama"), tiny_dir("llama", noise=0.3)
    else:
        target, draft = tiny_dir("llama"), tiny_linear("llama", seed=1, noise=0.3)
    reference = ModelRunner(loading.load(target, progress=False).build(), 512)
    cfg = PipelineConfig(target, draft, draft_dtype="float32", drafter_ready_s=60, request_timeout_s=120)
    with RayPipeline(cfg) as pipe:
        info = pipe.verifier_info if which == "target" else pipe.drafter_info
        assert info["linear"].startswith("linear attention")
        for prompt in PROMPTS:
            decode = DecodeConfig(max_new_tokens=40, eos_token_ids=(-1,))
            result = pipe.generate(prompt, decode, PipelineOptions(mode=mode, lookahead=4))
            assert result.token_ids == autoregressive_generate(reference, prompt, decode).token_ids
            assert result.stats.verify_rounds > 0 and not result.stats.drafter_lost
            assert result.stats.verify_rounds < 40  # drafts were accepted
