"""Dataset sources -> uint8 arrays. No MLflow, no Keras model code.

Sources (the `data.source` param):
- `cifar10`: the official `cifar-10-python.tar.gz` from the Keras cache (`$KERAS_HOME` or
  `~/.keras`, folder `datasets/`; /tmp/.keras where that is not writable, as Keras has it), downloaded there if
  absent, verified by its published sha256;
- a path to that archive (under any name: it is known by its contents), to an extracted
  `cifar-10-batches-py/` folder or to a .zip of it;
- a path to an image folder, directory, `.tar.gz` or `.zip`, laid out `train/<class>/*`, `test/<class>/*`
  (under any one top folder);
- a path to an `.npz` of arrays `x_train`, `y_train`, `x_test`, `y_test` (e.g. `keras.datasets.cifar10.load_data()`
  saved with `np.savez`), optionally `class_names`;
- `synthetic`: a generated, learnable 10-class dataset (offline demos and tests).

The official batches are pickles, so they are read with an unpickler that admits only the
types those files contain: a crafted batch cannot run code.
"""

from __future__ import annotations

import bz2
import contextlib
import fcntl
import functools
import gzip
import hashlib
import io
import lzma
import os
import pickle
import posixpath
import re
import stat
import sys
import tarfile
import tempfile
import unicodedata
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
CHANNELS = 3
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Published sha256 of cifar-10-python.tar.gz (the one keras.datasets.cifar10 verifies).
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_ARCHIVE_NAMES = ("cifar-10-python.tar.gz", "cifar-10-batches-py.tar.gz")
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
# md5 of each file of the official archive's cifar-10-batches-py/ (the sums torchvision checks them against): an
# extracted folder in the Keras cache stands for `data.source: cifar10`, keyed by the archive's published sha256
CIFAR10_FILES_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_TRAIN_IMAGES = 50000  # 5 batches of 10,000
CIFAR10_TEST_IMAGES = 10000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what Pillow decodes here
IMAGE_FORMATS = "PNG, JPEG, BMP, GIF, WebP or TIFF"  # their formats, as messages (data and the served model) name them
# Pillow's names for them; only these decoders see the bytes. Pillow opens ~40 formats by content, whatever the suffix:
# a served request or a data file in EPS ran Ghostscript on it (where installed), PPM, TGA, ICO, PSD... were accepted.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
# The largest image file read. Each image's bytes are held in memory until it is decoded, so a 2 GB member named
# x.png (or a tar header claiming that much) took 2-4 GB and many seconds to be found undecodable: it is refused by
# the size its header (or the file system) gives, before it is read. A 32x32 image file is a few KB (tens with
# metadata), a camera photo to be resized a few MB; 128 MiB still holds an uncompressed 40-megapixel RGB TIFF.
MAX_IMAGE_BYTES = 128 << 20
# Folder names that look like a split's, in any case: named when train/ or test/ holds no class folders of images
SPLIT_LIKE_NAMES = ("train", "training", "test", "testing", "val", "valid", "validation", "eval", "dev")
SYNTHETIC_CLASSES = tuple(f"class_{i}" for i in range(10))
SOURCES = ("'cifar10', 'synthetic', the official CIFAR-10 python archive or its cifar-10-batches-py/ folder (or a zip "
           "of it), an image folder (a directory, .tar.gz or .zip of train/<class>/ and test/<class>/ images: "
           f"{IMAGE_FORMATS}) or an .npz")
# evaluate logs `test_acc_<class>`: MLflow's metric names (mlflow.utils.validation) admit these characters only
METRIC_NAME = re.compile(r"[/\w.\- :]+")
METRIC_CHARS = "letters, digits, underscores (_), dashes (-), periods (.), spaces ( ), colons (:) and slashes (/)"
# What a damaged archive raises while it is read: zlib's and lzma's errors are no OSError, and zipfile raises
# NotImplementedError for a directory entry asking for a zip version above the 6.3 it reads (a flipped bit, or a tool's)
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError,
                  NotImplementedError)
# A file named like an archive that neither zipfile nor tarfile can open is a damaged one, not some other file
ARCHIVE_SUFFIXES = (".zip", ".npz", ".tar", ".tgz", ".tbz2", ".txz", ".gz", ".bz2", ".xz")


class DataError(ValueError):
    """A data source is missing, corrupt, tampered with or laid out wrongly."""


