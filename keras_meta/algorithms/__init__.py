from keras_meta.algorithms.base import MetaLearner
from keras_meta.algorithms.anil import ANIL
from keras_meta.algorithms.imaml import IMAML
from keras_meta.algorithms.maml import MAML
from keras_meta.algorithms.meta_sgd import MetaSGD

__all__ = ["MetaLearner", "MAML", "MetaSGD", "ANIL", "IMAML"]
