"""Run on every worker of a TPU pod slice: join the JAX job, then run the ``r1jax`` command line in this process.

    python tools/tpu_pod/worker.py train --preset r1 ...      # = r1jax train ..., after jax.distributed.initialize()

On a TPU VM ``jax.distributed.initialize()`` finds the coordinator, the process count and this process's id from the
TPU metadata (multi-slice: from the MEGASCALE_* variables queued resources set), so every worker runs the same
command. Logs go to stdout; ``pod.py run`` sends each worker's to ``~/r1jax-logs/`` there.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import jax

    jax.distributed.initialize()
    print(
        f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} devices",
        flush=True,
    )
    from r1jax.cli import main as cli

    return cli(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
