"""Drivers: placement, pipelines, the Serve app, job entry points, the CLI."""

import actors  # noqa: F401  (sets the OpenMP wait policy before torch loads)
