from keras_meta.algorithms.base import MetaLearner
from keras_meta.algorithms.anil import ANIL
from keras_meta.algorithms.boil import BOIL
from keras_meta.algorithms.imaml import IMAML
from keras_meta.algorithms.maml import MAML
from keras_meta.algorithms.meta_sgd import MetaSGD
from keras_meta.algorithms.protonet import ProtoNet
from keras_meta.algorithms.reptile import Reptile

__all__ = ["MetaLearner", "MAML", "MetaSGD", "ANIL", "IMAML", "Reptile", "BOIL", "ProtoNet"]
