"""Entry point for `ray job submit`: the same arguments and config as `vqpipe tokenize`.

    ray job submit --working-dir . -- python jobs/tokenize.py --config jobs/example.toml

Inside a Ray job (RAY_ADDRESS is set by the job supervisor) it joins that cluster; otherwise it starts a local one.
The exit code is the job's status: 0 only when every shard is done.
"""

import sys
from pathlib import Path

# The submitted working directory (the repo) wins over an installed vqpipe, so the job runs the code it shipped.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqpipe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
