"""Reference backbones used by the papers and the examples."""

import keras

from keras_meta.validation import check_positive_int


def mlp(
    hidden_units=(40, 40),
    output_units=1,
    input_shape=(1,),
    activation="relu",
    dtype=None,
    seed=None,
    name="mlp",
):
    """The MAML sinusoid network: a built, fully connected Sequential model.

    Args:
        hidden_units: sizes of the hidden layers (MAML: 40, 40).
        output_units: size of the linear output layer.
        input_shape: shape of one input example.
        activation: activation of the hidden layers.
        dtype: layer dtype (e.g. `"float64"` for gradient checks).
        seed: seed of the Glorot-uniform kernel initialiser (reproducible
            initial weights); `None` draws fresh ones.
        name: model name.

    Returns:
        A built `keras.Sequential` model.

    Example:

    >>> model = mlp()
    >>> model.count_params()
    1761
    """
    hidden_units = [check_positive_int("hidden_units", units) for units in hidden_units]
    output_units = check_positive_int("output_units", output_units)
    layers = [keras.Input(shape=input_shape, dtype=dtype)]
    for i, units in enumerate(hidden_units):
        layers.append(
            keras.layers.Dense(
                units,
                activation=activation,
                dtype=dtype,
                kernel_initializer=_glorot(seed, i),
                name=f"dense_{i}",
            )
        )
    layers.append(
        keras.layers.Dense(
            output_units,
            dtype=dtype,
            kernel_initializer=_glorot(seed, len(hidden_units)),
            name="output",
        )
    )
    return keras.Sequential(layers, name=name)


def _glorot(seed, offset):
    if seed is None:
        return "glorot_uniform"
    return keras.initializers.GlorotUniform(seed=seed * 1000 + offset)


def conv4(
    n_way,
    filters=64,
    input_shape=(28, 28, 1),
    downsampling="strided",
    dtype=None,
    seed=None,
    name="conv4",
):
    """The 4-block convolutional backbone of MAML's few-shot experiments.

    Four blocks of [3x3 convolution, BatchNorm, ReLU], downsampling by
    stride-2 convolutions (`"strided"`, MAML's Omniglot network, 28x28 ->
    2x2) or by 2x2 max-pooling after each block (`"max_pool"`, MAML's
    mini-ImageNet network, used there with 32 filters), then flatten and a
    dense head with `n_way` logits (pair it with
    `SparseCategoricalCrossentropy(from_logits=True)`).

    Args:
        n_way: number of classes (logits).
        filters: convolution filters per block (64 Omniglot, 32 mini-ImageNet).
        input_shape: shape of one image, channels last.
        downsampling: `"strided"` or `"max_pool"`.
        dtype: layer dtype (e.g. `"float64"` for gradient checks).
        seed: seed of the Glorot-uniform initialisers; `None` draws fresh ones.
        name: model name.

    Returns:
        A built functional `keras.Model`; the head is its last layer
        (named `"head"`).

    Example:

    >>> model = conv4(5)
    >>> model.output_shape
    (None, 5)

    Reference:
        - [Finn, Abbeel, Levine, 2017](https://arxiv.org/abs/1703.03400)
    """
    if downsampling not in ("strided", "max_pool"):
        raise ValueError(
            "`downsampling` must be one of ['strided', 'max_pool']. "
            f"Received: downsampling={downsampling!r}"
        )
    n_way = check_positive_int("n_way", n_way)
    filters = check_positive_int("filters", filters)
    inputs = keras.Input(shape=input_shape, dtype=dtype)
    h = inputs
    for block in range(4):
        h = keras.layers.Conv2D(
            filters,
            3,
            strides=2 if downsampling == "strided" else 1,
            padding="same",
            kernel_initializer=_glorot(seed, block),
            dtype=dtype,
            name=f"conv{block}",
        )(h)
        h = keras.layers.BatchNormalization(dtype=dtype, name=f"bn{block}")(h)
        h = keras.layers.ReLU(dtype=dtype, name=f"relu{block}")(h)
        if downsampling == "max_pool":
            h = keras.layers.MaxPooling2D(2, dtype=dtype, name=f"pool{block}")(h)
    h = keras.layers.Flatten(dtype=dtype, name="flatten")(h)
    outputs = keras.layers.Dense(
        n_way, kernel_initializer=_glorot(seed, 4), dtype=dtype, name="head"
    )(h)
    return keras.Model(inputs, outputs, name=name)
