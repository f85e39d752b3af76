"""The seed script's recipe as written, for comparison: NumPy-normalised arrays straight into
`model.fit(x, y, epochs=5)` with Keras defaults. Only the data source differs: keras.datasets
downloads, so the same MNIST arrays come from the prepared TFDS dataset. Prints one JSON line."""

import json
import sys
import time

START = time.perf_counter()

import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

IMPORTED = time.perf_counter()


def load(split, data_dir):
    ds = tfds.load("mnist", split=split, as_supervised=True, batch_size=-1, data_dir=data_dir)
    x, y = tfds.as_numpy(ds)
    return x[..., 0], y


def main() -> None:
    data_dir = sys.argv[1] if len(sys.argv) > 1 else None
    data_start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = load("train", data_dir), load("test", data_dir)
    x_train, x_test = x_train / 255.0, x_test / 255.0
    data_seconds = time.perf_counter() - data_start

    model = tf.keras.models.Sequential(
        [
            tf.keras.layers.Flatten(input_shape=(28, 28)),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    fit_start = time.perf_counter()
    model.fit(x_train, y_train, epochs=5, verbose=2)
    fit_seconds = time.perf_counter() - fit_start
    evaluate_start = time.perf_counter()
    test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    print("Test accuracy:", test_accuracy)
    print(
        json.dumps(
            {
                "fit_seconds": fit_seconds,
                "test_accuracy": float(test_accuracy),
                "phases": {
                    "import": IMPORTED - START,
                    "data": data_seconds,
                    "fit": fit_seconds,
                    "evaluate": time.perf_counter() - evaluate_start,
                },
                "in_process_seconds": time.perf_counter() - START,
            }
        )
    )


if __name__ == "__main__":
    main()
