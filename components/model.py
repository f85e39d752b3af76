"""Model: the documented dense classifier, Flatten -> Dense(relu) -> Dense(10, softmax)."""

from __future__ import annotations

import keras

from components.data import IMAGE_SHAPE, NUM_CLASSES


def build_model(
    hidden_units: int = 128,
    learning_rate: float = 1e-3,
    dropout: float = 0.0,
    *,
    steps_per_execution: int = 1,
    jit_compile: bool | str = "auto",
) -> keras.Model:
    """Build and compile the model on float32 [N, 28, 28] inputs in [0, 1].

    With the defaults this is exactly the documented model (101,770 parameters). `dropout` > 0
    inserts a Dropout layer after the hidden layer (the tuner's search family).
    """
    layers = [
        keras.Input(shape=IMAGE_SHAPE, name="pixels"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(hidden_units, activation="relu", name="hidden"),
    ]
    if dropout > 0:
        layers.append(keras.layers.Dropout(dropout, name="dropout"))
    # The softmax is computed in float32 even under mixed precision, for a stable loss.
    layers.append(
        keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")
    )
    model = keras.Sequential(layers, name="mnist_dense")
    if jit_compile is True and dropout > 0:
        # Measured here: XLA on the CPU makes Dropout's random masks ~5x slower than no XLA.
        jit_compile = False
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
        jit_compile=jit_compile,
    )
    return model
