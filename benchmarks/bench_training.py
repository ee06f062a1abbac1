"""Training throughput (images per second) on this machine, through the real training pipeline.

Prints images/s for the paper's full network at 299 px and for the bundled model's
configuration (read from the bundled manifest, or given on the command line), each
measured over whole training steps (balanced sampling, augmentation, forward, backward,
Adam update) after a warm-up.

    python benchmarks/bench_training.py [--steps 5] [--batch-size 32] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from ich_model.model import ModelConfig, build_model
from training.fit import weighted_bce
from training.pipeline import PipelineConfig, train_dataset


def images_per_second(cfg: ModelConfig, batch: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    n = max(4 * batch, 64)
    x = rng.random((n, cfg.input_size, cfg.input_size, 3)).astype(np.float16)
    y = (rng.random((n, 6)) < 0.2).astype(np.float32)
    y[:, 5] = y[:, :5].max(axis=1)
    data = iter(train_dataset(x, y, PipelineConfig(input_size=cfg.input_size, batch_size=batch)))
    model = build_model(cfg)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=weighted_bce)
    xb, yb = next(data)
    model.train_on_batch(xb, yb)  # build and trace
    t0 = time.perf_counter()
    for _ in range(steps):
        xb, yb = next(data)
        model.train_on_batch(xb, yb)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="2 steps at batch 8")
    args = p.parse_args()
    steps, batch = (2, 8) if args.quick else (args.steps, args.batch_size)

    configs = [("paper (Xception width 1.0, 8 middle blocks) at 299", ModelConfig())]
    try:
        from ich_model.weights import read_manifest

        manifest, _ = read_manifest(None, verify=False)
        bundled = ModelConfig.from_dict(manifest.architecture)
        configs.append(
            (
                f"bundled (width {bundled.width}, {bundled.middle_blocks} middle blocks) "
                f"at {bundled.input_size}",
                bundled,
            )
        )
    except Exception as exc:  # no bundled weights yet
        print(f"(no bundled manifest: {exc})")
    print(f"cores: {os.cpu_count()}, batch {batch}, {steps} timed steps after one warm-up")
    for name, cfg in configs:
        ips = images_per_second(cfg, batch, steps)
        print(f"{name}: {ips:.1f} training images/s ({cfg.input_size} px)")


if __name__ == "__main__":
    main()