@dataclass(frozen=True)
class Dataset:
    """Images are uint8 (N, 32, 32, 3) RGB; labels int32 (N,) indices into `class_names`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    def digest(self, *, test_only: bool = False) -> str:
        """sha256 over every array byte and the class names: one changed pixel changes it. test_only: of the
        test split alone (what test_acc is measured on: two models' scores compare only if it is equal)."""
        arrays = (self.x_test, self.y_test) if test_only else (self.x_train, self.y_train, self.x_test, self.y_test)
        return arrays_digest(arrays, self.class_names)

    def channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the training pixels, in 0-255 units (float64).

        Computed from each channel's histogram of the 256 pixel values: exact, and without a float64
        copy of every pixel (1.2 GB for 50,000 images). The pixels are counted in chunks, channel c's
        value v in bin 256 c + v (3x faster than a bincount per strided channel), once per dataset:
        training builds the model twice (to train, and its inference copy)."""
        mean, std = self._channel_stats
        return mean.copy(), std.copy()

    @functools.cached_property
    def _channel_stats(self) -> tuple[np.ndarray, np.ndarray]:
        pixels = self.x_train.reshape(-1, CHANNELS)
        offsets = (np.arange(CHANNELS) * 256).astype(np.uint16)
        counts = np.zeros(CHANNELS * 256, np.int64)
        for start in range(0, len(pixels), 1 << 20):
            counts += np.bincount((pixels[start:start + (1 << 20)] + offsets).ravel(), minlength=CHANNELS * 256)
        counts = counts.reshape(CHANNELS, 256).astype(np.float64)
        values = np.arange(256, dtype=np.float64)
        n = counts.sum(axis=1)
        mean = counts @ values / n
        return mean, np.sqrt((counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / n)

    def subset(self, *, max_train: int, max_test: int, seed: int) -> Dataset:
        """Keep a seeded random subset of each split (0 = keep all), each split drawn on its own: the test images
        kept depend on (max_test, seed) alone, so runs over different max_train are scored on the same ones. The
        test subset keeps each class's share (to within one image), so its per-class scores rest on as many
        images as the split allows; the training subset is a plain random draw."""

        def pick(x: np.ndarray, y: np.ndarray, n: int, stratify: bool) -> tuple[np.ndarray, np.ndarray]:
            if not n or n >= len(x):
                return x, y
            order = np.random.default_rng(seed).permutation(len(x))
            if stratify:  # by each image's place among its class's, as a fraction: every class advances in step
                labels = y[order]
                place = np.empty(len(order))
                for label in np.unique(labels):
                    members = np.flatnonzero(labels == label)
                    place[members] = (np.arange(len(members)) + 0.5) / len(members)
                order = order[np.argsort(place, kind="stable")]
            keep = np.sort(order[:n])
            return x[keep], y[keep]

        x_train, y_train = pick(self.x_train, self.y_train, max_train, stratify=False)
        x_test, y_test = pick(self.x_test, self.y_test, max_test, stratify=True)
        return Dataset(x_train, y_train, x_test, y_test, self.class_names)

    def save(self, path: str | Path) -> None:
        mean, std = self.channel_stats()
        np.savez(path, x_train=self.x_train, y_train=self.y_train, x_test=self.x_test, y_test=self.y_test,
                 class_names=np.array(self.class_names), mean=mean, std=std)


def load_prepared(path: str | Path) -> Dataset:
    """Read a dataset written by `Dataset.save` (a plain .npz: no pickles allowed; see `load_arrays`)."""
    dataset = load_arrays(path)
    _check_arrays(dataset, str(path))
    return dataset


def _is_zip(path: Path) -> bool:
    """A zip file: one that starts as a zip does, and whose directory zipfile finds at its end. zipfile alone looks
    only at the end: it took a .tar whose last member is a zip (an image folder's tar holding a zip of other images)
    for that zip, and read the zip in the tar's place; a .tar.gz whose compressed bytes hold a zip's end signature
    near their end would be refused as a damaged zip."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with open(path, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")  # a member's local header, or an empty zip's directory


def _is_npz(path: Path) -> bool:
    """NumPy's .npz (a zip of .npy arrays), by its contents."""
    if not _is_zip(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except ARCHIVE_ERRORS:  # a damaged directory (zipfile's BadZipFile was a traceback): the archive reader names it
        return False
    if not names:  # `np.savez(path)` of no arrays: an .npz by its name (read as an image folder with no images)
        return path.name.lower().endswith(".npz")
    return all(name.endswith(".npy") for name in names)


def load_arrays(path: str | Path) -> Dataset:
    """Read arrays `x_train`, `y_train`, `x_test`, `y_test` from an .npz (what `np.savez(path, x_train=...)` writes of
    `keras.datasets.cifar10.load_data()`, or a prepared `dataset.npz`): uint8 (N, 32, 32, 3) images, integer labels
    (N,) or (N, 1). Class names from its `class_names` array, else CIFAR-10's when the labels lie in 0-9."""
    required = ("x_train", "y_train", "x_test", "y_test")
    arrays, key = {}, None
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in (k for k in f.files if k in (*required, "class_names")):
                arrays[key] = f[key]
    except Exception as exc:  # noqa: BLE001 - an object array (ValueError: needs pickles), or a damaged file: zipfile,
        # zlib and numpy's header parser (tokenize.TokenError) each raise their own
        if not isinstance(exc, OSError) and not _is_zip(Path(path)):  # numpy read a text file as a pickle
            raise DataError(f"{path}: not an .npz file (an .npz is a zip archive of .npy arrays; this is none, or one "
                            f"cut short)") from None
        raise DataError(f"{path}: unreadable .npz ({f'array {key}: ' if key else ''}{exc})") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise DataError(f"{path}: no array {', '.join(missing)} (an .npz source holds {', '.join(required)}, "
                        f"and optionally class_names)")
    labels = {}
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if y.ndim == 2 and y.shape[1] > 1:  # was "must hold integer labels, got float32", or a shape mismatch
            raise DataError(f"{path}: y_{split} holds rows of {y.shape[1]} values per image, shape {y.shape} (one-hot, "
                            f"as keras.utils.to_categorical writes them?): give one class index per image, "
                            f"y_{split}.argmax(axis=1)")
        if y.dtype.kind not in "iu":  # not np.integer: timedelta64 is one to numpy, its counts read as class indices
            raise DataError(f"{path}: y_{split} must hold integer labels, got {y.dtype}")
        labels[split] = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if "class_names" in arrays:
        names = _class_names(arrays["class_names"], f"{path}: class_names")
    elif max(labels["train"].max(initial=0), labels["test"].max(initial=0)) < len(CIFAR10_CLASSES):
        names = CIFAR10_CLASSES
    else:
        raise DataError(f"{path}: labels beyond 0-9 need a class_names array")
    for split, y in labels.items():  # before the int32 cast, which would wrap 2**32 + 1 to 1
        if y.size:
            _check_label_range(y.min(), y.max(), len(names), f"{path}: y_{split}")
    return Dataset(arrays["x_train"], labels["train"].astype(np.int32), arrays["x_test"],
                   labels["test"].astype(np.int32), names)


def _class_names(values: object, where: str) -> tuple[str, ...]:
    """A flat list (or 1-d array) of str or UTF-8 bytes names -> str names; anything else is refused."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "US":
            raise DataError(f"{where} must be a 1-d array of class names (text), got {values.ndim}-d {values.dtype}")
        values = values.tolist()
    bad = [v for v in values if not isinstance(v, (str, bytes))] if isinstance(values, (list, tuple)) else [values]
    if bad:
        raise DataError(f"{where} must be a list of class names (text), got {bad[0]!r:.40} ({type(bad[0]).__name__})")
    try:
        return tuple(v.decode() if isinstance(v, bytes) else v for v in values)
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: a class name is not UTF-8 text ({exc})") from None


def _check_class_names(names: tuple[str, ...], origin: str) -> None:
    """Every source's class names: two or more, unique, and each usable in the metric name `test_acc_<class>` (MLflow's
    rule: its characters, at most 250 in all, and no path part to normalise away), so that evaluate cannot fail on
    them after training."""
    if not names:
        raise DataError(f"{origin}: no class names")
    if len(names) < 2:  # one softmax output is always 1: a model that learned nothing scored test_acc 1.0
        raise DataError(f"{origin}: need at least 2 classes, found {list(names)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{origin}: duplicate class names {duplicates}")
    for name in names:
        metric = f"test_acc_{name}"
        if not METRIC_NAME.fullmatch(name) or posixpath.normpath(metric) != metric or len(metric) > 250:
            raise DataError(f"{origin}: class name {name!r} cannot be used (evaluate logs test_acc_<class>): a class "
                            f"name is 1-241 {METRIC_CHARS}, with no empty, '.' or '..' part between slashes")
    nested = sorted((n, m) for n in names for m in names if m.startswith(n + "/"))
    if nested:  # a file store keeps metric test_acc_a in a file where test_acc_a/b needs a folder
        raise DataError(f"{origin}: class names {nested[0][0]!r} and {nested[0][1]!r} clash as metric names "
                        f"test_acc_{nested[0][0]} and test_acc_{nested[0][1]} (a file and a folder of one name in a "
                        "file-based MLflow store): rename one")


def _check_label_range(low: int, high: int, n_classes: int, where: str) -> None:
    if low < 0 or high >= n_classes:
        raise DataError(f"{where} must lie in [0, {n_classes}) ({n_classes} class names), got [{low}, {high}]")


def _check_arrays(d: Dataset, origin: str) -> None:
    _check_class_names(d.class_names, origin)
    for split, x, y in (("train", d.x_train, d.y_train), ("test", d.x_test, d.y_test)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, CHANNELS):
            raise DataError(f"{origin}: {split} images must be uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
        if y.shape != (len(x),):
            raise DataError(f"{origin}: {split} has {len(x)} images but labels of shape {y.shape}")
        if len(x) == 0:
            raise DataError(f"{origin}: the {split} split is empty")
        _check_label_range(y.min(), y.max(), len(d.class_names), f"{origin}: {split} labels")


def arrays_digest(arrays, class_names) -> str:
    """sha256 over the arrays' shapes and bytes, then the class names: `Dataset.digest`, and that of a training
    run's validation images (`val_data_sha256`; on the test split it equals the test split's digest)."""
    h = hashlib.sha256()
    for array in arrays:
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    h.update("\n".join(class_names).encode())
    return h.hexdigest()


def file_sha256(path: str | Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def source_digest(source: str) -> str:
    """Fingerprint of what `source` names, cheap enough to compute before every prepare.

    Files: sha256 of their bytes. Folders: sha256 over each file read's relative path, a NUL (no path holds one) and
    the sha256 of its bytes: run together, a name's first bytes moved to the end of the file before it gave the same
    digest, and the dataset of the folder before was reused. The files read are an image folder's images in class
    folders (`_read_as_image`), with its class folders' paths (an empty one is refused) and the images it cannot read
    (a link to nothing, a FIFO: refused), or a batches folder's 7 files: a README.txt, .DS_Store or Thumbs.db beside
    them was hashed too, and editing one prepared the same arrays afresh.
    `synthetic` is defined by code and params alone; `cifar10` by its published checksum.
    """
    if source == "synthetic":
        return "synthetic"
    if source == "cifar10":
        return CIFAR10_SHA256
    path = Path(source)
    try:
        if path.is_file():
            return file_sha256(path)
        if path.is_dir():
            h = hashlib.sha256()
            if folder := _cifar_folder(path):
                files = [folder / name for name in ("batches.meta", *CIFAR10_TRAIN_BATCHES, "test_batch")
                         if (folder / name).is_file()]  # one missing is refused when read
            else:
                folders, dead_links, special = [], [], []
                files = [f for f in _files_under(path, folders, dead_links, special)
                         if _read_as_image(f.relative_to(path).parts)]
                unreadable = sorted([*dead_links, *(f for f, _ in special)])
                for name in sorted(f.relative_to(path) for f in folders if _is_class_folder(f.relative_to(path).parts)):
                    h.update(os.fsencode(name) + b"/\0")
                for file in unreadable:
                    if _read_as_image(file.relative_to(path).parts):
                        h.update(os.fsencode(file.relative_to(path)) + b"\0unreadable\0")
            for file in files:
                h.update(os.fsencode(file.relative_to(path)) + b"\0")
                with open(file, "rb") as f:  # in chunks: a 2 GB file in the folder took 2 GB of memory to be hashed
                    h.update(hashlib.file_digest(f, "sha256").digest())
            return h.hexdigest()
    except OSError as exc:  # e.g. a file copied in by another user, unreadable: was a traceback
        raise _unreadable(exc) from None
    raise _no_source(source)


def shells_folder_hint(path: str) -> str:
    """Where `path`, relative and missing here, exists in the folder the command was given in, and that is not this
    process's: `mlflow run` runs each step in the project's folder (through `bash -c`, which execs the step and resets
    $PWD to that folder), so `-P data=images` given beside `images` names nothing there. That folder is the parent's,
    `mlflow run`'s, or a shell's $PWD, which a process started in another folder keeps. Said as " (not in ...)" to end
    a line naming `path` missing; "" otherwise."""
    if not path or os.path.isabs(path):
        return ""
    folders = [os.environ.get("PWD", "")]
    with contextlib.suppress(OSError):
        folders.append(os.readlink(f"/proc/{os.getppid()}/cwd"))  # Linux; elsewhere $PWD alone
    for folder in folders:
        with contextlib.suppress(OSError):
            there = os.path.join(folder, path)
            if os.path.isabs(folder) and not os.path.samefile(folder, os.getcwd()) and os.path.lexists(there):
                return (f" (not in {os.getcwd()}, the folder mlflow run runs each step in, but in {folder}, where the "
                        f"command was given: give its absolute path, {there})")
    return ""


URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a scheme and `//`: s3://, https://, file:///


def _no_source(source: str) -> DataError:
    """`source` names nothing: no built-in source, no path, or a link to nothing (a dataset moved, a mount not there),
    which `ls` lists: said as such, naming its target."""
    if os.path.islink(source):
        return DataError(f"data.source: {source!r} is a link to {os.path.realpath(source)}, which does not exist")
    if source.startswith("runs:/"):  # prepare's last line, `dataset_uri=runs:/...`, given as -P data
        return DataError(f"data.source: {source!r} is a prepared dataset's URI, which train and evaluate take as "
                         f"-P dataset_uri={source}")
    if source.startswith("file:"):  # `file:///x` or, spelled one way as a path (`config.normal_source`), `file:/x`
        return DataError(f"data.source: {source!r} is a file URI: give the path, {urllib.parse.urlparse(source).path}")
    if URI.match(source):  # s3://, gs://, https://: a remote copy, which no step downloads
        return DataError(f"data.source: {source!r} is a URI: prepare reads a file or folder on this machine; download "
                         f"it and give its path")
    # CIFAR10, cifar-10, Synthetic: the name spelled otherwise (not a near name: cifar100 is another dataset)
    meant = next((name for name in ("cifar10", "synthetic") if re.sub(r"[-_ ]", "", source.lower()) == name), None)
    return DataError(f"data.source: {source!r} is neither 'cifar10', 'synthetic' nor an existing path"
                     + (f"; did you mean {meant}?" if meant else shells_folder_hint(source)))


def _unreadable(exc: OSError) -> DataError:
    return DataError(f"{exc.filename}: cannot be read ({exc.strerror or exc})")


def _refuse_unlistable(exc: OSError) -> None:
    raise _unreadable(exc)


def _files_under(path: Path, folders: list[Path] | None = None, dead_links: list[Path] | None = None,
                 special: list[tuple[Path, int]] | None = None) -> list[Path]:
    """Every file under a folder, sorted, through linked folders too: Python 3.11's rglob does not enter them, so a
    class folder linked in from elsewhere was dropped unseen. A link to a folder above it (a loop) is refused, and so
    are a folder that cannot be listed and a file that cannot be looked at (os.walk skipped the one, os.path.isfile
    said False of the other: a class folder another user owns, mode 700 or 644, was dropped unseen). `folders`, if
    given, gets every folder under it (an empty class folder is one); `dead_links`, if given, every link to nothing;
    `special`, if given, every FIFO, device file or socket, with its mode."""
    files = []
    for folder, subfolders, names in os.walk(path, followlinks=True, onerror=_refuse_unlistable):
        here = os.path.realpath(folder)
        for name in subfolders:
            target = os.path.realpath(os.path.join(folder, name))
            if os.path.commonpath((here, target)) == target:  # the link's target holds this folder
                raise DataError(f"{Path(folder) / name}: a link to a folder above it (a loop)")
            if folders is not None:
                folders.append(Path(folder) / name)
        for name in names:
            try:
                mode = os.stat(os.path.join(folder, name)).st_mode
                if stat.S_ISREG(mode):
                    files.append(Path(folder) / name)
                elif special is not None:
                    special.append((Path(folder) / name, mode))
            except FileNotFoundError:  # a link to nothing: no file
                if dead_links is not None and os.path.islink(os.path.join(folder, name)):
                    dead_links.append(Path(folder) / name)
            except OSError as exc:
                raise _unreadable(exc) from None
    return sorted(files)


def source_format(source: str) -> str:
    """How `source` is read: 'synthetic'; 'batches' (the official python batches: `cifar10`, its archive, folder or
    zip); 'npz'; or 'images' (an image folder, directory or archive, whose images Pillow decodes). DataError for a
    path to nothing."""
    if source in ("synthetic", "cifar10"):
        return "batches" if source == "cifar10" else source
    path = Path(source)
    if not path.exists():
        raise _no_source(source)
    if path.is_file() and path.stat().st_size == 0:  # was "not a whole zip or tar file", or every source listed
        raise DataError(f"{source}: an empty file (0 bytes), not a dataset: a download or a copy cut short? Copy or "
                        "download it again")
    return "batches" if _looks_like_cifar_python(path) else "npz" if _is_npz(path) else "images"


def decoders(source: str) -> dict[str, str]:
    """The versions of the libraries that decode `source`'s images, where it has images to decode ('images'; {} for the
    others, read as the arrays they hold): Pillow (its resize and conversions) and the codecs it decodes with. Another
    JPEG decoder (libjpeg-turbo) may give other pixels: part of prepare's key, so a dataset decoded by one is not
    reused as another's."""
    if source_format(source) != "images":
        return {}
    import PIL
    from PIL import features

    return {"pillow": PIL.__version__, **{codec: features.version(codec) or "none"
                                          for codec in ("jpg", "libjpeg_turbo", "webp", "libtiff")}}


