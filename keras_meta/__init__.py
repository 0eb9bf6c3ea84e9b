"""keras_meta: gradient-based meta-learning for Keras 3 (TensorFlow backend)."""

from keras_meta import backend as _backend  # noqa: F401  (selects TensorFlow)
from keras_meta import callbacks, data, evaluation, inner_loop, linalg, models
from keras_meta.algorithms import ANIL, IMAML, MAML, MetaLearner
from keras_meta.export import export_adaptive
from keras_meta.threads import configure_cpu_threads

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "IMAML",
    "MAML",
    "MetaLearner",
    "callbacks",
    "configure_cpu_threads",
    "data",
    "evaluation",
    "export_adaptive",
    "inner_loop",
    "linalg",
    "models",
    "__version__",
]
