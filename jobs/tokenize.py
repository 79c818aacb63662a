"""Entry point for `ray job submit`: the same arguments and config as `vqpipe tokenize`.

    ray job submit --working-dir . -- python jobs/tokenize.py --config jobs/example.toml

Inside a Ray job (RAY_ADDRESS is set by the job supervisor) it joins that cluster; otherwise it starts a local one.
The exit code is the job's status: 0 only when every shard is done; `ray job stop` sends SIGTERM, which ends the
job with its summary and exit code 143 if RAY_JOB_STOP_WAIT_TIME_S leaves it the time (docs/reliability.md).
"""

import os
import sys

# `python jobs/tokenize.py` puts jobs/ first on sys.path, where this file shadows the standard library's
# `tokenize` (linecache imports it, so logging and traceback do): the job died with a circular import of
# vqpipe.cli. Replace that entry, before importing anything else, with the submitted working directory (the repo),
# which also wins over an installed vqpipe, so the job runs the code it shipped.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from vqpipe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