def load_source(source: str, *, synthetic_train: int = 10000, synthetic_test: int = 2000, seed: int = 0) -> Dataset:
    """Read the dataset `source` names (see the module docstring) into uint8 arrays."""
    kind = source_format(source)
    if kind == "synthetic":
        dataset = make_synthetic(n_train=synthetic_train, n_test=synthetic_test, seed=seed)
    elif source == "cifar10":
        dataset = load_cifar10_archive(fetch_cifar10())
    else:
        dataset = {"batches": load_cifar10_archive, "npz": load_arrays, "images": load_image_folder}[kind](source)
    _check_arrays(dataset, source)
    if dataset.y_train.min() == dataset.y_train.max():  # as one class name (refused): right on that class's test
        # labels whatever it sees. Of the source only: a prepared subset (data.max_train) of one image is one class too
        label = int(dataset.y_train[0])
        raise DataError(f"{source}: every training image is of class {dataset.class_names[label]!r} (label {label}): "
                        "a model of one class learns nothing and scores test_acc 1.0 on it; need images of at least "
                        "2 classes")
    if kind != "synthetic":  # whose labels are drawn at random: its sizes are the user's to choose
        _refuse_untrained_classes(dataset, source, kind)
    return dataset


def _refuse_untrained_classes(dataset: Dataset, source: str, kind: str) -> None:
    """DataError naming the classes no training image is of (an .npz of labels 0-8 under CIFAR-10's ten names, batches
    with no truck): the model had an output nothing trained, for a class it scored 0 on, or on no image at all. A
    class the test split lacks is read: evaluate scores the classes it has. (An image folder's classes are folders of
    images in both splits, refused otherwise.)"""
    trained = np.bincount(dataset.y_train, minlength=len(dataset.class_names))
    missing = np.flatnonzero(trained == 0)
    if not len(missing):
        return
    tested = np.bincount(dataset.y_test, minlength=len(dataset.class_names))
    what = "training images" if tested[missing].any() else "images"
    named = ", ".join(f"{dataset.class_names[i]!r} (label {i})" for i in missing[:5]) + (
        ", ..." if len(missing) > 5 else "")
    fix = {"npz": "give a class_names array naming only the classes it holds",
           "batches": "remove it from batches.meta's label_names"}.get(kind, "remove it")
    raise DataError(f"{source}: class{'es' if len(missing) > 1 else ''} {named} ha{'ve' if len(missing) > 1 else 's'} "
                    f"no {what}: a class with no training images cannot be learned; {fix}, or add its images")


