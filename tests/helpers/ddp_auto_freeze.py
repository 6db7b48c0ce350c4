"""Worker for tests/freezing/test_auto_freeze.py: under torchrun (2 processes x batch 4, gloo), the automatic
freezing run of that test module for 3 epochs of 80 examples, with and without `cache_frozen_activations`.

Each rank saves, per run: the final parameters, the blocks frozen and the steps of the decisions that froze, and
the logged `frozen_layers` and hit rates.

Usage: torchrun --nproc_per_node 2 ddp_auto_freeze.py OUT_FILE_PREFIX
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


from tests.conftest import exit_without_teardown, save_per_rank_and_end  # noqa: E402
from tests.freezing.test_auto_freeze import auto_run  # noqa: E402


def main(prefix: str) -> None:
    results = {}
    for cache in (False, True):
        folder = pathlib.Path(os.path.dirname(prefix)) / f"cache_{cache}"
        results[cache] = auto_run(folder, cache=cache, per_device_train_batch_size=4, ddp_backend="gloo")
    save_per_rank_and_end(results, prefix)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
