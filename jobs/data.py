"""Ray Job entrypoint of the data stage; `python jobs/data.py --help` (mlsd_ray/cli/jobs.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/data.py --smoke
"""

from mlsd_ray.cli.jobs import main

if __name__ == "__main__":
    main("data")