def test_images_in_train(x_train: np.ndarray, x_test: np.ndarray) -> int:
    """How many test images are training images too, pixel for pixel (a file copied into both splits, a split made
    twice): test_acc scores them as unseen, so it overstates. CIFAR-10 has none (nor has its JPEG q75 copy). Train
    counts the images val_acc is measured on against those it trains on with it too (`val_images_in_train`).

    Each image is keyed by a 64-bit sum of its bytes as 8-byte words times fixed odd multipliers (0.1 s for
    60,000 images, against 0.6 s hashing each with blake2b in Python); a test image whose key some training image
    has is then compared with those images byte for byte, so a key shared by chance counts nothing."""
    if not len(x_train) or not len(x_test):
        return 0
    flat = [np.ascontiguousarray(x).reshape(len(x), -1) for x in (x_train, x_test)]
    pad = -flat[0].shape[1] % 8  # 32x32x3 images are whole words; other shapes are padded to them
    words = [np.pad(f, ((0, 0), (0, pad))).view(np.uint64) if pad else f.view(np.uint64) for f in flat]
    multipliers = np.random.default_rng(0).integers(1, 2 ** 63, words[0].shape[1], dtype=np.uint64) | np.uint64(1)
    train_keys, test_keys = (w @ multipliers for w in words)  # wraps around modulo 2**64, as meant
    order = np.argsort(train_keys, kind="stable")
    sorted_keys = train_keys[order]
    count = 0
    for i in np.flatnonzero(np.isin(test_keys, train_keys)):
        same_key = order[np.searchsorted(sorted_keys, test_keys[i]):np.searchsorted(sorted_keys, test_keys[i], "right")]
        count += bool((flat[0][same_key] == flat[1][i]).all(axis=1).any())
    return count


# --- official CIFAR-10 python archive -------------------------------------------------------

def keras_home() -> Path:
    """Keras's folder, found as Keras finds it (keras.src.backend.config): $KERAS_HOME, else ~/.keras, or /tmp/.keras
    where the home folder is not writable."""
    folder = os.environ.get("KERAS_HOME")
    if folder is None:
        home = os.path.expanduser("~")
        folder = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    return Path(folder).expanduser()


def keras_cache_dir() -> Path:
    """Where keras.utils.get_file keeps datasets: `datasets/` of keras_home(), or of /tmp/.keras where that folder is
    not writable (one not made yet counts as its nearest folder, as Keras makes it on import)."""
    base = keras_home()
    existing = next(folder for folder in (base, *base.parents) if folder.exists())
    if not os.access(existing, os.W_OK):
        base = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / ".keras"
    return base / "datasets"


