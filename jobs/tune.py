"""Ray Job entrypoint of the tune stage; `python jobs/tune.py --help` (mlsd_ray/cli/jobs.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/tune.py --smoke
"""

from mlsd_ray.cli.jobs import main

if __name__ == "__main__":
    main("tune")
