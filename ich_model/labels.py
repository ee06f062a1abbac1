"""Label order and fixed wording shared by every part of the product."""

from __future__ import annotations

from typing import Final

#: The model's outputs, in this order everywhere (RSNA 2019 label names).
LABELS: Final[tuple[str, ...]] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)

#: Short names for compact displays.
SHORT_NAMES: Final[dict[str, str]] = {
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
    "any": "ANY",
}

#: Weights of the RSNA 2019 challenge metric, in LABELS order ("any" counts twice).
METRIC_WEIGHTS: Final[tuple[float, ...]] = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)

NOT_FOR_DIAGNOSIS: Final[str] = "AI second opinion, not for diagnostic use"
UNTRAINED_WARNING: Final[str] = (
    "Untrained weights: these probabilities are random and carry no medical meaning"
)