def fetch_cifar10() -> Path:
    """Path of a verified official archive (or extracted folder) from the Keras cache, else download. Commands that
    download it at once take turns (a file lock in the cache): Keras writes the download into the cache's file, so
    two writing it together left a file that failed its hash check (each later one finds the first's download).
    Downloaded under a name of its own, renamed once whole and verified: Keras removes what it wrote on an Exception
    only, so an interrupted download (Ctrl-C, the SIGTERM `mlflow run` sends its step, a kill) left a truncated
    archive under its name, which every later command refused until it was deleted by hand."""
    cache = keras_cache_dir()
    found = _cifar10_in_cache(cache)
    if found:
        return found
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f".{CIFAR10_ARCHIVE_NAMES[0]}.lock", "a")  # noqa: SIM115 - held until the download ends
    except OSError as exc:  # a cache not ours: Keras could not write the download there either
        raise DataError(f"data.source: cannot download CIFAR-10 into {cache} ({exc.strerror or exc}). "
                        f"{_without_download(cache)}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        found = _cifar10_in_cache(cache)  # another command's download, finished while this one waited
        if found:
            return found
        try:
            import keras  # downloads are Keras's job: it retries, caches and checks the hash

            partial = keras.utils.get_file(fname=f".{CIFAR10_ARCHIVE_NAMES[0]}.partial", origin=CIFAR10_URL,
                                           file_hash=CIFAR10_SHA256, hash_algorithm="sha256",
                                           cache_dir=str(cache.parent), cache_subdir=cache.name)
            archive = cache / CIFAR10_ARCHIVE_NAMES[0]
            os.replace(partial, archive)
            return archive
        except Exception as exc:  # noqa: BLE001 - any network or hash failure ends the same way
            raise DataError(f"data.source: cannot download CIFAR-10 ({type(exc).__name__}: {exc}). "
                            f"{_without_download(cache)}") from None


def _without_download(cache: Path) -> str:
    """How to go on where CIFAR-10 cannot be downloaded into the Keras cache `cache`."""
    return (f"Put the official cifar-10-python.tar.gz ({CIFAR10_URL}) in {cache}/ or pass its path (or an image "
            f"folder) as -P data=PATH")


def _cifar10_in_cache(cache: Path) -> Path | None:
    """The verified official archive, or an extracted folder, the Keras cache holds; None if it holds neither."""
    # Keras 3's own `keras.datasets.cifar10.load_data()` keeps the archive as `cifar-10-batches-py-target_archive`
    # and extracts it under `cifar-10-batches-py-target/`: a machine that ran it has CIFAR-10 already
    for name in (*CIFAR10_ARCHIVE_NAMES, f"{CIFAR10_DIR}-target_archive"):
        archive = cache / name
        if archive.is_file():
            verify_sha256(archive, CIFAR10_SHA256)
            return archive
    for folder in (cache / CIFAR10_DIR, cache / f"{CIFAR10_DIR}_extracted" / CIFAR10_DIR,
                   cache / f"{CIFAR10_DIR}-target" / CIFAR10_DIR):
        if (folder / "batches.meta").is_file():
            verify_cifar10_folder(folder)
            return folder
    return None


def verify_cifar10_folder(folder: Path) -> None:
    """DataError naming the first file of an extracted official folder that is missing, unreadable or not the official
    bytes (`CIFAR10_FILES_MD5`). It stands for the official CIFAR-10, whose published checksum keys its prepare runs
    unread: a truncated extraction or an edited batch was read and prepared as the official data, without a word."""
    for name, expected in CIFAR10_FILES_MD5.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: missing from the extracted CIFAR-10 folder; delete the folder (the official "
                            f"archive is then fetched again)")
        try:
            actual = file_sha256(path, "md5")
        except OSError as exc:
            raise _unreadable(exc) from None
        if actual != expected:
            raise DataError(f"{path}: md5 {actual} does not match the official {expected}; the extracted folder is "
                            f"truncated or not the official CIFAR-10: delete it (the archive is then fetched again), "
                            f"or pass it as -P data={folder} to train on it as it is")


def verify_sha256(path: Path, expected: str) -> None:
    try:
        actual = file_sha256(path)
    except OSError as exc:  # e.g. an archive another user put in a shared Keras cache, unreadable: was a traceback
        raise _unreadable(exc) from None
    if actual != expected:
        raise DataError(f"{path}: sha256 {actual} does not match the published {expected}; "
                        f"the file is truncated or not the official archive: delete it and fetch it again")


def _looks_like_cifar_python(path: Path) -> bool:
    """The official layout by its contents, whatever the archive's name: the folder holds `batches.meta` (or
    `cifar-10-batches-py/` does), one of the first members of the tar archive is a python batch, or a zip holds
    one (`cifar-10-batches-py/` zipped: it was read as an image folder with no images)."""
    if path.is_dir():
        return _cifar_folder(path) is not None
    if path.name in CIFAR10_ARCHIVE_NAMES:
        return True
    batches = {"batches.meta", "test_batch", *CIFAR10_TRAIN_BATCHES}
    if _is_zip(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(_zip_name(m).rsplit("/", 1)[-1] in batches for m in archive.infolist() if not m.is_dir())
        except ARCHIVE_ERRORS:
            return False  # the image folder reader names what is wrong with it
    try:
        with tarfile.open(path, "r:*", tarinfo=_CheckedTarInfo) as tar:
            for _, member in zip(range(16), tar, strict=False):  # the official one lists its batches first
                if member.isfile() and member.name.rsplit("/", 1)[-1] in batches:
                    return True
    except ARCHIVE_ERRORS:
        return False  # the image folder reader names what is wrong with it
    return False


def _cifar_folder(path: Path) -> Path | None:
    """The folder of official batches a folder is, or holds as `cifar-10-batches-py/`: one holding any of the batch
    files (an extraction cut short, its batches.meta missing, was read as an image folder with no images); else None."""
    names = ("batches.meta", "test_batch", *CIFAR10_TRAIN_BATCHES)
    return next((folder for folder in (path, path / CIFAR10_DIR) if any((folder / n).is_file() for n in names)), None)


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile ends an archive's member list, silently, at any damaged or missing header after the first one: a
    truncated or bit-flipped archive would read as a shorter one (fewer images, no error). Here only tar's
    end-of-archive block ends it; any other bad header is an error."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive block
            raise
        except tarfile.HeaderError as exc:
            raise tarfile.ReadError(f"damaged or missing member header at byte {tar.offset}: {exc}") from None


def _read_to_end(tar: tarfile.TarFile) -> None:
    """Read a compressed archive's stream to its end, where gzip, bzip2 and xz check their checksum: tarfile stops
    at tar's end-of-archive block, so a flipped bit in a member's data would otherwise go unnoticed."""
    while tar.fileobj.read(1 << 20):
        pass


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10 python batches hold: dicts, lists, bytes, ints, numpy arrays and numpy integers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes; runs no code
        # an array pickled with protocol 5 (`pickle.HIGHEST_PROTOCOL`), and a numpy integer (labels kept as
        # `list(labels)`): each builds its value from the bytes given, running no code. Batches pickled anew by
        # Python 3 were refused as "forbidden type"
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }
    # Protocol 2 pickles empty bytes (the pixels of a batch of no images) as a call of bytes() with no arguments:
    # admitted as that call alone, not bytes(n), which would allocate n bytes (a batch of no images was refused as
    # a "forbidden type", pointing at a crafted pickle)
    EMPTY_BYTES = {("__builtin__", "bytes"), ("builtins", "bytes")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in self.EMPTY_BYTES:
            return _empty_bytes
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden type {module}.{name}")
        return super().find_class(module, name)


def _empty_bytes(*args: object) -> bytes:
    if args:
        raise pickle.UnpicklingError(f"forbidden call bytes{args!r:.40}")
    return b""


def _unpickle_batch(raw: bytes, name: str) -> dict:
    if not raw:  # pickle's own words: "Ran out of input"
        raise DataError(f"{name}: an empty file (0 bytes), not a CIFAR-10 batch: a copy or an extraction cut short? "
                        "Copy or extract it again")
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt and crafted files all end here
        raise DataError(f"{name}: not a valid CIFAR-10 batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"{name}: not a valid CIFAR-10 batch (holds a {type(batch).__name__})")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _batch_arrays(batch: dict, name: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if missing := [key for key in ("data", "labels") if key not in batch]:  # a CIFAR-100 batch: `fine_labels`
        held = ", ".join(sorted(repr(key) for key in batch if isinstance(key, str))) or "no keys"
        raise DataError(f"{name}: no {' or '.join(map(repr, missing))} in this batch (it holds {held}); "
                        "a CIFAR-10 batch holds 'data' and 'labels'")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != IMAGE_SIZE * IMAGE_SIZE * CHANNELS:
        raise DataError(f"{name}: 'data' must be an (N, 3072) array")
    if not len(data):  # refused as any other batch it cannot be: read, it was a batch of images fewer, unsaid
        raise DataError(f"{name}: holds no images (a CIFAR-10 batch holds 'data' of (N, 3072) pixels with N > 0)")
    if data.dtype.kind not in "iu":
        raise DataError(f"{name}: 'data' must hold integer pixel values 0-255, got {data.dtype}")
    if data.dtype != np.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{name}: 'data' must hold pixel values 0-255, got [{data.min()}, {data.max()}]")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)):
        raise DataError(f"{name}: 'labels' must be a list of integers, got {type(labels).__name__}")
    # bools and floats (1.7) are not class indices either; numpy integers are (`list(labels)` keeps them)
    bad = [v for v in labels if type(v) is not int and not isinstance(v, np.integer)]
    if bad:
        raise DataError(f"{name}: 'labels' must be integers, got {bad[0]!r:.40} ({type(bad[0]).__name__})")
    if len(labels) != len(data):
        raise DataError(f"{name}: 'labels' must have one entry per image ({len(labels)} for {len(data)} images)")
    labels = [int(v) for v in labels]
    if labels:
        _check_label_range(min(labels), max(labels), n_classes, f"{name}: 'labels'")
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each image row-major.
    x = data.astype(np.uint8).reshape(-1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), np.asarray(labels, dtype=np.int32)


def load_cifar10_archive(path: str | Path) -> Dataset:
    """Read the official python-format archive (.tar.gz), its extracted folder or a .zip of that folder."""
    path = Path(path)
    needed = ("batches.meta", *CIFAR10_TRAIN_BATCHES, "test_batch")
    if path.is_dir():
        folder = _cifar_folder(path) or path
        where = {n: str(folder / n) for n in needed}
        try:
            raw = {n: (folder / n).read_bytes() for n in needed}
        except FileNotFoundError as exc:
            raise DataError(f"{exc.filename}: missing (expected the 7 files of {CIFAR10_DIR}/: "
                            f"{', '.join(needed)})") from None
        except OSError as exc:  # a batch another user owns (the `cifar10` source reads an extracted folder in the
            # Keras cache as it is), or a folder in its place: was a traceback
            raise _unreadable(exc) from None
    elif _is_zip(path):
        raw, where = {}, {}
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.infolist():
                    name = _zip_name(member)
                    base = name.rsplit("/", 1)[-1]
                    if not member.is_dir() and base in needed:
                        _refuse_second_copy(path, where.get(base), name)
                        raw[base] = _read_member(path, archive, member, member.file_size + 1)
                        where[base] = f"{path}:{name}"
        except ARCHIVE_ERRORS as exc:
            raise DataError(f"{path}: unreadable archive ({exc}); it may be truncated") from None
        missing = [n for n in needed if n not in raw]
        if missing:
            raise DataError(f"{path}: missing {', '.join(missing)} (expected {CIFAR10_DIR}/ with the 6 batches)")
    else:
        raw, where = {}, {}
        try:
            if not tarfile.is_tarfile(path):  # any compression, as _looks_like_cifar_python opened it
                raise DataError(f"{path}: not a tar archive (expected the official {CIFAR10_ARCHIVE_NAMES[0]})")
            with tarfile.open(path, "r:*", tarinfo=_CheckedTarInfo) as tar:
                for member in tar:  # read in place: nothing is extracted to disk
                    base = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and base in needed:
                        _refuse_second_copy(path, where.get(base), member.name)
                        raw[base], where[base] = tar.extractfile(member).read(), f"{path}:{member.name}"
                _read_to_end(tar)
        except ARCHIVE_ERRORS as exc:
            raise DataError(f"{path}: unreadable archive ({exc}); it may be truncated") from None
        missing = [n for n in needed if n not in raw]
        if missing:
            raise DataError(f"{path}: missing {', '.join(missing)} (expected {CIFAR10_DIR}/ with the 6 batches)")

    meta_name = where["batches.meta"]
    meta = _unpickle_batch(raw["batches.meta"], meta_name)
    if "label_names" not in meta:
        raise DataError(f"{meta_name}: no label_names")
    class_names = _class_names(meta["label_names"], f"{meta_name}: label_names")
    _check_class_names(class_names, meta_name)
    train = [_batch_arrays(_unpickle_batch(raw[n], where[n]), where[n], len(class_names))
             for n in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _batch_arrays(_unpickle_batch(raw["test_batch"], where["test_batch"]), where["test_batch"],
                                   len(class_names))
    return Dataset(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
                   x_test, y_test, class_names)


def _refuse_second_copy(path: Path, first: str | None, name: str) -> None:
    """DataError where an archive holds a batch in a second folder (`first`: where it held it, `path:name`): each
    batch, the last of its name, was read from either copy, a dataset of both. The same name again (`tar -u`) is
    read once, its last copy, as extracting the archive leaves it."""
    if first is None:
        return
    before, base = posixpath.split(first.removeprefix(f"{path}:"))
    now = posixpath.dirname(name)
    if posixpath.normpath(before) != posixpath.normpath(now):
        places = [f"{folder}/" if folder else "its top" for folder in (before, now)]
        raise DataError(f"{path}: holds {base} twice, in {places[0]} and {places[1]}: give an archive or folder of "
                        f"one {CIFAR10_DIR}/")


# --- image folders ----------------------------------------------------------------------------

def decode_image(raw: bytes, name: str = "image") -> np.ndarray:
    """Encoded image bytes (IMAGE_FORMATS) -> uint8 (32, 32, 3) RGB. Other sizes are resized (bilinear, Pillow).

    Training data and served images both go through this function, so they match. A photo's EXIF orientation is
    applied (a phone's portrait JPEG is stored on its side), and 16-bit images are scaled to 8 bits (Pillow's
    RGB conversion clips them: mid-grey would read as white); 32-bit ones, of unknown scale, are refused. A transparent
    background is white (composited onto it), not the colour the file stores under it.
    """
    from PIL import ExifTags, Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw), formats=PIL_FORMATS) as img:
            # 32-bit TIFFs (float "F", integer "I") hold 0-1, 0-255 or any range: read as 8 or 16 bits, 0-1 floats and
            # 0-255 integers came out black. (16-bit images open as I;16, a 16-bit PGM as I: no BitsPerSample tag.)
            if img.mode == "F" or (img.mode == "I" and getattr(img, "tag_v2", {}).get(258) == (32,)):
                raise DataError(f"{name}: a 32-bit {'float' if img.mode == 'F' else 'integer'} image, whose pixel "
                                f"scale is unknown: save it with 8 or 16 bits per channel")
            # Upright as its EXIF says, read only: Pillow's ImageOps.exif_transpose also writes the EXIF back, less the
            # orientation, and that failed (struct.error, a traceback) on a tag stored with another type than TIFF's
            method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,  # exif_transpose's table
                      4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                      7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
                      }.get(img.getexif().get(ExifTags.Base.Orientation, 1))
            if method is not None:
                img = img.transpose(method)
            if img.mode.startswith("I"):  # 16-bit greyscale PNGs open as I;16 or I
                # round(v / 257) in integers, in place: float64 took 316 MiB for a 16.8-megapixel image
                values = np.asarray(img).astype(np.int32, copy=False)
                np.clip(values, 0, 65535, out=values)
                values += 128
                values //= 257
                img = Image.fromarray(values.astype(np.uint8))
                del values  # before the RGB copy below
            if img.has_transparency_data:  # an alpha channel, a palette's or a PNG's transparent colour (tRNS)
                # onto white: convert("RGB") drops the alpha, showing the colour the file stores under a transparent
                # background (often black), a logo on a transparent page read as on a black one
                img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
            if img.mode != "RGB":  # Pillow's convert to the same mode copies: 64 MiB more at 16.8 megapixels
                img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # a canvas beyond Pillow's pixel limit, refused before decoding
        raise DataError(f"{name}: image too large ({exc})") from None
    except UnidentifiedImageError:  # Pillow's message names the file as <_io.BytesIO object at 0x...>
        raise DataError(f"{name}: not a decodable {IMAGE_FORMATS} image (not one of those formats)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{name}: not a decodable {IMAGE_FORMATS} image ({exc})") from None


def _archive_reader(path: Path, read):  # noqa: ANN001, ANN202 - a bytes reader in, one out
    """`read`, with a damaged member's error as a DataError naming the archive."""

    def checked(n: int) -> bytes:
        try:
            return read(n)
        except ARCHIVE_ERRORS as exc:
            raise DataError(f"{path}: unreadable archive ({exc}); it may be truncated") from None

    return checked


_FILE_KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
               stat.S_IFSOCK: "a socket"}
