"""Backend guard: keras_meta runs on Keras 3 with the TensorFlow backend only.

Importing this module selects TensorFlow when `KERAS_BACKEND` is unset and raises
an `ImportError` that says so when Keras is configured for another backend.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Quieter TensorFlow start-up unless the user asked otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _wrong_backend(backend):
    return ImportError(
        "keras_meta requires the TensorFlow backend of Keras 3, but Keras is "
        f"configured with backend={backend!r}. Set the environment variable "
        "KERAS_BACKEND=tensorflow before importing keras (or leave it unset "
        "and import keras_meta first)."
    )


try:
    import keras
except ImportError as error:  # e.g. KERAS_BACKEND=jax without jax installed
    if os.environ["KERAS_BACKEND"] != "tensorflow":
        raise _wrong_backend(os.environ["KERAS_BACKEND"]) from error
    raise

if keras.backend.backend() != "tensorflow":
    raise _wrong_backend(keras.backend.backend())
