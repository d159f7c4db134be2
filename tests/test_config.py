"""Params: the seed recipe is the default, variants layer on it, bad values name their key."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest

from pipeline import config


def test_default_is_the_seed_recipe():
    cfg = config.load()
    assert (cfg.model.block, cfg.model.units_per_stage, cfg.model.widths) == ("bottleneck", 18, (64, 128, 256))
    assert (cfg.model.strides, cfg.model.stem_filters, cfg.model.l2) == ((1, 2, 2), 16, 1e-4)
    assert cfg.model.depth == 164
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.momentum) == (150, 128, 0.1, 0.9)
    assert (t.schedule, t.boundary_epochs, t.lr_decay, t.warmup) == ("step", (80, 120), 0.1, 0.0)
    # every trick from the fast CIFAR-10 recipes is off in the seed recipe
    assert (cfg.model.arch, cfg.model.bn_momentum, cfg.model.zero_init_residual) == ("preact", 0.99, False)
    assert (cfg.model.l2_norm_and_bias, t.ema, t.nesterov, t.label_smoothing) == (False, False, False, 0.0)
    assert (t.lr_scaling, t.precision, cfg.evaluate.tta) == ("none", "float32", "none")
    assert (t.shift, t.shift_fill, t.flip, t.cutout, t.validation_fraction) == (0.125, "nearest", True, 0, 0.0)
    assert t.drop_remainder is False  # the seed's feed ends each epoch with its partial batch
    assert t.validation_seed is None  # train.seed draws the held-out images (none with validation_fraction 0)
    assert cfg.data.source == "cifar10"
    assert cfg.register.model_name == "cifar10-resnet" and cfg.register.alias == "champion"


@pytest.mark.parametrize(("path", "depth"), [("params/resnet20.yaml", 20), ("params/resnet56.yaml", 56),
                                             ("params/resnet110.yaml", 110), ("params/resnet1001.yaml", 1001),
                                             ("params/quick.yaml", 9), ("params/tiny.yaml", 11),
                                             ("params/fast.yaml", 9), ("params/improved.yaml", 164)])
def test_variants_layer_on_the_default(path, depth):
    cfg = config.load(path)
    assert cfg.model.depth == depth
    assert cfg.train.momentum == 0.9  # untouched keys keep the seed's value


def test_overrides_are_dotted_yaml_values():
    cfg = config.load("params/resnet20.yaml", "train.batch_size=256 model.widths=[32,64,128] train.lr_scaling=linear "
                                              "train.epochs=5")
    assert cfg.train.batch_size == 256 and cfg.model.widths == (32, 64, 128)
    assert cfg.train.scaled_lr == pytest.approx(0.2)
    assert cfg.run_name() == "resnet20-e5-b256-lr0.2"


@pytest.mark.parametrize(("epochs", "expected"), [(150, (80, 120)), (30, (16, 24)), (300, (160, 240)), (5, (3, 4))])
def test_lr_boundaries_follow_epochs(epochs, expected):
    assert config.load(None, f"train.epochs={epochs}").train.boundary_epochs == expected


@pytest.mark.parametrize(("epochs", "boundaries", "expected"), [
    (5, "[0.3,0.5]", (2, 3)),  # 1.5 and 2.5 both up: was refused as "they round to epochs [2, 2]"
    (7, "[0.5]", (4,)), (5, "[0.5]", (3,)),  # 3.5 and 2.5 alike (was 4 and 2)
    (55, "[3/22]", (8,)),  # 3/22 * 55 is 7.499999999999999 in floats: a half still
])
def test_boundary_epochs_round_halves_up_at_any_length(epochs, boundaries, expected):
    """Python's round() rounds halves to even: 0.5 of 5 epochs decayed after epoch 2, of 7 after epoch 4."""
    t = config.load(None, f"train.epochs={epochs} train.lr_boundaries={boundaries}").train
    assert t.boundary_epochs == expected


def test_boundaries_accept_fractions_and_refuse_absolute_epochs():
    assert config.load(None, "train.lr_boundaries=[0.5,0.75]").train.boundary_epochs == (75, 113)
    with pytest.raises(config.ConfigError, match=r"^train.lr_boundaries: are now fractions.*\[80/150, 120/150\]"):
        config.load(None, "train.lr_boundaries=[80,120]")


def test_absolute_boundaries_past_a_shorter_run_get_no_fractions_over_1_to_write(tmp_path):
    """A params file of the old format run shorter (`-P epochs=30`, as the README runs resnet56.yaml) was told to
    write its [80, 120] as [80/30, 120/30], which the same check refuses: fractions must be under 1."""
    (tmp_path / "old.yaml").write_text("train:\n  epochs: 150\n  lr_boundaries: [80, 120]\n")
    with pytest.raises(config.ConfigError) as err:
        config.load_from_cli(str(tmp_path / "old.yaml"), "", epochs="30")
    assert str(err.value) == ("train.lr_boundaries: are now fractions of train.epochs in (0, 1), got epochs [80, 120], "
                              "not all within the run's 30; write each as the fraction of train.epochs after which the "
                              "lr decays (the seed's 80 and 120 of 150 epochs are [80/150, 120/150])")
    with pytest.raises(config.ConfigError, match=r"got epochs \[16, 24\]; write them as e\.g\. \[16/30, 24/30\] "):
        config.load_from_cli(str(tmp_path / "old.yaml"), "train.lr_boundaries=[16,24]", epochs="30")


def test_boundaries_that_fall_outside_the_run_are_refused():
    # a boundary that rounds onto the first or last epoch cannot take effect inside the run
    for override in ("train.epochs=1", "train.epochs=2 train.lr_boundaries=[0.1]",
                     "train.epochs=10 train.lr_boundaries=[0.5,0.52]"):
        with pytest.raises(config.ConfigError, match="^train.lr_boundaries: must fall on distinct epochs"):
            config.load(None, override)
    # cosine and onecycle have no boundaries, so any length is fine
    assert config.load(None, "train.epochs=1 train.schedule=cosine").train.epochs == 1


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_boundaries_a_schedule_does_not_use_do_not_stop_its_run(tmp_path, schedule):
    """An old params file's absolute [80, 120] with cosine set by override was refused as absolute epochs, and
    [0.5, 0.52] at 10 epochs as falling on one epoch, though cosine and onecycle never read the boundaries."""
    (tmp_path / "old.yaml").write_text("train:\n  epochs: 150\n  lr_boundaries: [80, 120]\n")
    cfg = config.load_from_cli(str(tmp_path / "old.yaml"), f"train.schedule={schedule}", epochs="30")
    assert (cfg.train.schedule, cfg.train.lr_boundaries, cfg.train.epochs) == (schedule, (80, 120), 30)
    assert config.load(None, f"train.schedule={schedule} train.epochs=10 train.lr_boundaries=[0.5,0.52]").train
    # the step schedule's checks stay as they were
    with pytest.raises(config.ConfigError, match=r"^train.lr_boundaries: are now fractions"):
        config.load_from_cli(str(tmp_path / "old.yaml"), "train.schedule=step", epochs="30")


@pytest.mark.parametrize(("epochs", "boundaries", "fewest"), [
    (1, "[80/150, 120/150]", 4), (2, "[80/150, 120/150]", 4), (3, "[80/150, 120/150]", 4),  # the seed's, smoke-tested
    (5, "[0.3, 0.45]", 6),  # 4 fits them, 5 not: from 6 on every length does
    (10, "[0.5, 0.52]", 50), (2, "[0.1]", 5)])
def test_boundaries_a_run_is_too_short_for_say_what_would_run(epochs, boundaries, fewest):
    """`-P epochs=2` on the seed recipe was refused "(they round to epochs [1, 2])" and no more: the refusal now gives
    the fewest epochs from which on the boundaries fit, and the overrides that make a run of this length work."""
    given = [f"train.epochs={epochs}", f"train.lr_boundaries={boundaries}"]
    with pytest.raises(config.ConfigError, match="^train.lr_boundaries: must fall on distinct epochs") as err:
        config.load(None, given)
    assert f"; these need train.epochs >= {fewest}; for a run of {epochs} set train.schedule=cosine " in str(err.value)
    (suggested,) = re.findall(r"train\.lr_boundaries=\[[^]]*\]$", str(err.value))
    decays = config.load(None, [*given, suggested]).train.boundary_epochs  # as many decays as the run has room for
    assert len(decays) == min(boundaries.count(",") + 1, epochs - 1), (suggested, decays)
    assert config.load(None, [*given, "train.schedule=cosine"]).train.schedule == "cosine"
    assert all(config.load(None, [f"train.epochs={n}", given[1]]) for n in range(fewest, fewest + 200))
    with pytest.raises(config.ConfigError):
        config.load(None, [f"train.epochs={fewest - 1}", given[1]])