_TAR_KINDS = {tarfile.FIFOTYPE: "a FIFO (named pipe)", tarfile.CHRTYPE: "a character device",
              tarfile.BLKTYPE: "a block device"}


def _not_a_file(where: str, kind: str, n: int) -> bytes:
    raise DataError(f"{where}: {kind}, not a file: no image can be read from it; remove it or put the image in its "
                    "place")


def _dead_link(link: Path, n: int) -> bytes:
    raise DataError(f"{link}: a link to {os.readlink(link)}, which does not exist: fetch the file it names, or remove "
                    "the link")


def _read_file(file: Path, n: int) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read(n)
    except OSError as exc:  # e.g. an image another user owns: was a traceback
        raise _unreadable(exc) from None


def _read_member(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo, n: int) -> bytes:
    # zipfile refused these with a traceback (RuntimeError, NotImplementedError): said in one line instead
    if member.flag_bits & 0x1:
        raise DataError(f"{path}:{_zip_name(member)}: encrypted (a password-protected zip): zip the images without one")
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        raise DataError(f"{path}:{_zip_name(member)}: compressed with zip method {member.compress_type} (e.g. "
                        "Deflate64 or zstd), which Python cannot read: zip the images with plain deflate")
    with archive.open(member) as f:  # read(n) inflates at most n bytes, whatever size the zip's directory gives
        return f.read(n)


def _read_image(read, size: int | None, where: str) -> bytes:  # noqa: ANN001 - a reader of at most n bytes
    """An image file's bytes, refused (naming it) beyond MAX_IMAGE_BYTES: by `size` (its tar or zip header's, its
    file's), before reading, and by reading at most one byte more (a tar link, whose size is its target's). Not
    read(MAX_IMAGE_BYTES + 1) for every file: Python allocates what read(n) asks for before it reads."""
    limit = f"more than the {MAX_IMAGE_BYTES >> 20} MiB an image file may have: not an image, or save it smaller"
    if size is not None and size > MAX_IMAGE_BYTES:
        raise DataError(f"{where}: {size:,} bytes, {limit}")
    raw = read((MAX_IMAGE_BYTES if size is None else size) + 1)
    if len(raw) > MAX_IMAGE_BYTES:
        raise DataError(f"{where}: {limit}")
    return raw


def _zip_name(member: zipfile.ZipInfo) -> str:
    # Windows PowerShell's Compress-Archive writes train\cat\0.png (the zip spec says /): read, as Info-ZIP's unzip
    # and libarchive read a zip made on MS-DOS/Windows, its \ as a folder separator
    if member.create_system == 0:
        return member.filename.replace("\\", "/")
    # `zip -r` on Linux and a Mac's Archive Utility store a name's UTF-8 bytes without the flag saying so (bit 11),
    # and zipfile decodes such a name as cp437: class 犬 was read as 'τè¼'. Read, as unzip reads a zip made on Unix,
    # as the UTF-8 it is (cp437 maps every byte, so the bytes come back as they were stored)
    if not member.flag_bits & 0x800:
        with contextlib.suppress(UnicodeError):
            return member.filename.encode("cp437").decode("utf-8")
    return member.filename


def _is_zip_link(member: zipfile.ZipInfo) -> bool:
    """A symbolic link stored as one (`zip -y`, or a zip made on macOS): a Unix zip member of link mode."""
    return member.create_system == 3 and stat.S_ISLNK(member.external_attr >> 16)


def _zip_link_target(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo,
                     files: dict[str, zipfile.ZipInfo]) -> tuple[zipfile.ZipInfo | None, str]:
    """(the file member a link member names, through links to links, or None where the archive holds no such file:
    a link to a folder, to a path outside the archive, or a loop; the path the link names)."""
    named = ""
    for _ in range(40):  # as many links as Linux follows in one path (ELOOP)
        if not _is_zip_link(member):
            return member, named
        named = _read_member(path, archive, member, 4096).decode("utf-8", "surrogateescape")
        member = files.get(posixpath.normpath(posixpath.join(posixpath.dirname(_zip_name(member)), named)))
        if member is None:
            break
    return None, named


