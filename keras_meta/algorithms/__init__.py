from keras_meta.algorithms.base import MetaLearner
from keras_meta.algorithms.anil import ANIL
from keras_meta.algorithms.imaml import IMAML
from keras_meta.algorithms.maml import MAML

__all__ = ["MetaLearner", "MAML", "ANIL", "IMAML"]