def test_exponent_without_a_dot_is_a_number():
    assert config.load(None, "train.lr=1e-3 model.l2=5e-4").train.lr == pytest.approx(1e-3)
    assert config.load(None, "train.lr=1/8").train.lr == 0.125


def test_cli_shortcuts_and_empty_values():
    cfg = config.load_from_cli("", "", epochs="7", data="synthetic")
    assert cfg.train.epochs == 7 and cfg.data.source == "synthetic"
    assert config.load_from_cli("", "", epochs="", data="").train.epochs == 150
    # a shortcut and an override of the same key: the same value is fine, two values are refused (the shortcut won)
    assert config.load_from_cli("", "train.epochs=010", epochs="10").train.epochs == 10
    with pytest.raises(config.ConfigError, match=r"^train.epochs: -P epochs=30 and overrides' train.epochs=10 "
                                                 r"disagree; give one$"):
        config.load_from_cli("", "train.epochs=10", epochs="30")
    # said so even where the overrides' value would not load on its own: it was refused for default.yaml's
    # lr_boundaries at 3 epochs, a run of 30 asked for
    with pytest.raises(config.ConfigError, match=r"^train.epochs: -P epochs=30 and overrides' train.epochs=3 "):
        config.load_from_cli("", "train.epochs=3", epochs="30")



def test_values_are_read_by_their_keys_type_not_as_yaml_1_1():
    """A path or a name stays as typed (YAML cut `run #2` at its comment, read `0755` as octal 493 and
    `team: cifar` as a mapping); an integer is base 10 (YAML 1.1 read `010` as 8 and `1:30` as 90)."""
    cfg = config.load_from_cli("", "tracking.experiment=0755 train.lr=010", epochs="010", data="/tmp/run #2/x.npz")
    assert (cfg.train.epochs, cfg.data.source, cfg.tracking.experiment, cfg.train.lr) == (
        10, "/tmp/run #2/x.npz", "0755", 10.0)
    for epochs in ("1:30", "0x10"):
        with pytest.raises(config.ConfigError, match=f"^train.epochs: must be an integer, got '{epochs}'"):
            config.load_from_cli("", "", epochs=epochs)
    # a list's integers too, as in a params file: `[064, 128, 256, 512]` trained widths 52, 128, 256, 512
    assert config.load("params/fast.yaml", "model.widths=[064,128,256,512]").model.widths == (64, 128, 256, 512)
    with pytest.raises(config.ConfigError, match=r"^model.widths: must be an integer, got '1:30'"):
        config.load(None, "model.widths=[1:30, 32, 64]")
    # what a run logged comes back as it was (resume, -P dataset_uri), a JSON-quoted string unquoted (sweep specs)
    back = config.from_run_params({"tracking.experiment": "exp #3", "data.source": "team: cifar", "train.epochs": "7"})
    assert (back.tracking.experiment, back.data.source, back.train.epochs) == ("exp #3", "team: cifar", 7)
    quoted = config.load(None, ['tracking.experiment="my runs"', "train.jit_compile=True"])
    assert (quoted.tracking.experiment, quoted.train.jit_compile) == ("my runs", True)


def test_a_runs_logged_values_that_hold_quotes_come_back_as_they_were(tmp_path, monkeypatch):
    """A run's params are logged as the values are (`Config.flat`), no quotes added: a value that holds its own
    quotes (`tracking.experiment: "'baseline'"`) was unquoted when read back, so train -P dataset_uri=... (whose
    params are rebuilt with the dataset's data.* params) logged into experiment `baseline`, another one."""
    from pipeline import inputs

    params = tmp_path / "quoted.yaml"
    for experiment in ('"v2"', "'a' 'b'", "'baseline'"):
        params.write_text(f"tracking:\n  experiment: {json.dumps(experiment)}\n")
        cfg = config.load(params)
        assert cfg.tracking.experiment == experiment
        assert config.from_run_params(cfg.flat()) == cfg
    monkeypatch.setattr(inputs.prepare, "dataset_params", lambda uri: {"data.source": "synthetic"})
    assert inputs.with_dataset_params(cfg, "runs:/0123/dataset/dataset.npz").tracking.experiment == "'baseline'"


def test_an_unbalanced_quote_or_a_binary_params_file_is_one_line(tmp_path):
    with pytest.raises(config.ConfigError, match=r"^overrides: No closing quotation in \"register.model_name=it's\"$"):
        config.load_from_cli("", "register.model_name=it's")
    (tmp_path / "weights.npz").write_bytes(b"PK\x03\x04\x93\xff\x00")
    with pytest.raises(config.ConfigError, match=r"^params: .*weights.npz is not a YAML text file"):
        config.load_from_cli(str(tmp_path / "weights.npz"), "")

def test_a_params_file_is_read_as_utf_8_whatever_the_locale(tmp_path):
    """YAML is UTF-8: a params file was decoded in the locale's encoding, so under a Latin-1 locale
    `experiment: café` named the experiment 'cafÃ©', and under an ASCII one (LC_ALL=C, PYTHONUTF8=0) the file was
    refused as 'not UTF-8 text'. In a process of its own, in the ASCII locale."""
    import subprocess
    import sys

    (tmp_path / "p.yaml").write_bytes("tracking:\n  experiment: café  # naïve\n".encode())
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(config.PROJECT_ROOT)}
    script = "import sys; from pipeline import config; print(ascii(config.load(sys.argv[1]).tracking.experiment))"
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "p.yaml")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, ascii("café")), result.stderr


def test_a_params_file_the_system_cannot_open_is_one_line(tmp_path):
    """Only a missing file or a folder was one line: a path through a file (`params/quick.yaml/x.yaml`), a name
    longer than the file system takes, or another user's file (EACCES) was an OSError's traceback."""
    (tmp_path / "p.yaml").write_text("train:\n  epochs: 3\n")
    with pytest.raises(config.ConfigError, match=r"^params: file not found: .*p\.yaml/x\.yaml$"):
        config.load(tmp_path / "p.yaml" / "x.yaml")
    long = tmp_path / ("p" * 300 + ".yaml")  # over NAME_MAX (255) on every file system the project runs on
    with pytest.raises(config.ConfigError, match=r"^params: cannot read .*pppp\.yaml: File name too long$"):
        config.load(long)
    with pytest.raises(config.ConfigError, match=r"^spec: cannot read .*pppp\.yaml: File name too long$"):
        config.read_yaml(long, key="spec")  # a sweep's spec, read by the same reader


def test_validation_seed_null_leaves_the_held_out_images_to_train_seed():
    """train.validation_seed null (default.yaml's): train.seed draws the held-out images, as it did before the key,
    in every params file (quick.yaml's were measured over train.seed 0, 1 and 2, each drawing its own); set, it
    alone draws them. Logged as 'null' and read back from a run's params, or from a run logged before the key."""
    for path in (None, "params/quick.yaml", "params/tiny.yaml", "params/fast.yaml"):
        cfg = config.load(path)
        assert cfg.train.validation_seed is None and cfg.train.held_out_seed == cfg.train.seed == 0, path
        assert config.load(path, "train.seed=2").train.held_out_seed == 2, path
    cfg = config.load("params/quick.yaml", "train.seed=2 train.validation_seed=0")
    assert (cfg.train.seed, cfg.train.held_out_seed) == (2, 0)
    assert config.load("params/quick.yaml", "train.validation_seed=4294967295").train.held_out_seed == 2**32 - 1
    with pytest.raises(config.ConfigError, match=r"^train.validation_seed: draws the held-out images, and "
                                                 r"train.validation_fraction 0 holds none out"):
        config.load("params/quick.yaml", "train.validation_seed=0 train.validation_fraction=0")
    assert cfg.flat()["train.validation_seed"] == "0" and config.load().flat()["train.validation_seed"] == "null"
    for logged in (cfg, config.load(None, "train.seed=3")):
        assert config.from_run_params(logged.flat()) == logged
    before = {k: v for k, v in config.load(None, "train.seed=3").flat().items() if k != "train.validation_seed"}
    assert config.from_run_params(before).train.held_out_seed == 3