def _iter_image_files(path: Path):
    """Yield (path parts, size or None, reader of at most n bytes) for every file of a folder, .zip or tar archive
    (.tar.gz, .tar, ...), and (path parts, None, None) for the folders it lists (an empty class folder is one). A
    member is read only if its reader is called, before the next is yielded: a file that is no image (a 1.5 GB video
    zipped to 1.5 MB) took its size in memory to be warned about."""
    if path.is_dir():
        folders: list[Path] = []
        dead_links: list[Path] = []
        special: list[tuple[Path, int]] = []
        for file in _files_under(path, folders, dead_links, special):
            yield file.relative_to(path).parts, file.stat().st_size, functools.partial(_read_file, file)
        for file, mode in special:  # a FIFO (read, it would wait for a writer) or a device: named as other files are
            kind = _FILE_KINDS.get(stat.S_IFMT(mode), "a special file")
            yield file.relative_to(path).parts, None, functools.partial(_not_a_file, str(file), kind)
        for link in dead_links:  # an image in a class folder linking to nothing is refused when read, as an
            # archive's link to what it does not hold is: skipped, it was an image dropped unseen (a git-annex checkout)
            yield link.relative_to(path).parts, None, functools.partial(_dead_link, link)
        for folder in folders:
            yield folder.relative_to(path).parts, None, None
        return
    if _is_zip(path):  # e.g. a repository's "Download ZIP": <repo>-main/train/<class>/...
        try:
            with zipfile.ZipFile(path) as archive:
                files = {posixpath.normpath(_zip_name(m)): m for m in archive.infolist()
                         if not _zip_name(m).endswith("/")}
                for member in archive.infolist():
                    name = _zip_name(member)
                    parts = tuple(p for p in name.split("/") if p not in ("", "."))
                    if name.endswith("/"):
                        yield parts, None, None
                        continue
                    if _is_zip_link(member):  # `zip -y` keeps a link as a member holding the path it names: read
                        # as an image, it was refused as undecodable, and a linked class folder was dropped unseen
                        target, named = _zip_link_target(path, archive, member, files)
                        if target is None:
                            if {"train", "test"} & set(parts[:-1]):
                                raise DataError(f"{path}: {name} is a link to {named}, which the archive does not "
                                                "hold as a file: zip the folder with its links followed (zip -r, "
                                                "without -y)")
                            continue
                        member = target
                    yield (parts, member.file_size,
                           _archive_reader(path, lambda n, m=member: _read_member(path, archive, m, n)))
        except ARCHIVE_ERRORS as exc:
            raise DataError(f"{path}: unreadable archive ({exc}); it may be truncated") from None
        return
    try:
        if not tarfile.is_tarfile(path):
            if compression := _compressed_zip(path):
                raise DataError(f"{path}: a {compression}-compressed zip or .npz, which is read only as it is: "
                                "decompress it and pass the file it holds")
            if path.name.lower().endswith(ARCHIVE_SUFFIXES):  # e.g. a .zip cut short: its directory is at its end
                raise DataError(f"{path}: unreadable archive (not a whole zip or tar file); it may be truncated "
                                "or corrupt")
            raise DataError(f"{path}: not a dataset source; data.source takes {SOURCES}")
        with tarfile.open(path, "r:*", tarinfo=_CheckedTarInfo) as tar:
            for member in tar:
                if member.isfile() or member.issym() or member.islnk():
                    # tar stores a folder's links as links (and a file's second hard link too): read the file they
                    # name, or, in a train/ or test/ folder, refuse; skipped, they were images (or class folders)
                    # dropped unseen
                    parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                    try:
                        file = tar.extractfile(member)
                    except KeyError:
                        file = None
                    if file is None and {"train", "test"} & set(parts[:-1]):
                        raise DataError(f"{path}: {member.name} is a link to {member.linkname}, which the archive "
                                        "does not hold as a file: archive the folder with its links followed "
                                        "(tar -h)")
                    if file is not None:  # a link's own size is 0: its target's is known by reading
                        yield parts, member.size if member.isfile() else None, _archive_reader(path, file.read)
                elif member.isdir():
                    yield tuple(p for p in member.name.split("/") if p not in ("", ".")), None, None
                else:  # a FIFO or a device: no image, yet named as the files beside it are, not skipped unseen
                    kind = _TAR_KINDS.get(member.type, f"a tar member of type {member.type!r}")
                    yield (tuple(p for p in member.name.split("/") if p not in ("", ".")), None,
                           functools.partial(_not_a_file, f"{path}:{member.name}", kind))
            _read_to_end(tar)
    except ARCHIVE_ERRORS as exc:
        raise DataError(f"{path}: unreadable archive ({exc}); it may be truncated") from None


def _compressed_zip(path: Path) -> str | None:
    """The compression ('gzip', 'bzip2' or 'xz') of a zip compressed once more (dataset.npz.gz, or those bytes named
    .npz), else None: refused as an archive "truncated or corrupt", it was fetched again to no end."""
    for name, opener in (("gzip", gzip.open), ("bzip2", bz2.open), ("xz", lzma.open)):
        try:
            with opener(path) as f:
                head = f.read(4)
        except (OSError, EOFError, lzma.LZMAError):  # not this compression
            continue
        return name if head in (b"PK\x03\x04", b"PK\x05\x06") else None
    return None


def _split_index(parts: tuple[str, ...]) -> int | None:
    """Where the train/ or test/ folder is in a file's path, None if the file is in no class folder.

    The last such folder with a class folder below it: a dataset under a folder named test keeps its splits
    (test/train/cat/x.png is a train cat), and images in folders below a class folder are that class's
    (train/cat/extra/x.png is a cat, as Keras's image_dataset_from_directory reads them), not dropped unseen.
    """
    return next((i for i in range(len(parts) - 3, -1, -1) if parts[i] in ("train", "test")), None)


def _macos_metadata(parts: tuple[str, ...]) -> bool:
    """Whether a path of an image folder is macOS's AppleDouble metadata (._x.png, __MACOSX/): no image, not read."""
    return any(p.startswith("._") or p == "__MACOSX" for p in parts)


def _read_as_image(parts: tuple[str, ...]) -> bool:
    """Whether `load_image_folder` reads the file at `parts` (its path in the folder or archive) as an image: one of
    IMAGE_SUFFIXES in a <split>/<class>/ folder (or one below it) not named with a leading '.': the images
    `source_digest` counts."""
    if _macos_metadata(parts) or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
        return False
    at = _split_index(parts)
    return at is not None and not parts[at + 1].startswith(".")


def _is_class_folder(parts: tuple[str, ...]) -> bool:
    """Whether a folder at `parts` is a <split>/<class>/ folder `load_image_folder` refuses if it holds no images."""
    return (len(parts) >= 2 and parts[-2] in ("train", "test") and not parts[-1].startswith(".")
            and not _macos_metadata(parts))


def _class_name(folder: str) -> str:
    """A class folder's name as its class's: composed (NFC). A Mac (HFS+, and the tars and zips made there) names
    café with a combining accent (NFD), which MLflow's metric names refuse: the class was refused as a name that shows
    as letters, and train/café/ from a Mac beside test/café/ typed elsewhere were two classes."""
    return unicodedata.normalize("NFC", folder)


