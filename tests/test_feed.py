"""The training feed on TensorFlow (`fitting.host_batches`): every image once per epoch, in an order that depends
on the seed and the epoch alone (so a resumed run sees the batches the uninterrupted one saw), and tf.data's
autotuning off (with it on, each destroyed iterator can stall for the autotuner's sleep: Keras's array feed made
`fit` 1.24x as long on 2 cores, bench/results/feed.md)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from pipeline import config, data, fitting
from pipeline.distribute import distribution

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the feed of the TensorFlow backend")

N, BATCH = 10, 4  # batches of 4, 4 and 2 per epoch


def arrays():
    images = np.arange(N, dtype=np.uint8).reshape(N, 1, 1, 1)
    labels = np.arange(N, dtype=np.float32)[:, None] * 2
    return images, labels


def take(dataset, batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy().ravel(), y.numpy().ravel()) for x, y in dataset.take(batches)]


def epochs_of(batches) -> list[list[int]]:
    """The image indices of each epoch (3 batches: 4 + 4 + 2)."""
    flat = [batch for batch, _ in batches]
    return [np.concatenate(flat[i:i + 3]).tolist() for i in range(0, len(flat), 3)]


def test_each_epoch_is_every_image_once_with_its_label_and_a_partial_last_batch():
    batches = take(fitting.host_batches(*arrays(), BATCH, shuffle=True, seed=3), 12)
    assert [len(x) for x, _ in batches] == [4, 4, 2] * 4
    for x, y in batches:
        np.testing.assert_array_equal(y, x * 2)
    epochs = epochs_of(batches)
    assert all(sorted(order) == list(range(N)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 4  # a new order every epoch


def test_the_order_of_an_epoch_depends_on_the_seed_and_the_epoch_alone():
    images, labels = arrays()
    run = epochs_of(take(fitting.host_batches(images, labels, BATCH, shuffle=True, seed=3), 9))
    again = epochs_of(take(fitting.host_batches(images, labels, BATCH, shuffle=True, seed=3), 9))
    resumed = epochs_of(take(fitting.host_batches(images, labels, BATCH, shuffle=True, seed=3, first_epoch=1), 6))
    other = epochs_of(take(fitting.host_batches(images, labels, BATCH, shuffle=True, seed=4), 9))
    assert run == again
    assert resumed == run[1:]  # a run resumed after epoch 1 goes on with epochs 2 and 3 of the uninterrupted one
    assert other != run


def test_validation_is_one_pass_in_order_and_autotuning_is_off():
    images, labels = arrays()
    validation = fitting.host_batches(images, labels, BATCH, shuffle=False)
    assert epochs_of(take(validation, 100)) == [list(range(N))]
    assert int(validation.cardinality()) == 3  # known up front: Keras need not run out of it to learn its length
    for dataset in (validation, fitting.host_batches(images, labels, BATCH, shuffle=True)):
        assert dataset.options().autotune.enabled is False


def test_fit_through_the_feed_warns_of_nothing():
    """Keras warned twice per run of this feed: that it ignores `shuffle` and that the input "ran out of data;
    interrupting training" (the validation pass of unknown length): noise a user reads as a fault."""
    cfg = config.load("params/tiny.yaml", "train.epochs=2 train.verbose=0 train.steps_per_execution=2")
    dataset = data.make_synthetic(n_train=200, n_test=20, seed=0)
    splits = fitting.split_validation(dataset, 0.1, 0)
    model = fitting.compile_model(cfg, dataset, distribution("none"), len(splits[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fitting.fit(model, cfg, splits, len(dataset.class_names), [])
    assert len(history.history["val_loss"]) == 2
    assert not [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
