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


def train_feed(images, labels, *, first_epoch: int = 0, **options):
    """`host_batches`' training feed and the clock `fit` moves: (dataset, clock)."""
    clock = fitting.EpochClock(first_epoch)
    return fitting.host_batches(images, labels, BATCH, shuffle=True, clock=clock, **options), clock


def take(feed, batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`batches` batches as `fit` draws them: pass after pass, the clock on the next epoch before each (a
    dataset without one: a single pass)."""
    dataset, clock = feed if isinstance(feed, tuple) else (feed, None)
    taken = []
    while len(taken) < batches:
        taken += [(x.numpy().ravel(), y.numpy().ravel()) for x, y in dataset.take(batches - len(taken))]
        if clock is None:
            break
        clock.epoch += 1
    return taken


def epochs_of(batches) -> list[list[int]]:
    """The image indices of each epoch (3 batches: 4 + 4 + 2)."""
    flat = [batch for batch, _ in batches]
    return [np.concatenate(flat[i:i + 3]).tolist() for i in range(0, len(flat), 3)]


def test_each_epoch_is_every_image_once_with_its_label_and_a_partial_last_batch():
    batches = take(train_feed(*arrays(), seed=3), 12)
    assert [len(x) for x, _ in batches] == [4, 4, 2] * 4
    for x, y in batches:
        np.testing.assert_array_equal(y, x * 2)
    epochs = epochs_of(batches)
    assert all(sorted(order) == list(range(N)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 4  # a new order every epoch


def test_drop_remainder_trains_on_whole_batches_only_and_leaves_out_different_images_each_epoch():
    """A last batch of a few images puts their statistics into BN's moving averages with the weight of a whole
    batch (40% at quick.yaml's momentum 0.6): `train.drop_remainder` leaves it out."""
    images, labels = arrays()
    batches = take(train_feed(images, labels, seed=3, drop_remainder=True), 12)
    assert [len(x) for x, _ in batches] == [4] * 12
    for x, y in batches:
        np.testing.assert_array_equal(y, x * 2)
    epochs = [np.concatenate([x for x, _ in batches[i:i + 2]]).tolist() for i in range(0, 12, 2)]
    assert all(len(set(order)) == 8 for order in epochs)
    left_out = {tuple(sorted(set(range(N)) - set(order))) for order in epochs}
    assert len(left_out) > 1  # not the same two images missed every epoch
    resumed = take(train_feed(images, labels, seed=3, first_epoch=1, drop_remainder=True), 4)
    assert [x.tolist() for x, _ in resumed] == [x.tolist() for x, _ in batches[2:6]]
    validation = fitting.host_batches(images, labels, BATCH, shuffle=False, drop_remainder=True)
    assert epochs_of(take(validation, 100)) == [list(range(N))]  # validation is never cut


def test_the_order_of_an_epoch_depends_on_the_seed_and_the_epoch_alone():
    images, labels = arrays()
    run = epochs_of(take(train_feed(images, labels, seed=3), 9))
    again = epochs_of(take(train_feed(images, labels, seed=3), 9))
    resumed = epochs_of(take(train_feed(images, labels, seed=3, first_epoch=1), 6))
    other = epochs_of(take(train_feed(images, labels, seed=4), 9))
    assert run == again
    assert resumed == run[1:]  # a run resumed after epoch 1 goes on with epochs 2 and 3 of the uninterrupted one
    assert other != run


def test_validation_is_one_pass_in_order_and_autotuning_is_off():
    images, labels = arrays()
    validation = fitting.host_batches(images, labels, BATCH, shuffle=False)
    assert epochs_of(take(validation, 100)) == [list(range(N))]
    assert int(validation.cardinality()) == 3  # known up front: Keras need not run out of it to learn its length
    for dataset in (validation, train_feed(images, labels)[0]):
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


@pytest.mark.parametrize(("drop", "steps", "per_execution"), [(False, 3, 1), (True, 2, 1), (False, 3, 2)])
def test_fit_takes_the_steps_the_schedule_counts(drop, steps, per_execution):
    """180 training images at batch 64: 3 steps per epoch (the last of 52 images) or, dropping it, 2; the lr
    schedule is laid out over the same count, so a one-cycle run still ends at lr 0. Also with 2 steps per
    execution, which do not divide 3: Keras's last call of an epoch then runs 1 step, not 2 into the next epoch."""
    cfg = config.load("params/tiny.yaml", f"train.epochs=2 train.verbose=0 train.batch_size=64 "
                      f"train.schedule=onecycle train.drop_remainder={str(drop).lower()} "
                      f"train.steps_per_execution={per_execution}")
    dataset = data.make_synthetic(n_train=200, n_test=20, seed=0)
    splits = fitting.split_validation(dataset, 0.1, 0)
    assert len(splits[0]) == 180 and fitting.steps_per_epoch(cfg.train, 180) == steps
    model = fitting.compile_model(cfg, dataset, distribution("none"), len(splits[0]))
    fitting.fit(model, cfg, splits, len(dataset.class_names), [])
    assert int(model.optimizer.iterations) == 2 * steps
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.0, abs=1e-7)


class Recorder(keras.Model):
    """Keeps the images of every batch it trains on (eagerly), and learns nothing."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.seen = []

    def call(self, x):
        return self.dense(keras.ops.reshape(keras.ops.cast(x, "float32"), (-1, 1)))

    def train_step(self, data):
        self.seen.append(np.asarray(data[0]).ravel().tolist())
        return {"batches": keras.ops.convert_to_tensor(float(len(self.seen)))}


@pytest.mark.parametrize("per_execution", [1, 2])
def test_fit_trains_each_epoch_on_that_epochs_pass_and_resumes_in_step(per_execution):
    """Through Keras's `fit`, as `fitting.fit` calls it: epoch e trains on exactly the batches of epoch e's pass
    (every image once), with 1 or 2 steps per execution, and a run resumed at epoch 1 on those of epochs 1-2."""
    images, labels = arrays()

    def batches_seen(first_epoch: int) -> list:
        model = Recorder()
        model.compile(optimizer="sgd", loss="mse", run_eagerly=True, steps_per_execution=per_execution)
        dataset, clock = train_feed(images, labels, seed=3, first_epoch=first_epoch)
        model.fit(dataset, epochs=3, initial_epoch=first_epoch, callbacks=[clock], verbose=0, shuffle=False)
        return model.seen

    expected = [x.tolist() for x, _ in take(train_feed(images, labels, seed=3), 9)]
    assert batches_seen(0) == expected  # 3 batches per epoch: none skipped, none borrowed from the next epoch
    assert batches_seen(1) == expected[3:]


def test_no_whole_batch_is_a_param_error_naming_the_key():
    cfg = config.load("params/tiny.yaml", "train.batch_size=256 train.drop_remainder=true")
    with pytest.raises(config.ConfigError, match=r"^train.drop_remainder: the 200 training images make no whole"):
        fitting.steps_per_epoch(cfg.train, 200)
    assert fitting.steps_per_epoch(config.load("params/tiny.yaml", "train.batch_size=256").train, 200) == 1


def test_array_batches_for_other_backends_drop_the_remainder_too():
    """Keras's array feed cannot drop the partial batch: `ArrayBatches`, the feed of the JAX and torch backends, can."""
    images, labels = arrays()
    feed = fitting.ArrayBatches(images, labels, BATCH, shuffle=True, seed=0, drop_remainder=True)
    assert len(feed) == 2
    seen = []
    for _ in range(4):
        batches = [feed[i] for i in range(len(feed))]
        assert all(len(x) == BATCH and np.array_equal(y.ravel(), x.ravel() * 2) for x, y in batches)
        seen.append(sorted(np.concatenate([x for x, _ in batches]).ravel().tolist()))
        feed.on_epoch_end()
    assert all(len(set(order)) == 8 for order in seen) and len({tuple(order) for order in seen}) > 1
    assert len(fitting.ArrayBatches(images, labels, BATCH, shuffle=False)) == 3


def two_sided(n: int):
    """Image i is the pixel pair [i, 100 + i], so a mirrored one starts with 100 + i; its label is 2i."""
    images = np.stack([np.arange(n), 100 + np.arange(n)], axis=1).astype(np.uint8).reshape(n, 1, 2, 1)
    return images, np.arange(n, dtype=np.float32)[:, None] * 2


def mirrored_by_epoch(batches: list, per_epoch: int) -> list[dict[int, bool]]:
    """{image: mirrored} for each epoch of `per_epoch` batches, checking that each image keeps its label."""
    epochs = []
    for start in range(0, len(batches), per_epoch):
        seen = {}
        for x, y in batches[start:start + per_epoch]:
            pairs = x.reshape(-1, 2)
            index = pairs.min(axis=1)
            np.testing.assert_array_equal(y.ravel(), index * 2)
            seen.update(zip(index.tolist(), (pairs[:, 0] >= 100).tolist(), strict=True))
        epochs.append(seen)
    return epochs


def assert_alternating(epochs: list[dict[int, bool]], n: int) -> None:
    assert all(sorted(seen) == list(range(n)) for seen in epochs)  # every image once per epoch
    assert 0 < sum(epochs[0].values()) < n  # the first epoch mirrors some at random, not all or none
    for before, after in zip(epochs, epochs[1:], strict=False):
        assert all(after[i] != before[i] for i in range(n))  # the next epoch mirrors exactly the others


def test_alternate_flip_mirrors_each_image_the_other_way_every_epoch_and_resumes_in_step():
    """airbench's alternating flip: random mirroring in the first epoch, then each image the opposite way to the
    epoch before, so any two epochs show it both ways (random flips leave 1 image in 4 one way in both)."""
    images, labels = two_sided(N)
    feed = train_feed(images, labels, seed=3, alternate_flip=True)
    batches = take(feed, 12)
    epochs = mirrored_by_epoch(batches, 3)
    assert_alternating(epochs, N)
    resumed = take(train_feed(images, labels, seed=3, first_epoch=1, alternate_flip=True), 6)
    assert [x.tolist() for x, _ in resumed] == [x.tolist() for x, _ in batches[3:9]]
    other = mirrored_by_epoch(take(train_feed(*two_sided(40), seed=4, alternate_flip=True), 10), 10)
    assert other[0] != mirrored_by_epoch(take(train_feed(*two_sided(40), seed=3, alternate_flip=True), 10), 10)[0]
    validation = fitting.host_batches(images, labels, BATCH, shuffle=False, alternate_flip=True)
    assert not any(mirrored_by_epoch(take(validation, 100), 3)[0].values())  # validation images are never flipped
    plain = mirrored_by_epoch(take(train_feed(images, labels, seed=3), 6), 3)
    assert not any(any(seen.values()) for seen in plain)  # without it the feed leaves flips to the model


def test_array_batches_alternate_flips_as_the_tensorflow_feed_does():
    images, labels = two_sided(N)
    feed = fitting.ArrayBatches(images, labels, BATCH, shuffle=True, seed=3, alternate_flip=True)
    batches = []
    for _ in range(4):
        batches += [feed[i] for i in range(len(feed))]
        feed.on_epoch_end()
    epochs = mirrored_by_epoch(batches, 3)
    assert_alternating(epochs, N)
    tf_feed = mirrored_by_epoch(take(train_feed(images, labels, seed=3, alternate_flip=True), 3), 3)
    assert epochs[0] == tf_feed[0]  # the same images mirrored first, whatever the backend
    resumed = fitting.ArrayBatches(images, labels, BATCH, shuffle=True, seed=3, alternate_flip=True, first_epoch=2)
    assert [x.tolist() for x, _ in (resumed[i] for i in range(3))] == [x.tolist() for x, _ in batches[6:9]]
