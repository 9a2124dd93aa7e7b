"""The Serve config as shipped, and the checks on its `args`, with Serve's own schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from actors.loading import DEFAULT_DRAFT, DEFAULT_TARGET
from cluster.serve.app import ongoing_requests
from cluster.serve.config import ServeArgs

SHIPPED = Path(__file__).parents[2] / "deploy" / "serve.yaml"


def shipped() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_config_passes_serves_schema_and_serves_the_builtin_pair_on_8000():
    config = shipped()
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.port == 8000
    # open to this machine only as shipped: another host is served with a key (api_key_env)
    assert schema.http_options.host == "127.0.0.1" or "api_key_env" in config["applications"][0]["args"]
    (app,) = config["applications"]
    assert app["import_path"] == "cluster.serve.app:build"
    args = ServeArgs(**app["args"])
    assert (args.target, args.draft, args.pipeline) == (DEFAULT_TARGET, DEFAULT_DRAFT, "local")
    deployment = app["deployments"][0]
    # /health must get in past a full queue and every slow upload
    assert deployment["max_ongoing_requests"] >= ongoing_requests(args) > args.max_pending + args.max_reading
    assert deployment["max_queued_requests"] > 0  # bounded: no unbounded wait at the proxy
    assert schema.http_options.request_timeout_s > args.request_timeout_s  # the app answers its own timeouts
    assert deployment["autoscaling_config"]["min_replicas"] >= 1


@pytest.mark.parametrize("args,mentions", [
    ({"pipeline": "turbo"}, "pipeline"),
    ({"max_pending": 0}, "max_pending"),
    ({"dtype": "float8"}, "dtype"),
    ({"draft": None, "pipeline": "async"}, "pipeline: async needs draft"),
    ({"api_key": "a", "api_key_env": "B"}, "not both"),
    ({"api_key": " "}, "api_key is empty"),
    ({"draft_length": 9}, "draft_length"),
    ({"max_batch": 0}, "max_batch"),
    ({"ensemble": ["a"], "combine": "we:0.5"}, "at least 2"),
    ({"ensemble": ["a", "b"]}, "combine"),
    ({"combine": "we:0.5"}, "ensemble"),
    ({"ensemble": ["a", "b"], "combine": "we:0.5", "pipeline": "async"}, "local .* or sync"),
    ({"ensemble": ["a", "b", "c"], "combine": "cd:0.1"}, "cd"),
    ({"targte": "x"}, "targte"),
    ({"heads": "medusa", "draft": "qwen2.5-coder-0.5b"}, "two ways to draft"),
    ({"heads": "medusa", "pipeline": "async"}, "local .* or sync"),
    ({"draft": "self", "pipeline": "sync"}, "pipeline: local"),
    ({"draft": "self", "pipeline": "local", "attention": "tidal"}, "give one of them"),
    ({"attention": "tidal:x"}, "positive integer"),
    ({"ensemble": ["a", "b"], "combine": "we:0.5", "attention": "tidal"}, "not to an ensemble"),
    ({"draft": None, "pipeline": "local", "draft_attention": "tidal"}, "sets how a draft attends"),
    ({"heads": "medusa", "tree": "random"}, "tree"),
    ({"heads": "medusa", "ensemble": ["a", "b"], "combine": "we:0.5"}, "members draft"),
])
def test_bad_args_name_what_is_wrong(args, mentions):
    with pytest.raises(ValidationError, match=mentions):
        ServeArgs(**args)


def test_target_alone_runs_local_and_an_ensemble_replaces_the_target():
    assert ServeArgs(draft=None, pipeline="local").model_name == DEFAULT_TARGET
    ens = ServeArgs(ensemble=["a", "b"], combine="we:0.5")
    assert ens.target is None and ens.draft is None and ens.model_name == "a+b" and ens.pipeline == "sync"
    assert ServeArgs().pipeline == "local"  # batched in the replica


def test_heads_replace_the_draft_and_are_batched_in_the_replica_by_default():
    args = ServeArgs(heads="medusa")
    assert args.draft is None and args.pipeline == "local" and args.tree == "dynamic"
    assert ServeArgs(heads="medusa", pipeline="sync", tree="static").pipeline == "sync"
