"""The ICH second-opinion engine: DICOM loading, windowing, the CNN-LSTM model, inference.

Nothing in this package imports Qt; the viewer, batch scoring and training all use it.
"""

from ich_model.labels import LABELS, NOT_FOR_DIAGNOSIS

__version__ = "0.1.0"
__all__ = ["LABELS", "NOT_FOR_DIAGNOSIS", "__version__"]
