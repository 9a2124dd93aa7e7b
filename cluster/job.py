"""Job entry point: `ray job submit --working-dir . -- python -m cluster.job generate|bench FLAGS`.

Runs exactly what `specray generate|bench` runs (same flags, same output, same exit
code), after joining the running cluster, so that pipelines which place actors use the
cluster the job was submitted to, with the job's runtime env (its working_dir).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from cluster import cli


def drop_ray_thread_cap() -> None:
    """Give the entrypoint torch's default thread count, as `specray` has.

    Ray starts the entrypoint from a job supervisor actor that holds no CPU, so Ray set
    OMP_NUM_THREADS=1 for that actor and the entrypoint inherits it: a `--pipeline local`
    job or a bench would compute on one core. Kept when the job's runtime env sets it.
    Must run before torch is imported.
    """
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config is None:
        return  # not a submitted job: the environment is the user's own
    env_vars = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
    if "OMP_NUM_THREADS" not in env_vars:
        os.environ.pop("OMP_NUM_THREADS", None)


def connect() -> None:
    """Join the running cluster; inside a submitted job, RAY_ADDRESS names it."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address="auto")
    except ConnectionError as e:
        raise SystemExit(
            f"cluster.job: no running Ray cluster found ({e}).\n"
            "Start one (`ray start --head`, or `ray up deploy/cluster.yaml`) and submit with "
            "`ray job submit --working-dir . -- python -m cluster.job generate ...`; "
            "to run without a cluster, use `specray generate ...`."
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["bench-protocol"]:
        cli.parser().parse_args(argv)  # --help and bad flags answer before connecting
    drop_ray_thread_cap()
    connect()
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
