"""Reference backbones used by the papers and the examples."""

import keras


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
