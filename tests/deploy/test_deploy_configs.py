"""deploy/*.yaml pass Ray's own validation (as `ray up` / `ray job submit` run it), offline.

`ray up` prepares a config (defaults of the provider merged in), then checks it against
Ray's JSON schema; only the provider's cloud bootstrap, which needs the network, is left
out here. Each check is also shown to reject a broken copy, so it can fail.
"""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray._private.runtime_env.packaging import create_package
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).parents[2]
DEPLOY = REPO / "deploy"
CLUSTERS = ["cluster.yaml", "cluster-onprem.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before it touches a cloud or a machine."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", CLUSTERS)
def test_cluster_config_is_valid(name):
    prepared = ray_up_checks(load(name))
    commands = prepared["head_setup_commands"]
    # torch goes in pinned, before the project, or pip resolves some other build.
    torch_at = next(i for i, c in enumerate(commands) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(commands) if "pip install" in c and "specray[builtins]" in c)
    assert torch_at < project_at
    for start in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        assert any("--object-store-memory=" in c for c in start)


def test_local_cluster_config_is_valid_and_names_the_scripts_nodes():
    import importlib.util
    import sys

    prepared = ray_up_checks(load("cluster-local.yaml"))
    spec = importlib.util.spec_from_file_location("local_cluster", DEPLOY / "local_cluster.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules["local_cluster"] = script  # its dataclass looks its module up
    spec.loader.exec_module(script)
    provider = prepared["provider"]
    assert [provider["head_ip"], *provider["worker_ips"]] == [node.ip for node in script.NODES]
    for start in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        assert any("--object-store-memory=" in c for c in start)


@pytest.mark.parametrize("name", [*CLUSTERS, "cluster-local.yaml"])
@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(max_worker=2),  # misspelt top-level key
        lambda c: c.update(idle_timeout_minutes="ten"),
        lambda c: c.update(rsync_exclude=".venv"),  # a string, not a list
    ],
    ids=["unknown-key", "timeout-not-a-number", "excludes-not-a-list"],
)
def test_broken_cluster_config_is_rejected(name, break_it):
    config = load(name)
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        ray_up_checks(config)


def test_broken_aws_node_types_are_rejected():
    config = load("cluster.yaml")
    config["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_up_checks(config)
    config = load("cluster.yaml")
    del config["available_node_types"]["gpu_1x"]["resources"]  # required by the schema
    with pytest.raises(jsonschema.ValidationError):
        ray_up_checks(config)


def test_runtime_env_is_valid():
    config = load("runtime_env.yaml")
    assert set(config) <= set(RuntimeEnv.known_fields), "a misspelt field would be ignored silently"
    env = RuntimeEnv(**config)
    assert env["working_dir"] == "."
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def test_broken_runtime_env_is_rejected():
    config = load("runtime_env.yaml")
    with pytest.raises(TypeError):
        RuntimeEnv(**dict(config, env_vars={"OMP_WAIT_POLICY": 1}))
    with pytest.raises(TypeError):
        RuntimeEnv(**dict(config, excludes=".venv"))


def test_runtime_env_excludes_keep_the_venv_out(tmp_path):
    """Pack the repo as Ray would, with .gitignore and Ray's default excludes both off:
    the runtime env's own excludes must still keep .venv, .git and outputs out."""
    excludes = load("runtime_env.yaml")["excludes"]
    package = tmp_path / "pkg.zip"
    create_package(str(REPO), package, include_gitignore=False, excludes=excludes)
    names = zipfile.ZipFile(package).namelist()
    top = {n.split("/")[0] for n in names}
    assert {"cluster", "actors", "pyproject.toml"} <= top
    assert not top & {".venv", ".git", "bench-out", ".pytest_cache", ".hypothesis"}
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".gguf", ".safetensors"))]