def test_a_held_out_split_that_rounds_to_no_image_is_refused_not_raised_to_one():
    """0.001 of 200 synthetic training images is 0.2 of an image: one was held out all the same, its val_acc 0 or 1.
    Refused before any data is read, naming the fraction that holds out one; 1/200 holds out that one."""
    from pipeline import inputs

    cfg = config.load(None, "data.source=synthetic data.synthetic_train=200 train.validation_fraction=0.001")
    with pytest.raises(config.ConfigError) as err:
        inputs.check_known_training_images(cfg)
    assert str(err.value) == (
        "train.validation_fraction: 0.001 of the 200 training images rounds to no image held out; give at least "
        "1/200 (0.005) to hold one out (more for a val_acc worth reading), or 0 to validate on the test split")
    assert config.held_out_images(1 / 200, 200) == 1 and config.held_out_images(0.1, 1024) == 102
    assert config.held_out_images(0, 200) == 0


def test_flat_params_are_the_strings_mlflow_stores():
    flat = config.load().flat()
    assert flat["train.lr_boundaries"] == "[0.5333333333333333, 0.8]"
    assert flat["train.flip"] == "true" and flat["model.l2"] == "0.0001"
    assert all(isinstance(v, str) for v in flat.values())


@pytest.mark.parametrize(("override", "key"), [
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=-4", "train.batch_size"),
    ("train.lr=0", "train.lr"),
    ("train.lr=abc", "train.lr"),
    ("train.lr=-0.1", "train.lr"),
    ("train.momentum=1", "train.momentum"),
    ("train.lr_boundaries=[0.8,0.5]", "train.lr_boundaries"),
    ("train.lr_boundaries=[0,0.5]", "train.lr_boundaries"),
    ("train.lr_boundaries=[0.5,1.5]", "train.lr_boundaries"),
    ("train.schedule=linear", "train.schedule"),
    ("train.warmup=1", "train.warmup"),
    ("train.ema=maybe", "train.ema"),
    ("train.ema_momentum=1", "train.ema_momentum"),
    ("train.ema_bn_batches=-1", "train.ema_bn_batches"),
    ("model.arch=vgg", "model.arch"),
    ("model.arch=resnet9 model.widths=[16,32,64]", "model.widths"),
    # preact's keys, which resnet9 does not use: a misspelt value was accepted and logged, refused once arch changed
    ("model.arch=resnet9 model.widths=[8,8,8,8] model.block=basik", "model.block"),
    ("model.arch=resnet9 model.widths=[8,8,8,8] model.units_per_stage=0", "model.units_per_stage"),
    ("model.arch=resnet9 model.widths=[8,8,8,8] model.strides=[1,3,2]", "model.strides"),
    ("model.arch=resnet9 model.widths=[8,8,8,8] model.stem_filters=0", "model.stem_filters"),
    ("model.bn_momentum=1", "model.bn_momentum"),
    ("model.zero_init_residual=1", "model.zero_init_residual"),
    ("model.conv_init=xavier", "model.conv_init"),
    ("evaluate.tta=crop", "evaluate.tta"),
    ("evaluate.tta=shift", "evaluate.tta"),
    ("train.shift=0.7", "train.shift"),
    ("train.shift_fill=wrap", "train.shift_fill"),
    ("train.cutout=32", "train.cutout"),
    ("train.cutout=-1", "train.cutout"),
    ("train.cutout=0.25", "train.cutout"),
    ("train.precision=float8", "train.precision"),
    ("train.distribute=tpu", "train.distribute"),
    ("train.steps_per_execution=0", "train.steps_per_execution"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("train.feed=gpu", "train.feed"),
    ("train.flip=maybe", "train.flip"),
    ("train.drop_remainder=1", "train.drop_remainder"),
    ("train.validation_fraction=1", "train.validation_fraction"),
    ("model.block=dense", "model.block"),
    ("model.units_per_stage=0", "model.units_per_stage"),
    ("model.widths=[10,20,30]", "model.widths"),
    ("model.strides=[1,2]", "model.strides"),
    ("model.l2=-1", "model.l2"),
    ("data.max_train=-1", "data.max_train"),
    ("data.source=", "data.source"),
    ("evaluate.samples=0", "evaluate.samples"),
    ("register.alias=v1", "register.alias"),
    ("register.alias=Latest", "register.alias"),  # MLflow reserves it: refused before training, not after
    ("register.alias=" + "a" * 256, "register.alias"),
    ("register.alias=best!", "register.alias"),
    ("register.model_name=a/b", "register.model_name"),
    ("register.model_name=\"it's\"", "register.model_name"),  # a quote breaks MLflow's search filters
    ("register.model_name=" + "a" * 257, "register.model_name"),  # PostgreSQL refused it after training
    ("register.model_name='my model '", "register.model_name"),  # another model than "my model", shown alike
    ("tracking.experiment=" + "e" * 501, "tracking.experiment"),  # MLflow's traceback as the first run opened
    ("tracking.experiment=" + "e" * 257, "tracking.experiment"),  # PostgreSQL's column holds 256
    ("train.batch_size=" + str(2**63), "train.batch_size"),  # the train step's OverflowError, its run FAILED
    ("evaluate.batch_size=1" + "0" * 20, "evaluate.batch_size"),
    ("model.widths=[16, 32, 1" + "0" * 20 + "]", "model.widths"),
    ("train.steps_per_execution=2147483648", "train.steps_per_execution"),  # trained no step, then a traceback
    ("train.seed=-1", "train.seed"),
    ("train.seed=4294967296", "train.seed"),
    ("data.seed=-1", "data.seed"),
    ("train.validation_seed=-1", "train.validation_seed"),
    ("train.validation_seed=4294967296", "train.validation_seed"),
    ("train.validation_seed=first", "train.validation_seed"),
    ("train.validation_seed=0.5", "train.validation_seed"),
    ("train.validation_seed=0", "train.validation_seed"),  # with validation_fraction 0 it would draw nothing
    ("train.lr=.inf", "train.lr"),
    ("train.lr=1e400", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("register.model_name=it's", "overrides"),  # an unbalanced quote
    ("train.learning_rate=0.1", "train.learning_rate"),
    ("optimizer.lr=0.1", "optimizer"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, override)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["synthetic_train", "synthetic_test"])
def test_a_synthetic_dataset_too_large_to_generate_is_refused_naming_its_key(key):
    """data.synthetic_train=100000000 went on to prepare, which died on NumPy's traceback: "Unable to allocate 2.24 TiB
    for an array with shape (100000000, 32, 32, 3) and data type float64" (a smaller excess took all the memory)."""
    assert getattr(config.load(None, f"data.{key}=100000").data, key) == 100000
    with pytest.raises(config.ConfigError) as err:
        config.load(None, f"data.{key}=100000000")
    assert str(err.value) == (f"data.{key}: must be at most 100000 (twice CIFAR-10's 50,000 training images: a "
                              f"generated dataset is made in memory, about 25 KB an image), got 100000000")


def test_a_value_or_overrides_longer_than_mlflow_keeps_of_a_param_is_refused():
    """A train.lr_boundaries of 999 fractions (7,884 characters) trained under a param MLflow cut to 6,000 characters
    with a warning ("is truncated to 6000 characters to meet the length limit"): the run's params no longer said what
    it trained with. The overrides string, which is logged whole too, is held to the same length."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    assert MAX_PARAM_VAL_LENGTH == config.MLFLOW_PARAM_MAX
    long = "[" + ", ".join(str(i / 10000) for i in range(1, 1000)) + "]"
    with pytest.raises(config.ConfigError) as err:
        config.load(None, ["train.epochs=10000", f"train.lr_boundaries={long}"])
    assert str(err.value) == ("train.lr_boundaries: 7884 characters, more than the 6000 MLflow keeps of a param "
                              "value (it would be logged cut short); shorten it")
    spaced = "train.lr=0.1" + " " * 6000
    with pytest.raises(config.ConfigError) as err:
        config.load(None, spaced)
    assert str(err.value) == ("overrides: 6012 characters, more than the 6000 MLflow keeps of a param value (it "
                              "would be logged cut short); shorten them")
    assert config.load(None, "train.lr=0.1" + " " * 5988).train.lr == 0.1


def test_integers_are_64_bit_as_numpy_and_tensorflow_hold_them():
    """`train.batch_size=1e20` spelt out loaded, then failed the train step (a traceback, OverflowError from tf.data)
    and left its run FAILED: an integer param past 64 bits is refused with the params, naming its key."""
    assert config.load(None, f"train.batch_size={2**63 - 1}").train.batch_size == 2**63 - 1
    with pytest.raises(config.ConfigError, match=r"^train\.batch_size: must be an integer in \[-2\*\*63, 2\*\*63\) "
                                                 r"\(64 bits\), got '9223372036854775808'$"):
        config.load(None, f"train.batch_size={2**63}")
    with pytest.raises(config.ConfigError, match=r"^data\.max_train: must be an integer in"):
        config.load(None, f"data.max_train=-{2**63 + 1}")
    # Keras on TensorFlow counts a call's steps in 32 bits: 2**31 ran none (its run FAILED on a ZeroDivisionError)
    assert config.load(None, f"train.steps_per_execution={2**31 - 1}").train.steps_per_execution == 2**31 - 1


def test_lists_in_overrides_may_be_written_with_spaces_as_yaml_writes_them():
    """`model.widths=[16, 32, 64]` (default.yaml's own spelling) was cut at its spaces: 'expected section.key=value,
    got '32,''; a stray word after a value with a space says to quote it."""
    cfg = config.load(None, "model.widths=[16, 32, 64] train.lr_boundaries=[40/150, 60/150] train.epochs=150")
    assert cfg.model.widths == (16, 32, 64) and cfg.train.boundary_epochs == (40, 60)
    assert config.load_from_cli("", "train.lr_boundaries=[ 0.5 , 0.75 ]").train.boundary_epochs == (75, 113)
    with pytest.raises(config.ConfigError, match=r"^overrides: expected section.key=value, got 'runs' \(a value with "
                                                 r"spaces needs quotes"):
        config.load(None, "tracking.experiment=my runs")


def test_schedule_params_that_do_nothing_or_never_reach_the_peak_are_refused():
    """A shift under half a pixel rounded to no shift at all; a step schedule's warm-up still ramping at its first
    decay never reached train.lr."""
    with pytest.raises(config.ConfigError, match=r"^train.shift: rounds to 0 of 32 pixels \(no shift\)"):
        config.load(None, "train.shift=0.01")
    assert config.load(None, "train.shift=0.03125").train.shift == 0.03125  # 1 px, quick.yaml's
    with pytest.raises(config.ConfigError, match=r"^train.warmup: must end by the step schedule's first decay, "
                                                 r"after epoch 80 of 150"):
        config.load(None, "train.warmup=0.6")
    assert config.load(None, "train.warmup=0.5").train.warmup == 0.5  # over by epoch 75
    assert config.load(None, "train.warmup=0.6 train.schedule=cosine").train.warmup == 0.6


SEED_INERT = {"data.seed": "data.source cifar10, data.max_train 0, data.max_test 0",
              "data.synthetic_test": "data.source cifar10", "data.synthetic_train": "data.source cifar10",
              "train.ema_bn_batches": "train.ema false", "train.ema_momentum": "train.ema false"}

RESNET9_INERT = {f"model.{k}": "model.arch resnet9" for k in ("block", "stem_filters", "strides", "units_per_stage")}
ONECYCLE_INERT = {"train.lr_boundaries": "train.schedule onecycle", "train.lr_decay": "train.schedule onecycle"}


@pytest.mark.parametrize(("path", "overrides", "inert", "warned"), [
    (None, "", SEED_INERT, []),  # the seed recipe: inert defaults, which nobody chose, are not warned of
    (None, "train.momentum=0 train.nesterov=true", {**SEED_INERT, "train.nesterov": "train.momentum 0.0"},
     ["train.nesterov true has no effect with train.momentum 0.0"]),
    (None, "train.ema=true", {k: v for k, v in SEED_INERT.items() if "ema" not in k}, []),
    (None, "train.ema_momentum=0.999", SEED_INERT, ["train.ema_momentum 0.999 has no effect with train.ema false"]),
    (None, "train.shift=0 train.shift_fill=reflect",
     {**SEED_INERT, "train.shift_fill": "train.shift 0.0, evaluate.tta none"},
     ["train.shift_fill reflect has no effect with train.shift 0.0, evaluate.tta none"]),
    (None, "train.shift=0 train.shift_fill=reflect evaluate.tta=flip_shift", SEED_INERT, []),  # its borders
    (None, "model.l2=0 model.l2_norm_and_bias=true", {**SEED_INERT, "model.l2_norm_and_bias": "model.l2 0.0"},
     ["model.l2_norm_and_bias true has no effect with model.l2 0.0"]),
    (None, "train.schedule=cosine train.lr_decay=0.5", {
        **SEED_INERT, "train.lr_boundaries": "train.schedule cosine", "train.lr_decay": "train.schedule cosine"},
     ["train.lr_decay 0.5 has no effect with train.schedule cosine"]),
    (None, "train.lr_boundaries=[] train.lr_decay=0.5", {**SEED_INERT, "train.lr_decay": "train.lr_boundaries []"},
     ["train.lr_decay 0.5 has no effect with train.lr_boundaries []"]),
    (None, "train.lr_decay=1 train.lr_boundaries=[0.5]",
     {**SEED_INERT, "train.lr_boundaries": "train.lr_decay 1.0, train.warmup 0.0"},
     ["train.lr_boundaries [0.5] has no effect with train.lr_decay 1.0, train.warmup 0.0"]),
    (None, "train.lr_decay=1 train.warmup=0.1", SEED_INERT, []),  # a warm-up ends by the first boundary
    # lr_scaling is a policy for a batch size set later (a sweep's, an override's): never listed, at batch 128 too
    (None, "train.lr_scaling=linear", SEED_INERT, []),
    (None, "data.max_test=500 data.synthetic_train=500", {k: v for k, v in SEED_INERT.items() if k != "data.seed"},
     ["data.synthetic_train 500 has no effect with data.source cifar10"]),
    ("params/tiny.yaml", "", {  # synthetic: its sizes and data.seed make it
        "train.ema_bn_batches": "train.ema false", "train.ema_momentum": "train.ema false",
        "train.lr_boundaries": "train.schedule cosine", "train.lr_decay": "train.schedule cosine"}, []),
    # resnet9 ignores preact's shape keys; zero_init_residual, which it holds to false, is what it did: not listed
    ("params/quick.yaml", "model.block=basic model.stem_filters=8", {
        **{k: v for k, v in SEED_INERT.items() if k != "data.seed"}, **RESNET9_INERT, **ONECYCLE_INERT},
     ["model.block basic has no effect with model.arch resnet9",
      "model.stem_filters 8 has no effect with model.arch resnet9"]),
    ("params/fast.yaml", "", {**SEED_INERT, **RESNET9_INERT,
                              **ONECYCLE_INERT}, []),
    ("params/improved.yaml", "train.flip=false", {k: v for k, v in SEED_INERT.items()
                                                  if "ema" not in k} | {
        k: "train.schedule cosine" for k in ("train.lr_boundaries", "train.lr_decay")}, []),
])
def test_params_without_effect_given_the_others_are_listed_and_warned_of_where_set(path, overrides, inert, warned):
    """`train.nesterov: true` with momentum 0, `train.ema_*` without ema, preact's keys under resnet9 and the like were
    accepted silently, and compare showed them as differing columns, as if they had mattered. They are listed with
    the params that make them so (the train run's tag), and those set away from default.yaml's value warned of."""
    cfg = config.load(path, overrides)
    assert config.inert_params(cfg) == inert
    assert config.inert_warnings(cfg) == [f"warning: {line}" for line in warned]


@pytest.mark.parametrize("fraction", ["7/25", "0.28"])
def test_a_warmup_ending_exactly_at_the_first_decay_is_accepted_whatever_the_floats_round_to(fraction):
    """0.28 * 25 is 7.000000000000001 in floating point: a warm-up written as the first boundary's own fraction was
    refused as ending after that decay ("must end by the step schedule's first decay, after epoch 7 of 25")."""
    t = config.load(None, f"train.epochs=25 train.lr_boundaries=[{fraction}] train.warmup={fraction}").train
    assert (t.warmup, t.boundary_epochs) == (0.28, (7,))
    with pytest.raises(config.ConfigError, match=r"^train.warmup: must end by the step schedule's first decay"):
        config.load(None, "train.epochs=25 train.lr_boundaries=[0.28] train.warmup=0.2801")


def test_a_quoted_or_octal_looking_value_in_a_params_file_is_read_by_its_keys_type(tmp_path):
    """tiny.yaml quotes `jit_compile: "false"` (a choice); `ema: "true"` or `epochs: "10"` written alike were refused
    as `train.epochs: must be an integer, got '10'`, the message contradicting itself."""
    (tmp_path / "quoted.yaml").write_text('train:\n  ema: "true"\n  epochs: "10"\nmodel:\n  widths: ["16", 32, 64]\n')
    cfg = config.load(tmp_path / "quoted.yaml")
    assert (cfg.train.ema, cfg.train.epochs, cfg.model.widths) == (True, 10, (16, 32, 64))
    # YAML 1.1's octal read `epochs: 010` as 8 and the name `0755` as 493: a params file reads them as overrides do
    (tmp_path / "octal.yaml").write_text("train:\n  epochs: 010\n  lr: 010\ntracking:\n  experiment: 0755\n"
                                         "data:\n  synthetic_train: 10_000\n")
    cfg = config.load(tmp_path / "octal.yaml")
    assert (cfg.train.epochs, cfg.train.lr, cfg.tracking.experiment, cfg.data.synthetic_train) == (
        10, 10.0, "0755", 10_000)
    for text, message in (('train:\n  ema: "maybe"\n', r"train.ema: must be true or false \(or yes/no, on/off\), "
                                                        "got 'maybe'"),
                          ('train:\n  epochs: "1:30"\n', "train.epochs: must be an integer, got '1:30'"),
                          ("train:\n  epochs: 1:30\n", "train.epochs: must be an integer, got '1:30'")):  # not 90
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(config.ConfigError, match=f"^{message}"):
            config.load(tmp_path / "bad.yaml")


@pytest.mark.parametrize(("key", "text", "expected"), [
    ("train.jit_compile", "yes", True),  # the file's was true, the override's refused
    ("train.jit_compile", "Off", False),
    ("train.jit_compile", "auto", "auto"),
    ("train.jit_compile", "maybe", r"must be true or false \(or yes/no, on/off\), or auto, got 'maybe'"),
    ("train.ema", "YES", True),
    ("train.ema", "1", r"must be true or false \(or yes/no, on/off\), got '1'"),
    ("tracking.experiment", "True", "True"),  # both stored 'true'
    ("tracking.experiment", "2026.12", "2026.12"),  # the file's was refused as a float until quoted
    ("tracking.experiment", "0x10", "0x10"),  # the file's was '16'
    ("tracking.experiment", "2026-12-01", "2026-12-01"),  # the file's was refused as a date
    ("train.epochs", "1_000", 1000),  # the override's was refused
    ("train.epochs", "0x10", "must be an integer, got '0x10'"),  # both were 16
    ("model.widths", "[1_000, 016, 64]", (1000, 16, 64)),
    ("model.widths", "[0x10, 32, 64]", "must be an integer, got '0x10'"),  # both were 16
    ("train.lr", "0x10", "must be a number, got '0x10'"),  # both were 16.0
    ("train.validation_seed", "null", None),
    ("train.validation_seed", "~", None),
    ("train.validation_seed", "0x10", "must be an integer, or null, got '0x10'"),
    ("train.validation_seed", "none", "must be an integer, or null, got 'none'"),
])
def test_a_value_reads_the_same_from_a_params_file_and_from_overrides(tmp_path, key, text, expected):
    """Each value is read by its key's type wherever it comes from: a params file's went through YAML 1.1, which read
    it by its look (`jit_compile: yes` true where `train.jit_compile=yes` was refused, `experiment: 2026.12` a float),
    and an override's list through YAML too (`[1_000]` was read where `train.epochs=1_000` was refused)."""
    section, name = key.split(".")
    (tmp_path / "p.yaml").write_text(f"{section}:\n  {name}: {text}\n")
    loads = {"params file": lambda: config.load(tmp_path / "p.yaml"), "overrides": lambda: config.load(None, [
        f"{key}={text}"]), "-P overrides": lambda: config.load_from_cli("", shlex.quote(f"{key}={text}"))}
    if key == "train.epochs":
        loads["-P epochs"] = lambda: config.load_from_cli("", "", epochs=text)
    for where, load in loads.items():
        if isinstance(expected, str) and expected.startswith("must"):
            with pytest.raises(config.ConfigError, match=f"^{key}: {expected}"):
                load()
        else:
            assert getattr(getattr(load(), section), name) == expected, where


def test_a_section_with_every_key_commented_out_changes_nothing(tmp_path):
    """`train:` with each key under it commented out is YAML's null: refused as `train: must be a mapping ..., got ''`,
    where the section is left as default.yaml has it. A section that is a scalar is still refused."""
    (tmp_path / "p.yaml").write_text("train:\n  # epochs: 3\nevaluate: null\nmodel: ~\ndata:\n  max_train: 5\n")
    cfg = config.load(tmp_path / "p.yaml")
    assert (cfg.train, cfg.evaluate, cfg.model) == (config.load().train, config.load().evaluate, config.load().model)
    assert cfg.data.max_train == 5
    for text in ("train: 3\n", "train: [epochs]\n", "train: false\n"):
        (tmp_path / "p.yaml").write_text(text)
        with pytest.raises(config.ConfigError, match=r"^train: must be a mapping in "):
            config.load(tmp_path / "p.yaml")


def test_a_params_file_with_a_number_or_null_for_a_key_names_it(tmp_path):
    for text, message in (("train:\n  1: 2\n", "train.1: unknown key"), ("1:\n  a: 2\n", "1: unknown section"),
                          ("train:\n  null: 2\n", "train.null: unknown key")):  # as written
        (tmp_path / "p.yaml").write_text(text)
        with pytest.raises(config.ConfigError, match=f"^{message}"):
            config.load(tmp_path / "p.yaml")


def test_a_value_with_an_explicit_yaml_tag_is_read_by_its_keys_type(tmp_path):
    """`!!null` is null, as `!!int 5` is 5: `validation_seed: !!null` was refused as "must be an integer, or null,
    got None", the null it names; on a key that takes no null it is refused as the text null would be."""
    (tmp_path / "p.yaml").write_text("train:\n  validation_seed: !!null\n  epochs: !!int 30\n  ema: !!bool yes\n")
    t = config.load(tmp_path / "p.yaml").train
    assert (t.validation_seed, t.epochs, t.ema) == (None, 30, True)
    (tmp_path / "p.yaml").write_text("train:\n  lr: !!null\n")
    with pytest.raises(config.ConfigError, match=r"^train\.lr: must be a number, got 'null'$"):
        config.load(tmp_path / "p.yaml")


@pytest.mark.parametrize("alias", ["validated", "val_best", "champion-2", "v1x", "V"])
def test_aliases_mlflow_accepts_are_accepted(alias):
    assert config.load(None, f"register.alias={alias}").register.alias == alias


def test_a_blank_params_or_spec_path_is_named_blank():
    """`-P params=" "` was refused as `params: file not found:` (the name of spaces unseen at the line's end), and
    `-e sweep -P spec=` as `spec:  is a folder, not a spec file` (the project root)."""
    with pytest.raises(config.ConfigError, match=r"^params: ' ' is blank; give a params file, or leave it empty for "
                                                 r"params/default.yaml alone$"):
        config.load_from_cli(" ", "")
    for blank in ("", "  "):
        with pytest.raises(config.ConfigError, match=rf"^spec: {blank!r} is blank; give a spec file$"):
            config.read_yaml(blank, key="spec")
    # a name with spaces around it says so (they are part of the path, and unseen at the line's end)
    with pytest.raises(config.ConfigError, match=r"^params: file not found: 'params/tiny.yaml ' \(it begins or ends "
                                                 r"with spaces\)$"):
        config.load_from_cli("params/tiny.yaml ", "")
    assert config.load_from_cli("", "").train.epochs == config.load().train.epochs  # empty: default.yaml alone


def test_a_blank_data_or_epochs_shortcut_is_named_blank():
    """`-P data=" "` was refused as `data.source: must not be empty, got ''`, when empty is what -P data may be."""
    for name, key in (("data", "data.source"), ("epochs", "train.epochs")):
        with pytest.raises(config.ConfigError, match=rf"^{name}: ' ' is blank; give a value, or leave it empty for "
                                                     rf"the params' {key}$"):
            config.load_from_cli(None, None, **{name: " "})
    assert config.load_from_cli(None, None, data="", epochs="").train.epochs == config.load().train.epochs


def test_a_blank_dataset_uri_is_named_blank():
    """`-e train -P dataset_uri=" "` was refused as `dataset_uri:   names no prepared dataset (.npz)`."""
    from pipeline import data, prepare

    with pytest.raises(data.DataError, match=r"^dataset_uri: ' ' is blank; give runs:/<prepare run id>/dataset/"
                                             r"dataset.npz, or leave it empty to prepare \(or reuse\) the data "
                                             r"-P data names$"):
        prepare.check_dataset_uri(" ")


def test_a_file_given_in_another_folder_is_told_where_it_is_read(tmp_path, monkeypatch):
    """`mlflow run /path/to/project -P params=mine.yaml` beside `mine.yaml` runs the step in the project's folder:
    it was "file not found: mine.yaml" of a file `ls` lists there ($PWD: the folder the command was given in)."""
    from tests.conftest import ROOT

    (tmp_path / "mine.yaml").write_text("train:\n  epochs: 3\n")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(os, "getppid", os.getpid)  # the parent's folder is this process's (test_data.py: $PWD alone)
    monkeypatch.setenv("PWD", str(tmp_path))
    with pytest.raises(config.ConfigError) as err:
        config.load_from_cli("mine.yaml", "")
    assert str(err.value) == (f"params: file not found: mine.yaml (not in {ROOT}, the folder mlflow run runs each "
                              f"step in, but in {tmp_path}, where the command was given: give its absolute path, "
                              f"{tmp_path}/mine.yaml)")
    # and `-e evaluate -P dataset_uri=d.npz` so too
    from pipeline import data, prepare

    (tmp_path / "d.npz").write_bytes(b"")
    with pytest.raises(data.DataError, match=rf"^dataset_uri: no file d.npz \(not in {ROOT}, .* give its absolute "
                                             rf"path, {tmp_path}/d.npz\)$"):
        prepare.check_dataset_uri("d.npz")


def test_bad_params_files(tmp_path):
    with pytest.raises(config.ConfigError, match="not found: .*missing.yaml$"):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(config.ConfigError, match=r"^params: file not found: quick.yaml \(did you mean "
                                                 r"params/quick.yaml\?\)$"):
        config.load("quick.yaml")  # `-P params=quick.yaml`, run from the project root
    with pytest.raises(config.ConfigError, match=r"^params: params/ is a folder, not a params file$"):
        config.load("params/")  # `-P params=params/`, as a shell completes it: was "file not found"
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(config.ConfigError, match=r"^params: .*/folder.yaml is a folder, not a params file$"):
        config.load(tmp_path / "folder.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")
    (tmp_path / "unknown.yaml").write_text("train:\n  epochz: 3\n")
    with pytest.raises(config.ConfigError, match=r"train.epochz: unknown key in .*unknown.yaml; did you mean "
                                                 r"train.epochs\? \(known: epochs, batch_size"):
        config.load(tmp_path / "unknown.yaml")
    with pytest.raises(config.ConfigError, match="expected section.key=value"):
        config.load(None, "epochs=3")


def test_a_key_given_twice_in_a_params_file_is_refused_not_dropped(tmp_path):
    """PyYAML keeps the last of two equal keys silently: a `train:` section appended to a copy of tiny.yaml dropped
    tiny's whole train section, and the run trained the seed's 150 epochs of a step schedule."""
    tiny = (config.PROJECT_ROOT / "params" / "tiny.yaml").read_text()
    (tmp_path / "twice.yaml").write_text(tiny + "train:\n  cutout: 8\n")
    with pytest.raises(config.ConfigError, match=r"^params: .*twice.yaml gives 'train' twice \(lines 12 and 22\): "
                                                 r"YAML would silently keep only the last; give it once$"):
        config.load(tmp_path / "twice.yaml")
    (tmp_path / "lr.yaml").write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    with pytest.raises(config.ConfigError, match=r"gives 'lr' twice \(lines 2 and 4\)"):
        config.load(tmp_path / "lr.yaml")
    # a YAML merge key's values may be overridden, as YAML means it
    (tmp_path / "merge.yaml").write_text("x: &base {lr: 0.1, epochs: 3}\ny:\n  <<: *base\n  lr: 0.2\n")
    assert config.read_yaml(tmp_path / "merge.yaml")["y"] == {"lr": 0.2, "epochs": 3}
    # also where the overriding mapping sits in a list and is merged on later (PyYAML flattens it first): its
    # override of a merged key was refused as "gives 'lr' twice (lines 1 and 3)"
    (tmp_path / "nested.yaml").write_text("x: &base {lr: 0.1, epochs: 3}\nys:\n  - &y {<<: *base, lr: 0.2}\n"
                                          "z:\n  <<: *y\n")
    assert config.read_yaml(tmp_path / "nested.yaml")["z"] == {"lr": 0.2, "epochs": 3}


def test_a_key_given_twice_in_one_overrides_string_is_refused_not_dropped():
    """`-P overrides="train.epochs=10 train.epochs=20"` trained 20 epochs, the 10 dropped unseen, as a params file's
    second key was; a list's items are still layers (a sweep's trial values over its spec's overrides)."""
    for overrides, message in [("train.epochs=10 train.lr=0.2 train.epochs=20", "train.epochs: given twice in "
                                "overrides ('10' and '20'): only the last would count; give it once"),
                               ("model.widths=[16, 32, 64] model.widths=[8,16,32]",
                                "model.widths: given twice in overrides ('[16, 32, 64]' and '[8,16,32]')"),
                               ("train.seed=1 train.seed=1", "train.seed: given twice in overrides ('1' and '1')")]:
        with pytest.raises(config.ConfigError, match=f"^{re.escape(message)}"):
            config.load_from_cli("params/tiny.yaml", overrides)
        with pytest.raises(config.ConfigError, match=f"^{re.escape(message)}"):
            config.load("params/tiny.yaml", overrides)
    assert config.load("params/tiny.yaml", ["train.epochs=10", "train.epochs=20"]).train.epochs == 20
    assert config.load_from_cli("params/tiny.yaml", "train.epochs=4", epochs="4").train.epochs == 4  # agreeing


GPU_SH_PYTHON = """#!/bin/bash
# bench/gpu.sh's python: `-c` checks pass; a stage (bench.gpu_epoch) records its params and overrides, and succeeds
[[ $1 == -c ]] && exit 0
while (( $# )); do case $1 in --out) out=$2; shift;; --params) params=$2; shift;; --overrides) ov=$2; shift;; esac
  shift; done
printf '%s\t%s\t%s\n' "${out##*/}" "$params" "$ov" >> "$FAKE_LOG"
echo '{"epoch_seconds": [1.0], "test_acc": 0.5}' > "$out"
"""


@pytest.mark.parametrize("smoke", ["", "1"], ids=["gpu", "smoke"])
def test_every_gpu_sh_stages_overrides_load_with_its_params_file(tmp_path, smoke):
    """gpu.sh composes its stages' overrides from shell variables (the smoke's toy scale, $small9...): composed
    after a stage's own model.widths or train.epochs they gave the key twice, which the config now refuses, and
    that stage of the one GPU call would fail. Each stage's string as bench.gpu_epoch loads it."""
    import subprocess

    fake, log = tmp_path / "python", tmp_path / "stages.log"
    fake.write_text(GPU_SH_PYTHON)
    fake.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "FAKE_LOG": str(log),
           "GPU_SH_STATE": str(tmp_path / "state"), **({"GPU_SH_SMOKE": smoke} if smoke else {})}
    proc = subprocess.run(["bash", str(config.PROJECT_ROOT / "bench" / "gpu.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = [line.split("\t") for line in log.read_text().splitlines()]
    assert [name for name, *_ in stages] == [f"gpu-{name}.json" for name in (  # (the references: no .whl here)
        "fast", "fast-warm", "seed", "improved", "explore-ceiling", "explore-wide", "explore-24-ghost", "explore-seed1",
        "explore-ema", "explore-32", "explore-drop", "explore-24-altflip")]
    loaded = {name: config.load_from_cli(params, overrides) for name, params, overrides in stages}
    assert all(cfg.train.feed == "device" for cfg in loaded.values())
    wide, long = loaded["gpu-explore-wide.json"], loaded["gpu-explore-32.json"]
    ceiling = loaded["gpu-explore-ceiling.json"]
    fast = config.load_from_cli("params/fast.yaml", "train.epochs=2 model.widths=[8,16,32,64]" if smoke else "")
    assert long.train.epochs > fast.train.epochs and sum(wide.model.widths) > sum(fast.model.widths)  # what they try
    assert list(ceiling.model.widths[1:]) == [2 * w for w in fast.model.widths[1:]]  # twice, behind the stem
    assert ceiling.train.epochs == (fast.train.epochs if smoke else 40)
    assert loaded["gpu-fast-warm.json"] == loaded["gpu-fast.json"]  # the same programs: loaded, not compiled again


@pytest.mark.parametrize(("override", "message"), [
    ("trian.epochs=3", r"trian: unknown section in overrides; did you mean train\? \(known: data, model"),
    ("model.width=[8,16,32]", r"model.width: unknown key in overrides; did you mean model.widths\? \(known: arch"),
    ("train.lr_schedule=cosine", r"train.lr_schedule: unknown key in overrides; did you mean train.schedule\? "),
    ("train.xyz=1", r"train.xyz: unknown key in overrides \(known: epochs, "),  # nothing close: no guess
])
def test_an_unknown_key_names_the_closest_known_one(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, override)


ENTRY_POINTS = config.read_yaml(config.MLPROJECT, key="MLproject")["entry_points"]


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_each_entry_points_command_line_is_the_one_mlproject_writes(entry_point):
    """`mlflow run -e X` and `python -m pipeline.X` take the same parameters, with the same defaults."""
    spec = ENTRY_POINTS[entry_point]
    values = {name: f"value-of-{name}" for name in spec["parameters"]}
    words = shlex.split(spec["command"].format(**values))
    assert words[:3] == ["python", "-m", f"pipeline.{entry_point}"]
    parser = config.entry_point_parser(entry_point, "")
    assert vars(parser.parse_args(words[3:])) == values  # every parameter passed, under its own name
    defaults = {name: str(p["default"]) for name, p in spec["parameters"].items() if isinstance(p, dict)}
    required = set(values) - set(defaults)
    if required:  # a parameter without a default must be given
        with pytest.raises(config.ConfigError, match="^arguments: the following arguments are required"):
            parser.parse_args([f"--{name.replace('_', '-')}=x" for name in defaults])
    given = [f"--{name.replace('_', '-')}=x" for name in required]
    assert vars(parser.parse_args(given)) == {**defaults, **dict.fromkeys(required, "x")}


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_a_value_beginning_with_a_dash_reaches_its_parameter(entry_point):
    """`mlflow run . -e compare -P experiment=-x` (or a data file `-x.npz`) was refused: MLproject wrote
    `--experiment -x`, and argparse read -x as an option ("expected one argument")."""
    spec = ENTRY_POINTS[entry_point]
    values = {name: shlex.quote(f"-{name}") for name in spec["parameters"]}  # as MLflow quotes a -P value
    words = shlex.split(spec["command"].format(**values))
    parsed = vars(config.entry_point_parser(entry_point, "").parse_args(words[3:]))
    assert parsed == {name: f"-{name}" for name in spec["parameters"]}


def test_what_mlflow_run_logs_beside_the_params_does_not_come_back_as_params():
    """`mlflow run` logs its -P values too (`data`, `epochs`: often ''); a resumed run's params are rebuilt from
    the section.key ones only (resume=<id> of a run `mlflow run . -e train` started failed on `data=''`)."""
    back = config.from_run_params({"data": "''", "epochs": "''", "dataset_uri": "''", "train.epochs": "30"})
    assert back.train.epochs == 30 and back.data.source == "cifar10"


def test_an_unknown_or_missing_entry_point_argument_is_one_line():
    """An unknown -P name reaches the step as `--name`: argparse printed its usage and exited 2, leaving the run
    `mlflow run` opened FAILED in the experiment; a ConfigError trashes it like any bad param."""
    # nothing close: no guess, but every name main takes (`-P metrc=x` said only "unrecognized arguments: --metrc x")
    with pytest.raises(config.ConfigError, match=r"^arguments: unrecognized arguments: --experimnt foo \(known: "
                                                 r"--data, --epochs, --overrides, --params, --resume\)$"):
        config.entry_point_parser("main", "x").parse_args(["--experimnt", "foo"])
    # the start of a known name: argparse took `-P epoch=30` (`--epoch 30`, after MLproject's `--epochs ''`) for epochs
    with pytest.raises(config.ConfigError, match=r"^arguments: unrecognized arguments: --epoch 30; did you mean "
                                                 r"--epochs\? \(known: --data, "):
        config.entry_point_parser("main", "x").parse_args(["--epochs", "", "--epoch", "30"])
    with pytest.raises(config.ConfigError, match=r"^arguments: unrecognized arguments: --metrc=val_acc; did you mean "
                                                 r"--metric\? \(known: "):
        config.entry_point_parser("compare", "x").parse_args(["--metrc=val_acc"])
    assert config.entry_point_parser("main", "x").parse_args(["--epochs=30"]).epochs == "30"
    with pytest.raises(config.ConfigError, match=r"^arguments: the following arguments are required: --model-uri"):
        config.entry_point_parser("register", "x").parse_args([])


def test_a_parameter_of_another_entry_point_is_named_as_that_ones():
    """`mlflow run . -P model_uri=...` (main) or `-e train -P model_uri=...`: a parameter another step reads was
    "unrecognized arguments: --model_uri ... (known: ...)", the step meant left to guess. The line names the entry
    points that take it."""
    with pytest.raises(config.ConfigError, match=r"^arguments: unrecognized arguments: --model_uri models:/m-1; "
                                                 r"model_uri is a parameter of the evaluate and register entry points "
                                                 r"\(mlflow run \. -e evaluate -P model_uri=\.\.\.\), not main's "
                                                 r"\(known: --data, "):
        config.entry_point_parser("main", "x").parse_args(["--model_uri", "models:/m-1"])
    with pytest.raises(config.ConfigError, match=r"; dataset_uri is a parameter of the train and evaluate entry points "
                                                 r"\(mlflow run \. -e train -P dataset_uri=\.\.\.\), not main's "):
        config.entry_point_parser("main", "x").parse_args(["--dataset-uri=runs:/r/dataset"])
    with pytest.raises(config.ConfigError, match=r"; model_uri is a parameter of the evaluate and register entry "
                                                 r"points \(mlflow run \. -e evaluate -P model_uri=\.\.\.\), not "
                                                 r"train's "):
        config.entry_point_parser("train", "x").parse_args(["--model_uri", "models:/m-1"])


def test_an_entry_point_argument_given_twice_is_refused_not_dropped():
    """`mlflow run` refuses a -P name given twice; `python -m pipeline.train --overrides A ... --overrides B` kept B
    alone, and A's params were dropped unseen (argparse keeps the last), as a key given twice in overrides was."""
    parser = config.entry_point_parser("train", "x")
    with pytest.raises(config.ConfigError, match=r"^arguments: --overrides given twice \('train.lr=0.5' and "
                                                 r"'train.epochs=3'\): only the last would count; give it once$"):
        parser.parse_args(["--overrides", "train.lr=0.5", "--overrides", "train.epochs=3"])
    with pytest.raises(config.ConfigError, match=r"^arguments: --epochs given twice \('5' and '5'\)"):
        parser.parse_args(["--epochs=5", "--epochs", "5"])
    # each parse starts afresh: the same parser takes each name once per command line
    assert vars(parser.parse_args(["--epochs", "5"]))["epochs"] == "5"
    assert vars(parser.parse_args(["--epochs", "6", "--data", "synthetic"]))["epochs"] == "6"


def test_a_parameter_spelt_with_a_dash_is_told_its_mlproject_name(monkeypatch):
    """`mlflow run . -e train -P dataset-uri=X` passes the unknown name on as `--dataset-uri X` after MLproject's own
    `--dataset-uri=''`: it was refused as `--dataset-uri given twice ('' and 'X')`, a -P the user gave once."""
    from mlflow.projects import _project_spec  # the command `mlflow run` runs, as it builds it

    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)  # as `mlflow run` starts its step

    command = _project_spec.load_project(str(config.PROJECT_ROOT)).get_entry_point("train").compute_command(
        {"dataset-uri": "runs:/x/d.npz"}, None)
    words = shlex.split(command)[3:]
    with pytest.raises(config.ConfigError, match=r"^arguments: --dataset-uri given twice \('' and 'runs:/x/d.npz'\)"
                                                 r": only the last would count; give it once \(to mlflow run as "
                                                 r"-P dataset_uri=\.\.\., MLproject's name: -P dataset-uri reaches "
                                                 r"the step as a second --dataset-uri\)$"):
        config.entry_point_parser("train", "x").parse_args(words)
    # a name without a dash is given twice only by the step's own command line: no word on MLproject's names
    with pytest.raises(config.ConfigError, match=r"^arguments: --epochs given twice \('' and '3'\): only the last "
                                                 r"would count; give it once$"):
        config.entry_point_parser("train", "x").parse_args(["--epochs=", "--epochs", "3"])
    # `python -m pipeline.train --dataset-uri A --dataset-uri B`, no `mlflow run`: given twice indeed
    monkeypatch.delenv("MLFLOW_RUN_ID")
    with pytest.raises(config.ConfigError, match=r"^arguments: --dataset-uri given twice \('a' and 'b'\): only the "
                                                 r"last would count; give it once$"):
        config.entry_point_parser("train", "x").parse_args(["--dataset-uri", "a", "--dataset-uri", "b"])


def test_a_run_without_a_model_uri_tag_has_no_model():
    from pipeline.tracking import model_id

    assert model_id(float("nan")) is None and model_id(None) is None  # search_runs' frame: NaN for a missing tag
    assert model_id("m-0123") is None and model_id("models:/m-0123") == "m-0123"


def test_one_data_path_spelled_two_ways_is_one_param(tmp_path):
    """`-P data=images/` (a shell completes a folder so) and `-P data=images`, or `./d.npz` and `d.npz`, named the same
    file but gave two `data.source` params: prepare ran again (its key holds the params) and compare showed a
    data.source column for identical runs. `..` stays (a link may lead elsewhere), as do the built-in names."""
    def source(text: str) -> str:
        cfg = config.load_from_cli(None, None, data=text)
        assert cfg.flat("data")["data.source"] == cfg.data.source
        return cfg.data.source

    assert {source(s) for s in ("images", "images/", "./images", "./images//", "images/.")} == {"images"}
    assert source(f"{tmp_path}//d.npz") == source(f"{tmp_path}/./d.npz") == f"{tmp_path}/d.npz"
    assert source("../shared/d.npz") == "../shared/d.npz" and source("a/../d.npz") == "a/../d.npz"
    assert (source("cifar10"), source("synthetic")) == ("cifar10", "synthetic")
    # a folder named like a built-in source is still that folder, however it is spelled
    assert source("./cifar10/") == source("cifar10/") == "./cifar10"
    assert config.from_run_params({"data.source": "./images/"}).data.source == "images"
    assert config.load_from_cli(None, "data.source=images/", data="./images").data.source == "images"  # they agree


@pytest.mark.parametrize("text", ["", "# train:\n#   epochs: 3\n", "---\n", "{}\n", "train:\n  # epochs: 3\n",
                                  "train: {}\nmodel:\n"])
def test_a_params_file_that_sets_nothing_is_refused_naming_it(tmp_path, text):
    """`-P params=mine.yaml` of a file saved empty (or all its lines commented out, or only empty sections) ran the
    seed recipe, 150 epochs of ResNet-164, where the user expected the file's settings: refused, naming the file."""
    (tmp_path / "mine.yaml").write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load_from_cli(str(tmp_path / "mine.yaml"), "")
    assert str(err.value) == (f"params: {tmp_path / 'mine.yaml'} sets no params (it is empty, or holds only comments "
                              "or empty sections): give the settings it should hold, or leave -P params out to run "
                              "params/default.yaml as it is")


def test_the_train_key_leaves_out_the_params_without_effect():
    """A run killed, then rerun with a param that has no effect set otherwise (train.nesterov with train.momentum 0,
    data.seed with no subset drawn), was another training job: the rerun started afresh rather than resume it."""
    from pipeline.tracking import resume

    uri = "runs:/0123/dataset/dataset.npz"
    base = config.load(None, "train.momentum=0.0")
    for inert in ("train.nesterov=true", "data.seed=7", "data.synthetic_train=500"):
        other = config.load(None, f"train.momentum=0.0 {inert}")
        assert resume.train_key(other, uri) == resume.train_key(base, uri), inert
    assert resume.train_key(config.load(None, "train.nesterov=true"), uri) != resume.train_key(config.load(None), uri)


def test_a_dotted_key_at_the_top_of_a_params_file_says_how_a_params_file_nests_keys(tmp_path):
    """`train.epochs: 3`, an override's spelling copied into a params file, was an "unknown section" with no hint."""
    (tmp_path / "p.yaml").write_text("train.epochs: 3\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(tmp_path / "p.yaml")
    assert str(err.value) == (f"train.epochs: unknown section in {tmp_path / 'p.yaml'}; a params file nests each key "
                              "under its section: `train:`, then `epochs: ...` indented on the line below it (dotted "
                              "keys are the overrides' spelling)")
    (tmp_path / "p.yaml").write_text("train.epochz: 3\n")  # not a known key: no such advice
    with pytest.raises(config.ConfigError, match=r"^train.epochz: unknown section in .*p.yaml \(known: data, model"):
        config.load(tmp_path / "p.yaml")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_a_params_file_in_utf_16_with_its_byte_order_mark_is_read(tmp_path, encoding):
    """Windows PowerShell's `>` and Out-File write UTF-16 with a byte order mark, which YAML reads as it reads UTF-8:
    such a params file was refused as 'not a YAML text file (not UTF-8 text)'."""
    text = "tracking:\n  experiment: café\ntrain:\n  epochs: 30\n"
    (tmp_path / "p.yaml").write_bytes(("\ufeff" if encoding == "utf-16-be" else "").encode(encoding)
                                      + text.encode(encoding))
    cfg = config.load(tmp_path / "p.yaml")
    assert (cfg.tracking.experiment, cfg.train.epochs) == ("café", 30)


def test_a_sweep_spec_given_as_a_params_file_is_named_as_a_spec():
    """`-P params=params/sweep-example.yaml` (main's -P params given the spec a sweep takes) was "base: unknown section
    in params/sweep-example.yaml": it says what the file is and the command that takes it."""
    with pytest.raises(config.ConfigError) as err:
        config.load_from_cli("params/sweep-example.yaml", "")
    assert str(err.value) == ("params: params/sweep-example.yaml is a sweep's spec (it has grid:), not a params "
                              "file: run it with -e sweep -P spec=params/sweep-example.yaml")


@pytest.mark.parametrize(("overrides", "message"), [
    ("train.lr=1e39", "train.lr: 1e+39 is more than float32, in which the optimizer keeps the lr, holds "
                      "(3.40282e+38): it would train at infinity; lower it, got 1e+39"),
    ("train.lr=1e37 train.lr_scaling=linear train.batch_size=12800",
     "train.lr: 1e+39 (1e+37 scaled by train.lr_scaling linear at train.batch_size 12800) is more than float32, in "
     "which the optimizer keeps the lr, holds (3.40282e+38): it would train at infinity; lower it, got 1e+37"),
    ("train.lr=1e-46", "train.lr: 1e-46 rounds to 0 in float32, in which the optimizer keeps the lr (the least it "
                       "holds above 0 is 1.4013e-45): the weights would never change; raise it, got 1e-46"),
])
def test_an_lr_float32_cannot_hold_is_refused_naming_train_lr(overrides, message):
    """train.lr=1e39 (or a scaled lr past float32's largest) passed the checks, trained at an infinite lr and ended in
    a traceback from the epoch logger ("Can't convert Python sequence with a value out of range"), the run FAILED for
    an 'unexpected ValueError'; train.lr=1e-320 trained at an lr of 0 and logged a model its training never
    changed."""
    with pytest.raises(config.ConfigError) as err:
        config.load(None, overrides)
    assert str(err.value) == message
    assert config.load(None, "train.lr=1e38").train.lr == 1e38 and config.load(None, "train.lr=1e-44").train.lr == 1e-44


@pytest.mark.parametrize("step, argv, unread, reads, refused", [
    ("prepare", ["--data", "/no/such/folder"], "train.epochs, train.batch_size, evaluate.tta, register.alias",
     "data.*, tracking.*", "data.source: '/no/such/folder' is neither"),
    ("evaluate", ["--model-uri", "", "--dataset-uri", ""],
     "train.epochs, train.batch_size, data.max_test, register.alias", "evaluate.*, tracking.*", "model_uri: empty"),
    ("register", ["--model-uri", ""], "train.epochs, train.batch_size, data.max_test",
     "register.*, evaluate.*, tracking.*", "model_uri: empty"),
])
def test_overrides_a_step_on_its_own_never_reads_are_named_on_stderr(monkeypatch, capsys, step, argv, unread, reads,
                                                                    refused):
    """`mlflow run . -e evaluate -P overrides="train.epochs=7 evaluate.tta=flip"` left train.epochs unused without a
    word, as if it counted. A line on stderr names the keys that step never reads and what it reads; the step goes on
    (here to refuse its other input)."""
    import importlib

    from pipeline import data

    overrides = "train.epochs=7 train.batch_size=64 data.max_test=100 evaluate.tta=flip register.alias=staging"
    monkeypatch.setattr("sys.argv", [f"pipeline.{step}", *argv, "--overrides", overrides])
    with pytest.raises((config.ConfigError, data.DataError)) as error:
        importlib.import_module(f"pipeline.{step}").main()
    assert str(error.value).startswith(refused), error.value
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert lines == [f"note: {step} reads no {unread} (given in overrides): left unused; it reads {reads}"]
