"""Reference backbones: shapes, parameter counts, seeds, errors."""

import keras
import numpy as np
import pytest

import keras_meta as km


def _conv_params(in_channels, filters):
    return 3 * 3 * in_channels * filters + filters


def test_conv4_strided_omniglot_network():
    model = km.models.conv4(5)
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 5)
    # 28 -> 14 -> 7 -> 4 -> 2 by stride-2 "same" convolutions, then 2*2*64 features
    assert model.get_layer("relu3").output.shape == (None, 2, 2, 64)
    assert model.get_layer("flatten").output.shape == (None, 256)
    convs = _conv_params(1, 64) + 3 * _conv_params(64, 64)
    batch_norm = 4 * 2 * 64  # gamma, beta per block (+ 2 * 64 moving statistics)
    head = 256 * 5 + 5
    assert model.count_params() == convs + 2 * batch_norm + head == 113733
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trainable == convs + batch_norm + head
    assert [layer.strides for layer in model.layers if "conv" in layer.name] == [(2, 2)] * 4
    assert model.layers[-1].name == "head"


def test_conv4_max_pool_mini_imagenet_network():
    model = km.models.conv4(5, filters=32, input_shape=(84, 84, 3), downsampling="max_pool")
    # 84 -> 42 -> 21 -> 10 -> 5 by 2x2 max-pooling: MAML's 5*5*32 features
    assert model.get_layer("flatten").output.shape == (None, 800)
    assert model.count_params() == (
        _conv_params(3, 32) + 3 * _conv_params(32, 32) + 4 * 4 * 32 + 800 * 5 + 5
    ) == 33157
    assert [layer.strides for layer in model.layers if "conv" in layer.name] == [(1, 1)] * 4
    assert sum("pool" in layer.name for layer in model.layers) == 4


def test_conv4_forward_seed_and_dtype():
    x = np.random.default_rng(0).random((3, 28, 28, 1)).astype("float32")
    a, b = km.models.conv4(20, seed=1), km.models.conv4(20, seed=1)
    c = km.models.conv4(20, seed=2)
    np.testing.assert_array_equal(a.predict(x, verbose=0), b.predict(x, verbose=0))
    assert not np.allclose(a.predict(x, verbose=0), c.predict(x, verbose=0))
    assert a(x).shape == (3, 20)
    wide = km.models.conv4(3, filters=8, dtype="float64")
    assert wide.count_params() == (
        _conv_params(1, 8) + 3 * _conv_params(8, 8) + 4 * 4 * 8 + 2 * 2 * 8 * 3 + 3
    )
    assert all(v.dtype == "float64" for v in wide.weights)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_way": 0}, r"`n_way` must be a positive integer\. Received: n_way=0"),
    ({"n_way": "5"}, r"`n_way` must be a positive integer\. Received: n_way='5'"),
    ({"n_way": True}, r"`n_way` must be a positive integer\. Received: n_way=True"),
    ({"n_way": 5, "downsampling": "avg_pool"},
     r"`downsampling` must be one of \['strided', 'max_pool'\]\. "
     r"Received: downsampling='avg_pool'"),
])
def test_conv4_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        km.models.conv4(**kwargs)


def test_mlp_sinusoid_network():
    model = km.models.mlp()
    assert model.input_shape == (None, 1) and model.output_shape == (None, 1)
    assert [layer.units for layer in model.layers] == [40, 40, 1]
    assert model.count_params() == (1 * 40 + 40) + (40 * 40 + 40) + (40 + 1) == 1761
    assert model.layers[0].activation is keras.activations.relu
    classifier = km.models.mlp(hidden_units=(16,), output_units=5, input_shape=(8,))
    assert classifier.output_shape == (None, 5)
    assert classifier.count_params() == 8 * 16 + 16 + 16 * 5 + 5
    x = np.linspace(-5, 5, 7, dtype="float32")[:, None]
    np.testing.assert_array_equal(km.models.mlp(seed=3)(x), km.models.mlp(seed=3)(x))
    assert all(v.dtype == "float64" for v in km.models.mlp(dtype="float64").weights)

