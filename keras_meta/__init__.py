"""keras_meta: gradient-based meta-learning for Keras 3 (TensorFlow backend)."""

from keras_meta import backend as _backend  # noqa: F401  (selects TensorFlow)
from keras_meta import threads as _threads

# Small CPU-only machines: one thread per kernel, one kernel per core, when
# TensorFlow has not started and the user set no pools
# (`KERAS_META_CPU_THREADS=0` opts out; docs/performance.md). First, before
# anything could start the runtime.
_threads.configure_at_import()
from keras_meta import callbacks, data, devices, evaluation, inner_loop, linalg, models, prototypes  # noqa: E402
from keras_meta.algorithms import (  # noqa: E402
    ANIL, BOIL, IMAML, MAML, MetaLearner, MetaSGD, ProtoNet, Reptile,
)
from keras_meta.export import export_adaptive  # noqa: E402
from keras_meta.tflite import export_tflite  # noqa: E402
from keras_meta.threads import configure_cpu_threads  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ANIL",
    "BOIL",
    "IMAML",
    "MAML",
    "MetaLearner",
    "MetaSGD",
    "ProtoNet",
    "Reptile",
    "callbacks",
    "configure_cpu_threads",
    "data",
    "devices",
    "evaluation",
    "export_adaptive",
    "export_tflite",
    "inner_loop",
    "linalg",
    "models",
    "prototypes",
    "__version__",
]
