"""Entry point for `ray job submit`: the same arguments and config as `vqpipe tokenize`.

    ray job submit --working-dir . -- python jobs/run_tokenize.py --config jobs/example.toml

Inside a Ray job (RAY_ADDRESS is set by the job supervisor) it joins that cluster; otherwise it starts a local one.
The exit code is the job's status: 0 only when every shard is done; `ray job stop` sends SIGTERM, which ends the
job with its summary and exit code 143 if RAY_JOB_STOP_WAIT_TIME_S leaves it the time (docs/reliability.md).
Ray puts the submitted `--working-dir` first on the job's PYTHONPATH, so the driver and the actors import the
vqpipe that was shipped with the job rather than an installed one.
"""

import sys

from vqpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