def load_image_folder(path: str | Path) -> Dataset:
    """Read `train/<class>/*` and `test/<class>/*` images; class names are the folder names."""
    path = Path(path)
    files: dict[str, dict[str, dict[str, bytes]]] = {"train": {}, "test": {}}  # split -> class -> name -> bytes
    tops: set[tuple[str, ...]] = set()  # the folders holding train/ and test/
    class_folders: set[tuple[str, ...]] = set()  # every <split>/<class>/ folder, with images or without
    image_folders: set[tuple[str, ...]] = set()  # every folder holding images: named when no split is found
    skipped: list[str] = []
    unclassed: list[str] = []
    elsewhere: list[tuple[str, ...]] = []  # images in no train/ or test/ folder: val/ beside them is named below
    hidden: dict[str, int] = {}  # <split>/.<name>/ -> its images: no class, as Keras has it (.ipynb_checkpoints/)
    others: list[str] = []  # files of no image suffix: named where there is no image at all (another format's files)
    for parts, size, read in _iter_image_files(path):
        if _macos_metadata(parts):  # macOS's AppleDouble metadata, not images
            continue
        if read is None:  # a folder
            if len(parts) >= 2 and parts[-2] in ("train", "test"):
                class_folders.add((*parts[:-1], _class_name(parts[-1])))
            continue
        if parts[-1].lower().endswith(IMAGE_SUFFIXES):
            image_folders.add(parts[:-1])
        else:
            others.append("/".join(parts))
        at = _split_index(parts)
        if at is None:
            if len(parts) >= 2 and parts[-2] in ("train", "test") and parts[-1].lower().endswith(IMAGE_SUFFIXES):
                unclassed.append("/".join(parts))  # an image of no class: said, not dropped unseen
            elif parts[-1].lower().endswith(IMAGE_SUFFIXES):
                elsewhere.append(parts)
            continue
        cls = _class_name(parts[at + 1])
        if cls.startswith("."):  # Jupyter's .ipynb_checkpoints/, a sync tool's .trash/: was a class of its own
            if parts[-1].lower().endswith(IMAGE_SUFFIXES):
                folder = "/".join(parts[:at + 2]) + "/"
                hidden[folder] = hidden.get(folder, 0) + 1
            continue
        class_folders.add((*parts[:at + 1], cls))
        if parts[-1].lower().endswith(IMAGE_SUFFIXES):
            name = "/".join(parts)
            # dict: an archive holding a name twice (`tar -u` appends a newer copy) gives the last, as tar -x and
            # unzip -o leave it; a list read both, the image twice and its old pixels too
            files[parts[at]].setdefault(cls, {})[name] = _read_image(read, size, f"{path}:{name}")
            tops.add(parts[:at])
        elif not parts[-1].startswith("."):
            skipped.append("/".join(parts))  # in a class folder, but no image suffix: said, not dropped unseen
    if len(tops) > 1:  # two copies (or two datasets) side by side would be read as one, duplicates and all
        found = ", ".join("/".join((*top, "train|test")) for top in sorted(tops)[:3])
        raise DataError(f"{path}: train/<class>/ and test/<class>/ folders in more than one place ({found}"
                        f"{', ...' if len(tops) > 3 else ''}): give the folder that holds the one dataset to read")
    if skipped:
        print(f"warning: {path}: {len(skipped)} files in class folders are not read, having none of the image "
              f"suffixes {' '.join(IMAGE_SUFFIXES)}: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}",
              file=sys.stderr, flush=True)
    if hidden:
        print(f"warning: {path}: {sum(hidden.values())} images in folders named with a leading '.' are not read, "
              f"such a folder being no class: {', '.join(sorted(hidden)[:3])}{', ...' if len(hidden) > 3 else ''}",
              file=sys.stderr, flush=True)
    if unclassed:
        print(f"warning: {path}: {len(unclassed)} images directly in train/ or test/ are not read, being in no "
              f"class folder (train/<class>/): {', '.join(unclassed[:3])}{', ...' if len(unclassed) > 3 else ''}",
              file=sys.stderr, flush=True)
    train_classes, test_classes = sorted(files["train"]), sorted(files["test"])
    if not train_classes or not test_classes:
        missing = "test" if train_classes else "train"
        # Train/, Test/ or val/ hold the images: said, as "no images under train/" or "test classes [] differ" sent
        # the user looking in the wrong place. Not read as splits: train/ and Train/ side by side would be merged, and
        # val/ is no test split
        found = sorted({"/".join(folder[:i + 1]) + "/" for folder in image_folders
                        for i, name in enumerate(folder) if name.lower() in SPLIT_LIKE_NAMES})
        if found:
            raise DataError(f"{path}: no images found under {missing}/<class>/: found {', '.join(found[:4])}"
                            f"{', ...' if len(found) > 4 else ''}; expected train/ and test/ (lower case), each "
                            "holding <class>/ folders of images")
        held = (f": it holds no image file, only {len(others)} others ({', '.join(sorted(others)[:3])}"
                f"{', ...' if len(others) > 3 else ''})" if others and not image_folders else "")
        # the folder a dataset archive was downloaded into (-P data=../shared/datasets): the archive named
        archives = sorted(name for name in others if name.lower().endswith(ARCHIVE_SUFFIXES)) if held else []
        if not held and image_folders and path.name in ("train", "test") and path.is_dir():  # -P data=cifar/train
            held = (f": this is a {path.name}/ folder itself: give the folder above it, which holds train/ and test/, "
                    f"data.source={path.parent}")
        if archives and path.is_dir():
            held += (f": give the archive itself, data.source={path / archives[0]}" if len(archives) == 1 else
                     f": give one of the archives itself, e.g. data.source={path / archives[0]}")
        raise DataError(f"{path}: no images found under {missing}/<class>/ (expected train/<class>/*.png|jpg|... "
                        f"and test/<class>/*.png|jpg|...){held}")
    # A class folder with no images (or only other files) is refused, not warned about as stray files are: the class
    # names are the model's outputs, so it changes them as differing train/test classes (refused below) do. Left out,
    # the model got one class fewer unseen; kept, it would have a class never trained and scored on no images.
    (top,) = tops
    # val/ (or valid/, Train/...) beside train/ and test/ is no split here: its images, dropped unseen, are said
    split_like = [f"{'/'.join(parts[:len(top) + 1])}/" for parts in elsewhere if parts[:len(top)] == top
                  and len(parts) > len(top) + 1 and parts[len(top)].lower() in SPLIT_LIKE_NAMES]
    if split_like:
        folders = sorted(set(split_like))
        print(f"warning: {path}: {len(split_like)} images under {', '.join(folders)} are not read: the splits are "
              "train/ and test/ (train.validation_fraction holds images out of train/ for val_acc)",
              file=sys.stderr, flush=True)
    empty = sorted("/".join(folder) + "/" for folder in class_folders if folder[:-2] == top
                   and not folder[-1].startswith(".") and folder[-1] not in files[folder[-2]])
    if empty:
        raise DataError(f"{path}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:3])}"
                        f"{', ...' if len(empty) > 3 else ''} hold{'' if len(empty) > 1 else 's'} no images: a class "
                        "with no images cannot be learned or scored: add its images or remove the folder")
    for cls in sorted({*train_classes, *test_classes}):
        try:
            cls.encode()
        except UnicodeEncodeError:  # bytes of another encoding (Latin-1): refused below as characters MLflow cannot log
            shown = os.fsencode(cls).decode("ascii", "backslashreplace")
            splits = " and ".join(f"{split}/" for split in ("test", "train") if cls in files[split])
            raise DataError(f"{path}: class folder {shown}/ (in {splits}) is not named in UTF-8 text: "
                            "rename it") from None
    if train_classes != test_classes:
        raise DataError(f"{path}: test classes {test_classes} differ from train classes {train_classes}")
    if len(train_classes) < 2:
        raise DataError(f"{path}: need at least 2 classes, found {train_classes}")

    def split_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for label, cls in enumerate(train_classes):
            for name, raw in sorted(files[split][cls].items()):
                images.append(decode_image(raw, f"{path}:{name}"))
                labels.append(label)
        return np.stack(images), np.asarray(labels, dtype=np.int32)

    x_train, y_train = split_arrays("train")
    x_test, y_test = split_arrays("test")
    return Dataset(x_train, y_train, x_test, y_test, tuple(train_classes))


# --- synthetic ------------------------------------------------------------------------------

def make_synthetic(*, n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """A learnable 10-class dataset: each class has its own mean colour, drowned in noise.

    Colour survives shifts and flips, so a small ResNet learns it in a few epochs; the noise
    (per-image brightness, per-pixel noise, a random distractor patch) keeps it from being trivial.
    """
    palette = np.random.default_rng(1234).uniform(40, 215, size=(len(SYNTHETIC_CLASSES), CHANNELS))

    def split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, len(SYNTHETIC_CLASSES), size=n).astype(np.int32)
        x = palette[y][:, None, None, :] + rng.normal(0, 15, size=(n, 1, 1, 1))
        x = x + rng.normal(0, 35, size=(n, IMAGE_SIZE, IMAGE_SIZE, CHANNELS))
        for i, (r, c) in enumerate(rng.integers(0, IMAGE_SIZE - 12, size=(n, 2))):
            x[i, r:r + 12, c:c + 12] = rng.uniform(0, 255, size=CHANNELS)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y

    rng = np.random.default_rng(seed)
    x_train, y_train = split(n_train, rng)
    x_test, y_test = split(n_test, rng)
    return Dataset(x_train, y_train, x_test, y_test, SYNTHETIC_CLASSES)
