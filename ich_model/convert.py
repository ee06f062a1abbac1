"""``python -m ich_model.convert WEIGHTS OUT``: convert verified weights to float32 ONNX.

Run by :func:`ich_model.runtime.convert_in_child`, so that the process that scores (the
viewer above all) never imports TensorFlow. Exit status 0 when ``OUT`` was written and
checked against Keras, 1 with the reason on the last line otherwise.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ich_model.convert WEIGHTS OUT", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ich_model.runtime import ConversionError, build_keras, export_onnx
    from ich_model.weights import WeightsError, read_manifest

    try:
        manifest, weights = read_manifest(args[0])
        export_onnx(build_keras(manifest, weights), manifest, Path(args[1]))
    except (WeightsError, ConversionError, OSError) as exc:
        print(f"{exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
