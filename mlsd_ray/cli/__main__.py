"""`python -m mlsd_ray.cli`: the same as the `mlsd` console script."""

from mlsd_ray.cli.app import main

main()
