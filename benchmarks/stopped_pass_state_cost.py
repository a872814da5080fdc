"""What a stopped pass's state check costs on a large model: the snapshot and restore of every module's
plain attributes (``capture.restoring_model_state``) and the peft adapter state read at each training
forward (``capture.adapter_state``), on SiT-XL/2's module tree (606 modules, built on the meta device:
no weights are allocated). Medians over repeats, wall time.

    PYTHONPATH=. python benchmarks/stopped_pass_state_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch

from examples.models import SiT
from sra_plugin.capture import adapter_state, restoring_model_state


def median_ms(fn, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    with torch.device("meta"):
        model = SiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, num_classes=1000)

    def stopped_pass() -> None:
        with restoring_model_state(model):
            pass

    modules = sum(1 for _ in model.modules())
    print(f"SiT-XL/2 ({modules} modules): snapshot + restore {median_ms(stopped_pass):.3f} ms per stopped pass, "
          f"adapter state {median_ms(lambda: adapter_state(model)):.3f} ms per training forward")


if __name__ == "__main__":
    main()
