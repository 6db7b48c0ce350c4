"""Worker for tests/freezing/test_activation_cache.py: under torchrun (2 processes, gloo), the 3-epoch run of that
test module with and without `cache_frozen_activations`, with the sampler in order and shuffled.

Each rank saves, per sampling and per run: the logged losses, the final parameters, the frozen prefix's forward
calls per epoch and the logged hit rates.

Usage: torchrun --nproc_per_node 2 ddp_cache.py OUT_FILE_PREFIX
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


from tests.conftest import exit_without_teardown, save_per_rank_and_end  # noqa: E402
from tests.freezing.test_activation_cache import train  # noqa: E402


def main(prefix: str) -> None:
    results = {}
    for sampling in ("sequential", "random"):
        for cache in (False, True):
            folder = pathlib.Path(os.path.dirname(prefix)) / sampling
            model, losses, epochs, trainer = train(
                folder, "bert", cache=cache, settings=True, train_sampling_strategy=sampling
            )
            logs = getattr(trainer, "logs", [])
            results[sampling, cache] = {
                "losses": losses,
                "params": {name: p.detach().clone() for name, p in model.named_parameters()},
                "epochs": epochs,
                "hit_rates": [log["activation_cache_hit_rate"] for log in logs],
            }
    save_per_rank_and_end(results, prefix)


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_teardown()
