"""home-mixer's top layer: the CLI, the demo, the jobs that chain the layers, offline evaluation."""

import core  # noqa: F401  (sets the process environment before feast or Spark is imported)
