"""Ray Job entrypoint of the pipeline stage; `python jobs/pipeline.py --help`
(mlsd_ray/cli/jobs.py).

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/pipeline.py --smoke
"""

from mlsd_ray.cli.jobs import main

if __name__ == "__main__":
    main("pipeline")
