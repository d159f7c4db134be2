"""Data sources: the official pickled format (generated here), image folders, synthetic, digests."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import shutil
import struct
import tarfile
import tracemalloc
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import data

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def official_batch(rng: np.random.Generator, n: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """A batch in the official layout: b'data' (n, 3072) uint8 rows R..G..B, b'labels' list."""
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    rows = images.transpose(0, 3, 1, 2).reshape(n, 3072)
    batch = {b"batch_label": b"generated", b"labels": [int(v) for v in labels], b"data": rows,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return batch, images, labels


def write_official(folder: Path, n: int = 6, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write cifar-10-batches-py/ (5 train batches, test batch, meta) and its .tar.gz."""
    rng = np.random.default_rng(seed)
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    train_images = []
    for name in [*data.CIFAR10_TRAIN_BATCHES, "test_batch"]:
        batch, images, labels = official_batch(rng, n)
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        train_images.append((images, labels))
    meta = {b"label_names": [c.encode() for c in NAMES], b"num_cases_per_batch": n, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="cifar-10-batches-py")
    x_train = np.concatenate([x for x, _ in train_images[:5]])
    return archive, x_train, train_images[5][0]


def test_official_archive_and_folder_read_the_same(tmp_path):
    archive, x_train, x_test = write_official(tmp_path)
    from_archive = data.load_source(str(archive))
    from_folder = data.load_source(str(tmp_path / "cifar-10-batches-py"))
    assert from_archive.class_names == tuple(NAMES)
    assert from_archive.x_train.shape == (30, 32, 32, 3) and from_archive.x_test.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(from_archive.x_train, x_train)  # channel layout decoded right
    np.testing.assert_array_equal(from_archive.x_test, x_test)
    assert from_archive.digest() == from_folder.digest()


def test_official_archive_is_known_by_its_contents_under_any_name(tmp_path):
    archive, x_train, _ = write_official(tmp_path)
    renamed = archive.rename(tmp_path / "cifar10 copy.tgz")
    np.testing.assert_array_equal(data.load_source(str(renamed)).x_train, x_train)
    images = tmp_path / "images.tar.gz"  # an image archive is still read as one
    with tarfile.open(images, "w:gz") as tar:
        for split in ("train", "test"):
            for shade, cls in enumerate(NAMES[:2]):
                buffer = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), 40 + 100 * shade, np.uint8)).save(buffer, format="PNG")
                info = tarfile.TarInfo(f"{split}/{cls}/0.png")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
    assert data.load_source(str(images)).class_names == tuple(NAMES[:2])


def test_cifar10_from_keras_cache_is_verified(tmp_path, monkeypatch):
    archive, _, _ = write_official(tmp_path / "made")
    cache = tmp_path / "keras" / "datasets"
    cache.mkdir(parents=True)
    (cache / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(data, "CIFAR10_SHA256", data.file_sha256(archive))
    assert data.load_source("cifar10").x_train.shape == (30, 32, 32, 3)

    monkeypatch.setattr(data, "CIFAR10_SHA256", "0" * 64)  # tampered or truncated download
    with pytest.raises(data.DataError, match="does not match the published"):
        data.load_source("cifar10")

    # where Keras 3's own keras.datasets.cifar10.load_data() leaves it: used, not downloaded again
    (cache / "cifar-10-python.tar.gz").unlink()
    (cache / "cifar-10-batches-py-target_archive").write_bytes(archive.read_bytes())
    monkeypatch.setattr(data, "CIFAR10_SHA256", data.file_sha256(archive))
    assert data.load_source("cifar10").x_train.shape == (30, 32, 32, 3)


def test_an_extracted_cifar10_folder_in_the_keras_cache_is_verified_file_by_file(tmp_path, monkeypatch):
    """`data.source: cifar10` stands for the official archive, its prepare runs keyed by its published checksum: an
    extracted cifar-10-batches-py/ in the Keras cache (no archive beside it) was read as it was, a truncated or edited
    batch prepared as the official data. Each file's md5 is checked against the official one; a file that differs or
    is missing is named, and nothing is prepared."""
    _, x_train, _ = write_official(tmp_path / "keras" / "datasets")
    folder = tmp_path / "keras" / "datasets" / "cifar-10-batches-py"
    (tmp_path / "keras" / "datasets" / "cifar-10-python.tar.gz").unlink()  # the folder alone
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(data.DataError, match=r"cifar-10-batches-py/data_batch_1: md5 [0-9a-f]{32} does not match the "
                                             r"official c99cafc152244af753f735de768cd75f; .*-P data="):
        data.load_source("cifar10")  # these made-up batches are not the official ones
    made = {name: data.file_sha256(folder / name, "md5") for name in data.CIFAR10_FILES_MD5}
    monkeypatch.setattr(data, "CIFAR10_FILES_MD5", made)  # as if they were
    np.testing.assert_array_equal(data.load_source("cifar10").x_train, x_train)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-10])  # truncated
    with pytest.raises(data.DataError, match=r"data_batch_3: md5 .* does not match the official"):
        data.load_source("cifar10")
    batch.unlink()
    with pytest.raises(data.DataError, match=r"data_batch_3: missing from the extracted CIFAR-10 folder"):
        data.load_source("cifar10")


def test_an_official_batch_or_archive_that_cannot_be_read_is_named_not_a_traceback(tmp_path, monkeypatch):
    """An extracted batch or a cached archive that cannot be read (another user's, in a shared Keras cache) ended
    prepare in a traceback (PermissionError, IsADirectoryError), where an unreadable image is named in one line."""
    archive, _, _ = write_official(tmp_path / "made")
    batch = tmp_path / "made" / "cifar-10-batches-py" / "data_batch_2"
    batch.unlink()
    batch.mkdir()  # as root, chmod 000 does not deny: a folder in its place cannot be read as a file either
    with pytest.raises(data.DataError, match=r"cifar-10-batches-py/data_batch_2: cannot be read \(Is a directory\)$"):
        data.load_source(str(tmp_path / "made"))
    cache = tmp_path / "keras" / "datasets"
    cache.mkdir(parents=True)
    (cache / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    real_open = open

    def refusing(file, *args, **kwargs):  # noqa: ANN001, ANN202 - as open() answers for a file mode 600 not ours
        if Path(file) == cache / "cifar-10-python.tar.gz":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(data, "open", refusing, raising=False)
    with pytest.raises(data.DataError, match=r"datasets/cifar-10-python.tar.gz: cannot be read \(Permission denied\)$"):
        data.load_source("cifar10")


def test_commands_downloading_cifar10_at_once_take_turns(tmp_path, monkeypatch):
    """Keras writes a download into the cache's file: two commands downloading CIFAR-10 together wrote it at once,
    and it failed its hash check. They take turns; the second finds the first's download."""
    import threading

    import keras

    archive, _, _ = write_official(tmp_path / "made")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(data, "CIFAR10_SHA256", data.file_sha256(archive))
    downloads = []

    def download(fname, **kwargs):  # a slow network: the other command starts meanwhile
        downloads.append(fname)
        target = data.keras_cache_dir() / fname
        threading.Event().wait(0.5)
        target.write_bytes(archive.read_bytes())
        return str(target)

    monkeypatch.setattr(keras.utils, "get_file", download)
    found = []
    commands = [threading.Thread(target=lambda: found.append(data.fetch_cifar10())) for _ in range(2)]
    for command in commands:
        command.start()
    for command in commands:
        command.join()
    assert downloads == [".cifar-10-python.tar.gz.partial"]  # renamed once whole
    assert found == [data.keras_cache_dir() / "cifar-10-python.tar.gz"] * 2


def test_an_interrupted_cifar10_download_leaves_no_truncated_archive_in_the_keras_cache(tmp_path, monkeypatch):
    """Keras downloads into the cache's file and removes what it wrote on an Exception only: a download interrupted
    (Ctrl-C, or the SIGTERM `mlflow run` sends its step then: `tracking.Interrupted`, a BaseException) left a truncated
    cifar-10-python.tar.gz there, and every later command refused it ("does not match the published ... delete it and
    fetch it again"). It is downloaded under a name of its own and renamed once whole: the next command downloads it."""
    import signal

    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils  # keras.utils.get_file downloads with its urlretrieve

    from pipeline.tracking import Interrupted

    archive, _, _ = write_official(tmp_path / "made")
    whole = archive.read_bytes()
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras"))  # as Keras read it, started so
    monkeypatch.setattr(data, "CIFAR10_SHA256", data.file_sha256(archive))

    def cut(url, filename, reporthook=None):  # the transfer, halfway when the signal comes
        Path(filename).write_bytes(whole[:len(whole) // 2])
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(file_utils, "urlretrieve", cut)
    with pytest.raises(Interrupted):
        data.fetch_cifar10()
    assert not (data.keras_cache_dir() / "cifar-10-python.tar.gz").exists()
    monkeypatch.setattr(file_utils, "urlretrieve", lambda url, filename, hook=None: Path(filename).write_bytes(whole))
    found = data.fetch_cifar10()  # the next command downloads it again
    assert found == data.keras_cache_dir() / "cifar-10-python.tar.gz" and found.read_bytes() == whole

def test_the_keras_cache_is_where_keras_puts_it_when_the_home_folder_is_not_writable(tmp_path, monkeypatch):
    """With a home folder not writable (a read-only mount, a service user's /nonexistent), Keras keeps its cache in
    /tmp/.keras (keras.src.backend.config, keras.utils.get_file), where keras.datasets.cifar10.load_data() left
    CIFAR-10; the pipeline looked in ~/.keras/datasets, and tried to download there."""
    home, other = tmp_path / "home", tmp_path / "keras"
    home.mkdir()
    access = os.access
    unwritable = set()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) not in unwritable and access(path, mode))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("KERAS_HOME", raising=False)
    assert data.keras_cache_dir() == home / ".keras" / "datasets"  # not made yet: Keras makes it on import
    unwritable.add(home)
    assert data.keras_cache_dir() == Path("/tmp/.keras/datasets")
    monkeypatch.setenv("KERAS_HOME", str(other))  # a KERAS_HOME not writable: get_file's fallback the same
    other.mkdir()
    assert data.keras_cache_dir() == other / "datasets"
    unwritable.add(other)
    assert data.keras_cache_dir() == Path("/tmp/.keras/datasets")


def test_cifar10_offline_with_nothing_local_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    import keras

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(data.DataError) as err:
        data.load_source("cifar10")
    how = (f"Put the official cifar-10-python.tar.gz ({data.CIFAR10_URL}) in {tmp_path / 'datasets'}/ or pass its "
           f"path (or an image folder) as -P data=PATH")
    assert str(err.value) == f"data.source: cannot download CIFAR-10 (OSError: network is unreachable). {how}"
    # a cache it cannot write (the download could not be written there either): the same way on
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(data.DataError) as err:
        data.load_source("cifar10")
    assert str(err.value).startswith(f"data.source: cannot download CIFAR-10 into {tmp_path / 'a-file' / 'datasets'} (")
    assert str(err.value).endswith(how.replace(str(tmp_path / "datasets"), str(tmp_path / "a-file" / "datasets")))


def test_truncated_archive_is_refused(tmp_path):
    archive, _, _ = write_official(tmp_path)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="truncated|missing"):
        data.load_source(str(archive))


def test_a_tar_cut_at_a_header_or_with_a_damaged_one_is_refused_not_read_short(tmp_path):
    """tarfile itself ends the member list quietly at a bad header after the first: a copy cut at a 512-byte
    boundary, or a flipped bit in a header, read as a shorter dataset (one test image fewer, no error)."""
    write_image_folder(tmp_path / "imgs")
    intact = tmp_path / "imgs.tar"
    with tarfile.open(intact, "w") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    raw = intact.read_bytes()
    with tarfile.open(intact) as tar:
        last = tar.getmembers()[-1].offset  # the header of the last image (imgs/train/ship/2.jpg)
    flipped = bytearray(raw)
    flipped[last + 1] ^= 1
    for name, damaged, why in [("cut.tar", raw[:last], "empty header"), ("flip.tar", bytes(flipped), "bad checksum"),
                               ("flip.tar.gz", gzip.compress(bytes(flipped)), "bad checksum")]:
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(data.DataError, match=f"{name}: unreadable archive .*member header at byte {last}: {why}"):
            data.load_source(str(tmp_path / name))
    packed = bytearray(gzip.compress(raw))
    packed[-8] ^= 1  # gzip's CRC, which tarfile never reads (it stops at tar's end-of-archive block)
    (tmp_path / "crc.tar.gz").write_bytes(bytes(packed))
    with pytest.raises(data.DataError, match="crc.tar.gz: unreadable archive .CRC check failed"):
        data.load_source(str(tmp_path / "crc.tar.gz"))
    assert len(data.load_source(str(intact)).x_train) == 9


def test_a_compressed_npz_or_zip_is_named_as_such_not_as_a_truncated_archive(tmp_path):
    """A gzipped .npz (dataset.npz.gz, or gzip's bytes under the name .npz) was refused as "not a whole zip or tar
    file; it may be truncated or corrupt", which sent the user fetching it again."""
    import bz2
    import lzma

    flat = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "d.npz", x_train=flat, y_train=np.arange(4), x_test=flat, y_test=np.arange(4))
    write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=1)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        for file in sorted((tmp_path / "imgs").rglob("*.png")):
            archive.write(file, str(file.relative_to(tmp_path / "imgs")))
    npz, zipped = (tmp_path / "d.npz").read_bytes(), (tmp_path / "imgs.zip").read_bytes()
    for name, packed, compression in [
            ("g.npz", gzip.compress(npz), "gzip"), ("d.npz.gz", gzip.compress(npz), "gzip"),
            ("d.npz.bz2", bz2.compress(npz), "bzip2"), ("d.npz.xz", lzma.compress(npz), "xz"),
            ("imgs.zip.gz", gzip.compress(zipped), "gzip"), ("data", gzip.compress(npz), "gzip")]:
        (tmp_path / name).write_bytes(packed)
        with pytest.raises(data.DataError) as caught:
            data.load_source(str(tmp_path / name))
        assert str(caught.value).startswith(f"{tmp_path / name}: a {compression}-compressed zip or .npz")
        assert "truncated" not in str(caught.value) and "not a dataset source" not in str(caught.value)
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    (tmp_path / "cut.tar.gz").write_bytes((tmp_path / "imgs.tar.gz").read_bytes()[:60])  # in its first block: as it was
    with pytest.raises(data.DataError, match="cut.tar.gz: unreadable archive .*truncated"):
        data.load_source(str(tmp_path / "cut.tar.gz"))


def test_damaged_zip_npz_and_xz_are_one_line_not_a_traceback(tmp_path):
    """zlib's and lzma's errors are no OSError: a damaged deflate stream or xz block escaped as a traceback, and
    a .zip or .npz cut short was called 'not a dataset source' (its directory is at its end)."""
    write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=2)
    flat = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez_compressed(tmp_path / "z.npz", x_train=flat, y_train=np.arange(4), x_test=flat, y_test=np.arange(4))
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted((tmp_path / "imgs").rglob("*.png")):  # uncompressed PNGs: zip's deflate has work to do
            buffer = io.BytesIO()
            Image.open(file).resize((64, 64)).save(buffer, format="PNG", compress_level=0)
            archive.writestr(str(file.relative_to(tmp_path / "imgs")), buffer.getvalue())
    with tarfile.open(tmp_path / "imgs.tar.xz", "w:xz") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    for name, offset in [("z.npz", 120), ("imgs.zip", 100), ("imgs.tar.xz", 0.5)]:
        raw = bytearray((tmp_path / name).read_bytes())
        raw[int(offset * len(raw)) if offset < 1 else offset] ^= 0xFF
        (tmp_path / f"bad-{name}").write_bytes(bytes(raw))
        with pytest.raises(data.DataError, match=f"bad-{name}: unreadable"):
            data.load_source(str(tmp_path / f"bad-{name}"))
        (tmp_path / f"cut-{name}").write_bytes(bytes(raw[: len(raw) // 2]))
        with pytest.raises(data.DataError, match=f"cut-{name}: unreadable archive .*truncated"):
            data.load_source(str(tmp_path / f"cut-{name}"))
    # a damaged directory entry: zipfile's BadZipFile, or NotImplementedError where the entry asks for a zip version
    # above those Python reads, escaped as a traceback
    official, _, _ = write_official(tmp_path / "official", n=2)
    with zipfile.ZipFile(tmp_path / "official.zip", "w") as archive:
        for file in sorted(official.parent.glob("cifar-10-batches-py/*")):
            archive.write(file, f"cifar-10-batches-py/{file.name}")
    for name in ("z.npz", "imgs.zip", "official.zip"):
        for offset, value, message in ((3, 0xFE, "Bad magic number for central directory"),
                                       (6, 173, "zip file version 17.3")):
            raw = bytearray((tmp_path / name).read_bytes())
            raw[raw.rfind(b"PK\x01\x02") + offset] = value
            (tmp_path / f"dir-{name}").write_bytes(bytes(raw))
            with pytest.raises(data.DataError, match=f"dir-{name}: unreadable archive \\({message}\\)"):
                data.load_source(str(tmp_path / f"dir-{name}"))


def test_an_encrypted_zip_or_one_python_cannot_inflate_is_one_line_not_a_traceback(tmp_path):
    """zipfile raises RuntimeError for a password-protected member and NotImplementedError for a compression method
    it lacks (Deflate64, zstd): both ended prepare in a traceback."""
    write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=1)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        for file in sorted((tmp_path / "imgs").rglob("*.*")):
            archive.write(file, str(file.relative_to(tmp_path)))
    raw = (tmp_path / "imgs.zip").read_bytes()
    # (the flag bits' or the method's offset in local and central headers), its value, what is said
    for offsets, value, message in (((6, 8), 1, "encrypted"), ((8, 10), 9, "compressed with zip method 9")):
        patched = bytearray(raw)
        for signature, offset in zip((b"PK\x03\x04", b"PK\x01\x02"), offsets, strict=True):
            for at in (m.start() for m in re.finditer(re.escape(signature), raw)):
                patched[at + offset:at + offset + 2] = struct.pack("<H", value)
        (tmp_path / "bad.zip").write_bytes(bytes(patched))
        with pytest.raises(data.DataError, match=f"bad.zip:imgs/test/cat/0.jpg: {message}"):
            data.load_source(str(tmp_path / "bad.zip"))


def test_image_folders_in_more_than_one_place_are_refused_not_merged(tmp_path):
    write_image_folder(tmp_path / "data" / "cifar")
    write_image_folder(tmp_path / "data" / "cifar-backup")
    with pytest.raises(data.DataError, match=r"folders in more than one place \(cifar/train\|test, "
                                             r"cifar-backup/train\|test\)"):
        data.load_source(str(tmp_path / "data"))
    assert len(data.load_source(str(tmp_path / "data" / "cifar")).x_train) == 9


def test_crafted_pickle_cannot_run_code(tmp_path):
    _, _, _ = write_official(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(data.DataError, match="forbidden"):
        data.load_source(str(tmp_path / "cifar-10-batches-py"))
    assert not marker.exists()


def test_official_batches_pickled_anew_by_python_3_are_read(tmp_path):
    """Batches in the official layout pickled by Python 3 (a dataset of one's own in that format, a copy filtered and
    saved again) were refused as "forbidden type": with protocol 5 (`pickle.HIGHEST_PROTOCOL`) NumPy pickles
    its arrays through `_frombuffer`, and labels kept as NumPy integers (`list(labels)`) pickle as NumPy scalars;
    neither runs code. Both are read as the batches they are."""
    write_official(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    expected = data.load_source(str(folder))
    for name in [*data.CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta"]:
        batch = pickle.loads((folder / name).read_bytes(), encoding="bytes")
        if b"labels" in batch:
            batch[b"labels"] = list(np.asarray(batch[b"labels"], dtype=np.int64))  # NumPy integers
        (folder / name).write_bytes(pickle.dumps(batch, protocol=5))
    assert b"_frombuffer" in (folder / "test_batch").read_bytes() and b"scalar" in (folder / "test_batch").read_bytes()
    assert data.load_source(str(folder)).digest() == expected.digest()
    batch = pickle.loads((folder / "data_batch_1").read_bytes())  # bools are no class indices, NumPy's either
    batch[b"labels"] = [np.bool_(True)] * len(batch[b"labels"])
    (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=5))
    with pytest.raises(data.DataError, match=r"data_batch_1: 'labels' must be integers, got np.True_ \(bool\)"):
        data.load_source(str(folder))


@pytest.mark.parametrize(("batch_key", "value", "message"), [
    (b"labels", 3, "'labels' must be a list of integers, got int"),
    (b"labels", [b"3"] * 6, r"'labels' must be integers, got b'3' \(bytes\)"),
    (b"labels", [[1, 2]] * 6, r"'labels' must be integers, got \[1, 2\] \(list\)"),
    (b"labels", [1.7] * 6, r"'labels' must be integers, got 1.7 \(float\)"),  # not silently 1
    (b"labels", [True] * 6, "'labels' must be integers, got True"),
    (b"labels", [0, 1, 2, 3, 4, 2**32 + 1], r"'labels' must lie in \[0, 10\) \(10 class names\), got \[0, 42949"),
    (b"labels", [1, 2], r"'labels' must have one entry per image \(2 for 6 images\)"),
    (b"data", np.full((6, 3072), 0.5), "'data' must hold integer pixel values 0-255, got float64"),  # not silently 0
    (b"data", np.full((6, 3072), 300, np.int64), r"'data' must hold pixel values 0-255, got \[300, 300\]"),  # not 44
])
def test_official_batch_with_wrong_values_is_refused_naming_it(tmp_path, batch_key, value, message):
    archive, _, _ = write_official(tmp_path)
    batch, _, _ = official_batch(np.random.default_rng(1), 6)
    batch[batch_key] = value
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(data.DataError, match=r"cifar-10-batches-py/data_batch_2: " + message):
        data.load_source(str(tmp_path / "cifar-10-batches-py"))
    with tarfile.open(archive, "w:gz") as tar:  # the archive names its member
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(data.DataError, match=re.escape(f"{archive}:cifar-10-batches-py/data_batch_2: ") + message):
        data.load_source(str(archive))


def test_an_official_batch_without_labels_says_the_key_is_missing(tmp_path):
    """A CIFAR-100 batch (its labels under `fine_labels`) in place of a CIFAR-10 one was refused as "'labels' must
    be a list of integers, got NoneType", which does not say the key is missing, nor which keys there are."""
    write_official(tmp_path)
    batch, _, _ = official_batch(np.random.default_rng(1), 6)
    batch[b"fine_labels"] = batch.pop(b"labels")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    held = r"'batch_label', 'data', 'filenames', 'fine_labels'"
    with pytest.raises(data.DataError, match=rf"data_batch_2: no 'labels' in this batch \(it holds {held}\); "
                                             r"a CIFAR-10 batch holds 'data' and 'labels'$"):
        data.load_source(str(tmp_path / "cifar-10-batches-py"))


@pytest.mark.parametrize(("label_names", "message"), [
    (7, r"label_names must be a list of class names \(text\), got 7 \(int\)"),
    ([b"cat", 3], r"label_names must be a list of class names \(text\), got 3 \(int\)"),
    ([b"cat", b"\xff"], "label_names: a class name is not UTF-8 text"),
    ([b"cat", b"cat"], r"duplicate class names \['cat'\]"),
    ([b"cat", b"dog's"], "class name \"dog's\" cannot be used"),
    ([], "no class names"),
])
def test_official_meta_with_wrong_label_names_is_refused(tmp_path, label_names, message):
    write_official(tmp_path)
    meta = {b"label_names": label_names, b"num_cases_per_batch": 6, b"num_vis": 3072}
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(data.DataError, match=r"cifar-10-batches-py/batches.meta: .*" + message):
        data.load_source(str(tmp_path / "cifar-10-batches-py"))


def test_an_extracted_official_folder_without_its_meta_file_is_named_as_missing_it(tmp_path):
    """cifar-10-batches-py/ with its batches but no batches.meta (an extraction cut short, a file deleted) was read as
    an image folder: 'no images found under train/<class>/', the layout of another source."""
    write_official(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    for source in (tmp_path / "cifar-10-batches-py", tmp_path):
        with pytest.raises(data.DataError, match=r"cifar-10-batches-py/batches.meta: missing "):
            data.load_source(str(source))


def test_an_archive_holding_two_copies_of_the_official_batches_is_refused_not_mixed(tmp_path):
    """A tar or zip holding cifar-10-batches-py/ twice (a copy beside the original, or another version of it) was read
    batch by batch, each the last of its name in the archive: a dataset of both, mixed. Refused, naming both places,
    as two image folders side by side are; one name appended twice (`tar -u`) is still read once, its last copy."""
    write_official(tmp_path / "a")
    write_official(tmp_path / "b", seed=1)
    tar_path, zip_path = tmp_path / "two.tar.gz", tmp_path / "two.zip"
    with tarfile.open(tar_path, "w:gz") as tar, zipfile.ZipFile(zip_path, "w") as archive:
        for top, name in ((tmp_path / "a", "cifar-10-batches-py"), (tmp_path / "b", "old/cifar-10-batches-py")):
            tar.add(top / "cifar-10-batches-py", arcname=name)
            for file in sorted((top / "cifar-10-batches-py").iterdir()):
                archive.write(file, f"{name}/{file.name}")
    for source in (tar_path, zip_path):
        with pytest.raises(data.DataError, match=r"two.(tar.gz|zip): holds batches.meta twice, in "
                                                 r"cifar-10-batches-py/ and old/cifar-10-batches-py/"):
            data.load_source(str(source))


def test_official_batches_zipped_are_read(tmp_path):
    """A zip of cifar-10-batches-py/ said "no images found under train/<class>/": only tars were known."""
    archive, x_train, x_test = write_official(tmp_path)
    zipped = zip_folder(tmp_path / "cifar-10-batches-py", tmp_path / "cifar10.zip")
    d = data.load_source(str(zipped))
    np.testing.assert_array_equal(d.x_train, x_train)
    np.testing.assert_array_equal(d.x_test, x_test)
    assert d.digest() == data.load_source(str(archive)).digest()
    marker = tmp_path / "ran"  # through the same safe unpickler and checks as the tar
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(data.DataError, match=r"crafted.zip:cifar-10-batches-py/test_batch: .*forbidden type os.system"):
        data.load_source(str(zip_folder(tmp_path / "cifar-10-batches-py", tmp_path / "crafted.zip")))
    assert not marker.exists()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(data.DataError, match="short.zip: missing data_batch_3"):
        data.load_source(str(zip_folder(tmp_path / "cifar-10-batches-py", tmp_path / "short.zip")))


def test_official_archive_in_any_tar_compression(tmp_path):
    archive, x_train, _ = write_official(tmp_path)
    for name, mode in (("cifar.tar", "w"), ("cifar.tar.bz2", "w:bz2"), ("cifar-10-python.tar.gz", None)):
        if mode:  # an intact archive, known by its contents, is read as it was opened (not as gzip)
            with tarfile.open(tmp_path / name, mode) as tar:
                tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        np.testing.assert_array_equal(data.load_source(str(tmp_path / name)).x_train, x_train)
    archive.write_bytes(b"not an archive at all")  # the official name, other contents: one line, no tarfile list
    with pytest.raises(data.DataError, match=r"cifar-10-python.tar.gz: not a tar archive \(expected") as err:
        data.load_source(str(archive))
    assert "\n" not in str(err.value)


def test_a_file_that_is_no_source_says_what_sources_are(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "one.png")
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path / "one.png"))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'one.png'}: not a dataset source; data.source takes 'cifar10'")
    assert "\n" not in message and "truncated" not in message and ".npz" in message


def test_class_names_mlflow_cannot_log_are_refused_for_every_source(tmp_path):
    """evaluate logs test_acc_<class>: a name MLflow refuses there is refused at load instead, the same way for
    image folders, .npz files and the official batches, and exactly the names MLflow refuses."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric

    def mlflow_accepts(name: str) -> bool:
        try:
            _validate_metric(f"test_acc_{name}", 0.5, 0, 0)
            return True
        except MlflowException:
            return False

    def we_accept(name: str) -> bool:
        try:
            data._check_class_names((name, "other"), "here")
            return True
        except data.DataError:
            return False

    names = ["cat", "pick-up truck", "Ünïcode_1.0", "a:b", "a/b", "/a", "..", "dog's", "cat (tabby)", "a+b", "a\tb",
             "a//b", "a/", "a/./b", "a/../b", "x" * 241, "x" * 242, "été"]
    assert [we_accept(n) for n in names] == [mlflow_accepts(n) for n in names]
    assert not we_accept("")  # MLflow would take test_acc_, but a class needs a name
    assert sum(map(we_accept, names)) == 9  # some of each

    write_image_folder(tmp_path / "imgs", classes=("cat (tabby)", "dog"))
    with pytest.raises(data.DataError, match=r"imgs: class name 'cat \(tabby\)' cannot be used .*letters, digits, "):
        data.load_source(str(tmp_path / "imgs"))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0, 1])
    for names, message in [(["dog's", "cat"], "class name \"dog's\" cannot be used"), (["", "cat"], "class name ''"),
                           (["a", "a", "b"], r"duplicate class names \['a'\]"),
                           (["cat", "cat/tabby"], "class names 'cat' and 'cat/tabby' clash as metric names")]:
        np.savez(tmp_path / "named.npz", x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(names))
        with pytest.raises(data.DataError, match=r"named.npz: " + message):
            data.load_source(str(tmp_path / "named.npz"))
    write_official(tmp_path / "official")
    meta = {b"label_names": [b"cat (tabby)", *[c.encode() for c in NAMES[1:]]]}
    (tmp_path / "official" / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(data.DataError, match=r"batches.meta: class name 'cat \(tabby\)' cannot be used"):
        data.load_source(str(tmp_path / "official"))


def test_npz_class_names_and_labels_are_checked_before_use(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 1, 0, 1])

    def load(**arrays):
        np.savez(tmp_path / "d.npz", **{"x_train": x, "y_train": y, "x_test": x, "y_test": y, **arrays})
        return data.load_source(str(tmp_path / "d.npz"))

    assert load(class_names=np.array([b"cat", b"dog"])).class_names == ("cat", "dog")  # bytes decoded, not "b'cat'"
    with pytest.raises(data.DataError, match=r"d.npz: class_names must be a 1-d array of class names \(text\), "
                                             r"got 0-d <U3"):
        load(class_names=np.array("cat"))
    with pytest.raises(data.DataError, match="class_names must be a 1-d array .* got 1-d int64"):
        load(class_names=np.arange(2))
    with pytest.raises(data.DataError, match=r"d.npz: y_test must lie in \[0, 2\) \(2 class names\), "
                                             r"got \[0, 4294967297\]"):  # not cast to int32's 1
        load(class_names=np.array(["cat", "dog"]), y_test=np.array([0, 1, 0, 2**32 + 1]))
    # timedelta64 is an integer to numpy's dtype tree: its counts were read as class indices
    for labels in (y.astype("m8[s]"), y.astype("M8[s]"), y.astype(bool), y + 0.5):
        expected = f"d.npz: y_train must hold integer labels, got {labels.dtype}"
        with pytest.raises(data.DataError, match=re.escape(expected) + "$"):
            load(y_train=labels)
    with pytest.raises(data.DataError, match=r"d.npz: unreadable .npz \(array y_test: Object arrays cannot be loaded"):
        load(y_test=y.astype(object))  # which array needs pickles was not said
    np.savez(tmp_path / "no-test.npz", x_train=x, y_train=y)
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path / "no-test.npz"))
    assert str(err.value) == (f"{tmp_path / 'no-test.npz'}: no array x_test, y_test (an .npz source holds x_train, "
                              f"y_train, x_test, y_test, and optionally class_names)")  # not wrapped in "unreadable"


def test_a_dataset_file_that_is_no_zip_is_said_to_be_no_npz(tmp_path):
    """A prepared dataset's .npz replaced by a text file was refused with numpy's "contains pickled (object) data"
    (an empty file: "No data left in file", a .npy renamed: a context manager error): it is said to be no .npz."""
    np.save(tmp_path / "array.npy", np.arange(3))
    files = {"text.npz": b"x_train,y_train\n1,2\n", "empty.npz": b"", "cut.npz": b"PK\x03\x04 cut short",
             "array.npz": (tmp_path / "array.npy").read_bytes()}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(data.DataError) as err:
            data.load_prepared(tmp_path / name)
        assert str(err.value) == (f"{tmp_path / name}: not an .npz file (an .npz is a zip archive of .npy arrays; "
                                  f"this is none, or one cut short)")


def test_an_npz_of_one_class_is_refused_as_an_image_folder_of_one_is(tmp_path):
    """One class name (and every label 0) was read: the model's one softmax output is always 1, so it learned
    nothing yet scored test_acc 1.0 and took @champion. An image folder of one class was refused already."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.zeros(4, dtype=np.int64)
    np.savez(tmp_path / "one.npz", x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(["cat"]))
    with pytest.raises(data.DataError, match=r"one.npz: need at least 2 classes, found \['cat'\]"):
        data.load_source(str(tmp_path / "one.npz"))
    np.savez(tmp_path / "two.npz", x_train=x, y_train=y % 2 + [0, 1, 0, 1], x_test=x, y_test=y,
             class_names=np.array(["cat", "dog"]))
    assert data.load_source(str(tmp_path / "two.npz")).class_names == ("cat", "dog")
    # two names, one class trained on (every label 0, or a batch file whose labels are all one class): as one class
    np.savez(tmp_path / "cats.npz", x_train=x, y_train=y, x_test=x, y_test=y, class_names=np.array(["cat", "dog"]))
    with pytest.raises(data.DataError, match=r"cats.npz: every training image is of class 'cat' \(label 0\)"):
        data.load_source(str(tmp_path / "cats.npz"))
    write_image_folder(tmp_path / "cat-only", classes=("cat",))
    with pytest.raises(data.DataError, match=r"cat-only: need at least 2 classes, found \['cat'\]"):
        data.load_source(str(tmp_path / "cat-only"))


def test_image_over_the_pixel_limit_is_refused_naming_it(tmp_path):
    """A few bytes of PNG header can declare a 14000x14000 canvas: Pillow refuses it, and so does the loader."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 14000, 14000, 8, 2, 0, 0, 0)  # 8-bit RGB, no pixels follow
    write_image_folder(tmp_path)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    (tmp_path / "train" / "dog" / "big.png").write_bytes(png)
    with pytest.raises(data.DataError, match=r"train/dog/big.png: image too large \(Image size \(196000000 pixels\)"):
        data.load_source(str(tmp_path))


def write_image_folder(root: Path, classes=("cat", "dog", "ship"), per_class: int = 3, size=(32, 32)) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8))
                img.save(root / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_directory_tar_gz_and_zip(tmp_path):
    write_image_folder(tmp_path / "imgs", size=(40, 24))  # other sizes are resized to 32x32
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    zipped = tmp_path / "CIFAR-10-images-master.zip"  # as a repository's "Download ZIP" holds it: one top folder
    with zipfile.ZipFile(zipped, "w") as archive_zip:
        for file in sorted((tmp_path / "imgs").rglob("*")):
            archive_zip.write(file, f"CIFAR-10-images-master/{file.relative_to(tmp_path / 'imgs')}")
    from_dir, from_tar = data.load_source(str(tmp_path / "imgs")), data.load_source(str(archive))
    assert from_dir.class_names == ("cat", "dog", "ship")
    assert from_dir.x_train.shape == (9, 32, 32, 3) and from_dir.x_test.shape == (9, 32, 32, 3)
    assert list(from_dir.y_train) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert from_dir.digest() == from_tar.digest() == data.load_source(str(zipped)).digest()
    zipped.write_bytes(zipped.read_bytes()[:-200])  # its central directory cut off
    with pytest.raises(data.DataError, match="CIFAR-10-images-master.zip"):
        data.load_source(str(zipped))
    (tmp_path / "imgs" / "train" / "cat" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # tar on a Mac
    assert data.load_source(str(tmp_path / "imgs")).digest() == from_dir.digest()


def test_a_zip_made_on_windows_with_backslashes_is_read(tmp_path):
    """Windows PowerShell's Compress-Archive names members train\\cat\\0.png: every image was read as a file in no
    folder, and the zip refused as holding no train/<class>/ images. unzip reads \\ as / in a zip made on Windows."""
    write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=2)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        for file in sorted((tmp_path / "imgs").rglob("*.*")):
            member = zipfile.ZipInfo("imgs\\" + str(file.relative_to(tmp_path / "imgs")).replace("/", "\\"))
            member.create_system = 0  # MS-DOS/Windows, as PowerShell writes it
            archive.writestr(member, file.read_bytes())
    assert data.load_source(str(tmp_path / "imgs.zip")).digest() == data.load_source(str(tmp_path / "imgs")).digest()


def without_utf8_flag(archive: Path) -> Path:
    """Clear each member's UTF-8 flag (bit 11) in its local header and its central directory entry, leaving the
    names' UTF-8 bytes: a zip as Info-ZIP's `zip -r` on Linux and macOS's Archive Utility write it."""
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zipped:
        members, at = zipped.infolist(), zipped.start_dir
    for member in members:
        struct.pack_into("<H", raw, member.header_offset + 6, member.flag_bits & ~0x800)
        struct.pack_into("<H", raw, at + 8, member.flag_bits & ~0x800)
        at += 46 + sum(struct.unpack_from("<3H", raw, at + 28))  # the entry, its name, extra field and comment
    archive.write_bytes(raw)
    return archive


def test_a_zip_of_class_folders_with_non_ascii_names_made_by_zip_on_linux_or_a_mac_is_read_as_unzip_reads_it(tmp_path):
    """`zip -r` (Info-ZIP, Linux) and a Mac's Archive Utility store UTF-8 names without the flag that says so, and
    zipfile decodes such names as cp437: class 犬 was read as 'τè¼', a model whose outputs bore names no one gave, and
    café was refused as a class name MLflow cannot log, 'caf├⌐'. unzip reads them as the UTF-8 they are."""
    write_image_folder(tmp_path / "imgs", classes=("café", "犬"), per_class=2)
    archive = without_utf8_flag(zip_folder(tmp_path / "imgs", tmp_path / "imgs.zip"))
    with zipfile.ZipFile(archive) as zipped:
        assert not any(m.flag_bits & 0x800 for m in zipped.infolist())
        assert "imgs/train/caf├⌐/0.jpg" in zipped.namelist()  # as zipfile decodes the names
    from_zip = data.load_source(str(archive))
    assert from_zip.class_names == ("café", "犬")
    assert from_zip.digest() == data.load_source(str(tmp_path / "imgs")).digest()


def test_class_folders_named_in_decomposed_unicode_as_a_mac_writes_them_are_read(tmp_path):
    """A folder made on a Mac (HFS+, and the tars and zips of it) names café with a combining accent (NFD), which
    MLflow's metric names refuse: the class was refused as "class name 'café' cannot be used ... a class name is
    letters", a name that shows as letters, and train/café/ from a Mac beside test/café/ typed on Linux (NFC) were
    two classes. The name is read composed (NFC), as the Mac shows it: one class, café, whichever way it is spelled."""
    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café"
    write_image_folder(tmp_path / "typed", classes=("café", "chien"), per_class=2)
    write_image_folder(tmp_path / "mac", classes=(decomposed, "chien"), per_class=2)
    (tmp_path / "mixed").mkdir()
    shutil.copytree(tmp_path / "mac" / "train", tmp_path / "mixed" / "train")
    shutil.copytree(tmp_path / "typed" / "test", tmp_path / "mixed" / "test")
    with tarfile.open(tmp_path / "mac.tar", "w") as tar:
        tar.add(tmp_path / "mac", arcname="mac")
    typed = data.load_source(str(tmp_path / "typed"))
    assert typed.class_names == ("café", "chien")
    for source in ("mac", "mac.tar", "mixed"):
        assert data.load_source(str(tmp_path / source)).digest() == typed.digest(), source


def test_bmp_webp_and_gif_images_are_read_and_other_files_in_class_folders_are_named(tmp_path, capsys):
    """Only .png/.jpg were read: a class folder's .bmp or .webp images dropped out of the dataset unseen."""
    write_image_folder(tmp_path / "imgs")
    rng = np.random.default_rng(1)
    for suffix in ("bmp", "webp", "gif"):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / "train" / "dog" / f"more.{suffix}")
    (tmp_path / "imgs" / "train" / "dog" / "labels.txt").write_text("dog\n")
    (tmp_path / "imgs" / "train" / "dog" / ".DS_Store").write_bytes(b"\0")  # hidden: not worth a word
    (tmp_path / "imgs" / "train" / "dog" / "more.bmp").rename(tmp_path / "imgs" / "train" / "stray.bmp")  # no class
    capsys.readouterr()
    d = data.load_source(str(tmp_path / "imgs"))
    assert list(d.y_train).count(1) == 3 + 2 and len(d.x_train) == 11
    err = capsys.readouterr().err
    assert "1 files in class folders are not read" in err and "train/dog/labels.txt" in err and "DS_Store" not in err
    assert "1 images directly in train/ or test/ are not read" in err and "train/stray.bmp" in err


def test_images_in_folders_below_a_class_folder_are_that_class(tmp_path, capsys):
    """train/<class>/extra/x.png was skipped without a word: a dataset lost those images unseen."""
    root = tmp_path / "test"  # a dataset under a folder named test keeps its train/ and test/ splits
    write_image_folder(root)
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        (root / split / "dog" / "extra" / "deeper").mkdir(parents=True)
        for sub in ("extra", "extra/deeper"):
            Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(
                root / split / "dog" / sub / "x.png")
    (root / "train" / "dog" / "extra" / "notes.txt").write_text("dog\n")
    archive = tmp_path / "test.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="test")
    capsys.readouterr()
    d = data.load_source(str(tmp_path))
    assert list(d.y_train) == list(d.y_test) == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert "train/dog/extra/notes.txt" in capsys.readouterr().err  # named as other files in class folders are
    assert data.load_source(str(archive)).digest() == data.load_source(str(root)).digest() == d.digest()


def test_linked_class_folders_and_linked_images_are_read_from_a_folder_and_its_tar(tmp_path):
    """A class folder linked in from elsewhere vanished from a folder source (Python 3.11's rglob does not enter
    linked folders), and tar's link members (a symlinked or hard-linked image) were skipped: fewer images, no word."""
    write_image_folder(tmp_path / "elsewhere", classes=("ship",))
    root = tmp_path / "imgs"
    write_image_folder(root, classes=("cat", "dog"))
    for split in ("train", "test"):
        os.symlink(tmp_path / "elsewhere" / split / "ship", root / split / "ship")
    d = data.load_source(str(root))
    assert d.class_names == ("cat", "dog", "ship") and list(d.y_train) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    digest = data.source_digest(str(root))
    (tmp_path / "elsewhere" / "train" / "ship" / "0.jpg").unlink()  # the linked data changed: so does the digest
    assert data.source_digest(str(root)) != digest
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # tar keeps the linked folder as a link: refused, named
        tar.add(root, arcname="imgs")
    with pytest.raises(data.DataError, match=r"imgs/test/ship is a link to .*tar -h"):
        data.load_source(str(archive))
    for split in ("train", "test"):
        (root / split / "ship").unlink()
    os.link(root / "train" / "cat" / "0.jpg", root / "train" / "cat" / "hard.jpg")
    os.symlink("1.png", root / "train" / "cat" / "soft.png")
    os.symlink("/nowhere/LICENSE", root / "LICENSE")  # a link beside the dataset, not in it, is no matter
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    from_dir, from_tar = data.load_source(str(root)), data.load_source(str(archive))
    assert len(from_dir.x_train) == 8 and from_tar.digest() == from_dir.digest()
    os.symlink("..", root / "train" / "loop")
    with pytest.raises(data.DataError, match="a link to a folder above it"):
        data.load_source(str(root))


def test_a_folder_source_with_an_image_linked_to_nothing_is_refused_naming_it(tmp_path):
    """An image in a class folder that is a link to nothing (a git-annex or DVC checkout whose content was never
    fetched, a folder of links into a cache since moved) was skipped: fewer images, no word, where a tar's or zip's
    link to what it does not hold is refused. A dead link beside the dataset, not in it, is no matter."""
    root = tmp_path / "imgs"
    write_image_folder(root)
    os.symlink("/nowhere/LICENSE", root / "LICENSE")
    assert len(data.load_source(str(root)).x_train) == 9
    os.symlink("/annex/objects/ab/cd.png", root / "train" / "cat" / "3.png")
    with pytest.raises(data.DataError, match=r"imgs/train/cat/3.png: a link to /annex/objects/ab/cd.png, which "
                                             r"does not exist"):
        data.load_source(str(root))


def test_a_fifo_or_device_in_a_class_folder_or_its_tar_is_named_not_skipped(tmp_path, capsys):
    """A named pipe or a device file in a class folder (or such a member of a tar) was skipped without a word, where
    any other file there is named: one with an image's name is refused (it holds no image to read), another warned
    about as a file that is not read."""
    root = tmp_path / "imgs"
    write_image_folder(root)
    os.mkfifo(root / "train" / "cat" / "3.png")
    with pytest.raises(data.DataError, match=r"imgs/train/cat/3.png: a FIFO \(named pipe\), not a file"):
        data.load_source(str(root))
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="imgs")
    with pytest.raises(data.DataError, match=r"imgs.tar:imgs/train/cat/3.png: a FIFO \(named pipe\), not a file"):
        data.load_source(str(archive))
    (root / "train" / "cat" / "3.png").unlink()
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="imgs")
        device = tarfile.TarInfo("imgs/test/dog/tty0.jpg")
        device.type = tarfile.CHRTYPE
        tar.addfile(device)
    with pytest.raises(data.DataError, match=r"imgs.tar:imgs/test/dog/tty0.jpg: a character device, not a file"):
        data.load_source(str(archive))
    os.mkfifo(root / "test" / "dog" / "pipe")
    capsys.readouterr()
    assert len(data.load_source(str(root)).x_test) == 9
    err = capsys.readouterr().err
    assert "1 files in class folders are not read" in err and err.rstrip().endswith(": test/dog/pipe")


def zip_link(archive: zipfile.ZipFile, name: str, target: str) -> None:
    """Add a link member as `zip -y` stores one: a Unix member of link mode holding the path it names."""
    member = zipfile.ZipInfo(name)
    member.create_system = 3
    member.external_attr = (0o120777 << 16)  # S_IFLNK | 0777
    archive.writestr(member, target)


def test_linked_class_folders_and_linked_images_in_a_zip_are_read_or_refused(tmp_path):
    """`zip -ry` keeps links as links: a linked image was refused as undecodable (its bytes are the path it names),
    and a linked class folder, a member named like a file in train/, was dropped unseen: the dataset a class short."""
    root = tmp_path / "imgs"
    write_image_folder(root)
    archive = tmp_path / "imgs.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in sorted(root.rglob("*.*")):
            zipped.write(file, f"imgs/{file.relative_to(root)}")
        zip_link(zipped, "imgs/train/cat/soft.png", "../dog/1.png")  # a link to a link to a file the zip holds
        zip_link(zipped, "imgs/train/dog/hop.png", "soft.png")
        zip_link(zipped, "imgs/train/dog/soft.png", "../cat/soft.png")
        zip_link(zipped, "imgs/LICENSE", "/nowhere/LICENSE")  # beside the dataset, not in it: no matter
    os.symlink("../dog/1.png", root / "train" / "cat" / "soft.png")
    os.symlink("soft.png", root / "train" / "dog" / "hop.png")
    os.symlink("../cat/soft.png", root / "train" / "dog" / "soft.png")
    from_zip, from_dir = data.load_source(str(archive)), data.load_source(str(root))
    assert len(from_zip.x_train) == 12 and from_zip.digest() == from_dir.digest()
    with zipfile.ZipFile(archive, "a") as zipped:
        zip_link(zipped, "imgs/train/bird", "/data/birds/train")  # a linked class folder: its images are not there
        zip_link(zipped, "imgs/test/bird", "/data/birds/test")
    with pytest.raises(data.DataError, match=r"imgs.zip: imgs/train/bird is a link to /data/birds/train, which the "
                       r"archive does not hold as a file: zip the folder with its links followed"):
        data.load_source(str(archive))


def test_an_archive_holding_a_name_twice_gives_the_last_as_extracting_it_does(tmp_path):
    """`tar -u` appends a newer copy of a changed file (and zipfile's append mode can add a name again): both copies
    were read, the image twice in its split and its old pixels too; tar -x and unzip -o leave the last."""
    root = tmp_path / "imgs"
    write_image_folder(root)
    before = data.load_source(str(root))
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "red.png")
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(root, arcname="imgs")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zipped:
        for file in sorted(root.rglob("*.*")):
            zipped.write(file, f"imgs/{file.relative_to(root)}")
    with tarfile.open(tmp_path / "imgs.tar", "a") as tar:
        tar.add(tmp_path / "red.png", arcname="./imgs/train/dog/1.png")  # ./ as `tar -uf imgs.tar ./imgs/...` names it
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(tmp_path / "imgs.zip", "a") as zipped:
        zipped.write(tmp_path / "red.png", "imgs/train/dog/1.png")
    (root / "train" / "dog" / "1.png").write_bytes((tmp_path / "red.png").read_bytes())
    updated = data.load_source(str(root))
    assert updated.digest() != before.digest() and len(updated.x_train) == 9
    for source in ("imgs.tar", "imgs.zip"):
        assert data.load_source(str(tmp_path / source)).digest() == updated.digest(), source


def test_a_tar_whose_last_member_is_a_zip_is_read_as_the_tar(tmp_path):
    """zipfile knows a zip by the directory at its end: an uncompressed tar whose last member is a zip (here a zip of
    part of the images) was read as that zip, a dataset of 2 classes in place of the tar's 3, no word said."""
    root = tmp_path / "imgs"
    write_image_folder(root)
    images = sorted(file for file in root.rglob("*.*") if "ship" not in file.parts)  # listed before the zip is made
    with zipfile.ZipFile(root / "zz-backup.zip", "w") as zipped:
        for file in images:
            zipped.write(file, str(file.relative_to(root)))
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(root, arcname="imgs")
    assert zipfile.is_zipfile(tmp_path / "imgs.tar")  # what the data source's type was told by
    d = data.load_source(str(tmp_path / "imgs.tar"))
    assert d.class_names == ("cat", "dog", "ship") and d.digest() == data.load_source(str(root)).digest()


def test_a_folder_or_file_that_cannot_be_read_is_named_not_dropped_or_a_traceback(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list, and os.path.isfile says False of a file in a folder it may list but not
    enter: class folders another user owns (mode 700, or 644) were dropped unseen, the dataset a class short; an
    unreadable image or archive ended prepare in a traceback (PermissionError)."""
    root = tmp_path / "imgs"
    write_image_folder(root)
    denied = {root / "train" / "ship", root / "test" / "ship"}  # as chmod 000 makes them (tests may run as root)

    def refusing(function):  # noqa: ANN001, ANN202
        def call(file, *args, **kwargs):  # noqa: ANN001, ANN202
            if isinstance(file, (str, os.PathLike)) and Path(file) in denied:
                raise PermissionError(13, "Permission denied", str(file))
            return function(file, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "scandir", refusing(os.scandir))
    monkeypatch.setattr(data, "open", refusing(open), raising=False)
    for read in (data.load_source, data.source_digest):
        with pytest.raises(data.DataError, match=r"imgs/(train|test)/ship: cannot be read \(Permission denied\)$"):
            read(str(root))
    denied = {root / "train" / "ship" / "0.jpg"}  # its folder listed, not entered: the file cannot be looked at
    monkeypatch.setattr(os, "stat", refusing(os.stat))
    for read in (data.load_source, data.source_digest):
        with pytest.raises(data.DataError, match=r"imgs/train/ship/0.jpg: cannot be read \(Permission denied\)$"):
            read(str(root))
    monkeypatch.undo()
    monkeypatch.setattr(data, "open", refusing(open), raising=False)
    denied = {root / "train" / "cat" / "1.png"}
    for read in (data.load_source, data.source_digest):
        with pytest.raises(data.DataError, match=r"imgs/train/cat/1.png: cannot be read \(Permission denied\)$"):
            read(str(root))
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(root, arcname="imgs")
    denied = {tmp_path / "imgs.tar"}
    with pytest.raises(data.DataError, match=r"imgs.tar: cannot be read \(Permission denied\)$"):
        data.source_digest(str(tmp_path / "imgs.tar"))


def test_test_images_that_are_training_images_are_counted(tmp_path):
    """An image copied into both train/ and test/ was scored as unseen: test_acc overstated. Exact pixels count,
    each test image once; one changed pixel is another image."""
    root = tmp_path / "imgs"
    write_image_folder(root)
    clean = data.load_source(str(root))
    assert data.test_images_in_train(clean.x_train, clean.x_test) == 0
    (root / "test" / "dog" / "copy.png").write_bytes((root / "train" / "cat" / "1.png").read_bytes())
    copied = data.load_source(str(root))
    assert data.test_images_in_train(copied.x_train, copied.x_test) == 1
    x_test = np.concatenate([copied.x_test, copied.x_train[[1, 1, 2]]])  # train image 1 twice: two test images
    nearly = copied.x_train[3].copy()
    nearly[0, 0, 0] ^= 1
    assert data.test_images_in_train(copied.x_train, np.concatenate([x_test, nearly[None]])) == 4
    assert data.test_images_in_train(copied.x_train, copied.x_train) == len(copied.x_train)
    assert data.test_images_in_train(copied.x_train[:0], x_test) == 0
    # another image of the same key (word 0 up by multiplier 1, word 1 down by multiplier 0): not counted
    m = np.random.default_rng(0).integers(1, 2 ** 63, 384, dtype=np.uint64) | np.uint64(1)
    words = copied.x_train[4].reshape(-1).view(np.uint64).copy()
    words[0] += m[1]
    words[1] -= m[0]
    twin = words.view(np.uint8).reshape(1, 32, 32, 3)
    assert (twin[0] != copied.x_train[4]).any()
    assert data.test_images_in_train(copied.x_train, twin) == 0


def test_archive_files_that_are_no_images_are_not_read(tmp_path, monkeypatch):
    """Every member of a .zip or tar was read into memory, images or not: a 1.5 GB video zipped to 1.5 MB beside the
    images took 3 GB to be warned about as not read."""
    write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=2)
    (tmp_path / "imgs" / "train" / "cat" / "video.mp4").write_bytes(b"\0" * 1000)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as archive:
        for file in sorted((tmp_path / "imgs").rglob("*.*")):
            archive.write(file, str(file.relative_to(tmp_path)))
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    read = []
    zip_open, tar_open = zipfile.ZipFile.open, tarfile.TarFile.extractfile
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, member, *args: read.append(member.filename)
                        or zip_open(self, member, *args))

    def extractfile(self, member):
        file = tar_open(self, member)
        file.read = lambda *args, read_=file.read: read.append(member.name) or read_(*args)
        return file

    monkeypatch.setattr(tarfile.TarFile, "extractfile", extractfile)
    expected = data.load_source(str(tmp_path / "imgs")).digest()
    for name in ("imgs.zip", "imgs.tar.gz"):
        read.clear()
        assert data.load_source(str(tmp_path / name)).digest() == expected
        assert len(read) == 8 and not [n for n in read if n.endswith("video.mp4")]


def test_an_oversized_image_file_is_refused_by_its_size_before_it_is_read(tmp_path, monkeypatch):
    """Each image file was read whole before Pillow saw it: a 2 GB file named x.png took 2 GB of memory (4 in a zip)
    and seconds to be called undecodable, and a folder source's digest read it whole too. Its size (the file
    system's, the tar or zip header's) refuses it first; a link's, unknown, by reading one byte past the limit."""
    root = tmp_path / "imgs"
    write_image_folder(root, classes=("cat", "dog"), per_class=2)
    big = root / "train" / "cat" / "x.png"
    big.touch()
    os.truncate(big, 256 << 20)  # sparse: no disk, no time
    tracemalloc.start()
    try:
        digest = data.source_digest(str(root))
        with pytest.raises(data.DataError) as err:
            data.load_source(str(root))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(err.value) == (f"{root}:train/cat/x.png: 268,435,456 bytes, more than the 128 MiB an image file may "
                              "have: not an image, or save it smaller")
    assert peak < 32 << 20 and len(digest) == 64
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 100_000)  # archives, kept small: the images are ~3 KB each
    big.write_bytes(b"\0" * 200_000)
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(root.rglob("*.*")):
            archive.write(file, str(file.relative_to(tmp_path)))
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(root, arcname="imgs")
    for name in ("imgs.zip", "imgs.tar.gz"):
        with pytest.raises(data.DataError, match=re.escape(f"{name}:imgs/train/cat/x.png: 200,000 bytes, more "
                                                           "than the 0 MiB")):
            data.load_source(str(tmp_path / name))
    info = tarfile.TarInfo("imgs/big.png")
    info.size = 200_000
    with tarfile.open(tmp_path / "links.tar", "w") as tar:  # a link in a class folder to an oversized file
        tar.addfile(info, io.BytesIO(b"\0" * 200_000))
        link = tarfile.TarInfo("imgs/train/dog/y.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../../big.png"
        tar.addfile(link)
        tar.add(root / "train" / "cat" / "0.jpg", arcname="imgs/train/cat/0.jpg")
        tar.add(root / "test", arcname="imgs/test")
    with pytest.raises(data.DataError, match=re.escape("links.tar:imgs/train/dog/y.png: more than the 0 MiB")):
        data.load_source(str(tmp_path / "links.tar"))


def test_a_tar_header_claiming_a_huge_image_is_refused_naming_it(tmp_path):
    """A member whose header claims 8 GB is refused by that size, naming it, before any of it is read (cut short
    here: whatever followed its header was read, then the archive called truncated)."""
    write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
        tar.addfile(tarfile.TarInfo("imgs/train/cat/huge.png"))
    raw = bytearray(buffer.getvalue()[:-1024])  # without tar's end blocks, as if cut short
    at = raw.rindex(b"imgs/train/cat/huge.png")
    header = raw[at:at + 512]
    header[124:136], header[148:156] = b"%011o\0" % ((8 << 30) - 1), b" " * 8  # size, checksum
    header[148:156] = b"%06o\0 " % sum(header)
    raw[at:at + 512] = header
    (tmp_path / "imgs.tar.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DataError, match=re.escape("imgs.tar.gz:imgs/train/cat/huge.png: 8,589,934,591 bytes")):
        data.load_source(str(tmp_path / "imgs.tar.gz"))


def test_npz_arrays_as_a_source(tmp_path):
    """keras.datasets.cifar10.load_data() saved with np.savez: labels (N, 1), no class names (CIFAR-10's are
    taken); a prepared dataset.npz reads back as it was; wrong arrays are refused naming the problem."""
    rng = np.random.default_rng(0)
    x_train, x_test = (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (20, 10))
    y_train, y_test = rng.integers(0, 10, (20, 1), dtype=np.uint8), rng.integers(0, 10, (10, 1), dtype=np.uint8)
    np.savez(tmp_path / "keras-style.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    d = data.load_source(str(tmp_path / "keras-style.npz"))
    assert d.class_names == data.CIFAR10_CLASSES and d.class_names[0] == "airplane"
    assert list(d.y_train) == list(y_train[:, 0]) and d.y_test.dtype == np.int32
    assert np.array_equal(d.x_test, x_test)

    named = data.Dataset(x_train, y_train[:, 0].astype(np.int32) % 3, x_test, y_test[:, 0].astype(np.int32) % 3,
                         ("a", "b", "c"))
    named.save(tmp_path / "dataset.npz")  # a prepared dataset as a source
    assert data.load_source(str(tmp_path / "dataset.npz")).digest() == named.digest()

    np.savez(tmp_path / "no-test.npz", x_train=x_train, y_train=y_train)
    np.savez(tmp_path / "floats.npz", x_train=x_train / 255, y_train=y_train, x_test=x_test / 255, y_test=y_test)
    np.savez(tmp_path / "twelve.npz", x_train=x_train, y_train=y_train + 2, x_test=x_test, y_test=y_test)
    for name, message in [("no-test.npz", "no array x_test, y_test"), ("floats.npz", "must be uint8"),
                          ("twelve.npz", "labels beyond 0-9 need a class_names array")]:
        with pytest.raises(data.DataError, match=message):
            data.load_source(str(tmp_path / name))


def test_image_folder_with_a_corrupt_image_names_it(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "train" / "dog" / "1.png").write_bytes(b"not an image at all")
    with pytest.raises(data.DataError, match=r"train/dog/1.png: not a decodable") as caught:
        data.load_source(str(tmp_path))
    assert "BytesIO" not in str(caught.value)  # Pillow's message named it <_io.BytesIO object at 0x7f...>


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip a folder as `zip -r` does: its folders too (an empty one is kept)."""
    with zipfile.ZipFile(archive, "w") as zipped:
        for item in sorted(folder.rglob("*")):
            zipped.write(item, str(item.relative_to(folder.parent)))
    return archive


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    """train/bird/ and test/bird/ with no images were left out of the class names: one class fewer, unseen."""
    write_image_folder(tmp_path / "imgs")
    for split in ("train", "test"):
        (tmp_path / "imgs" / split / "bird").mkdir()
        (tmp_path / "imgs" / split / ".ipynb_checkpoints").mkdir()  # hidden: no class
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "imgs", arcname="imgs")
    zip_folder(tmp_path / "imgs", tmp_path / "imgs.zip")
    for source, top in (("imgs", ""), ("imgs.tar.gz", "imgs/"), ("imgs.zip", "imgs/")):
        with pytest.raises(data.DataError, match=rf"{source}: class folders {top}test/bird/, {top}train/bird/ hold no "
                           "images: a class with no images cannot be learned or scored"):
            data.load_source(str(tmp_path / source))
    (tmp_path / "imgs" / "test" / "bird").rmdir()  # in one split only: named too (was "test classes ... differ")
    (tmp_path / "imgs" / "train" / "bird" / "notes.txt").write_text("to do")  # no image: no class either
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as zipped:  # a zip without folder entries
        for file in sorted((tmp_path / "imgs").rglob("*.*")):
            zipped.write(file, str(file.relative_to(tmp_path / "imgs")))
    for source in ("imgs", "flat.zip"):
        with pytest.raises(data.DataError, match=r": class folder train/bird/ holds no images"):
            data.load_source(str(tmp_path / source))
    (tmp_path / "imgs" / "train" / "bird" / "notes.txt").unlink()
    (tmp_path / "imgs" / "train" / "bird").rmdir()
    assert data.load_source(str(tmp_path / "imgs")).class_names == ("cat", "dog", "ship")


@pytest.mark.parametrize("splits, found", [(("Train", "Test"), "found Test/, Train/"),
                                           (("train", "val"), "found train/, val/"),
                                           (("TRAIN", "test"), "found TRAIN/, test/")])
def test_split_folders_named_otherwise_are_named_with_what_is_expected(tmp_path, splits, found):
    """Train/ and Test/ said "no images found under train/<class>/", and val/ for test/ "test classes [] differ from
    train classes [...]": both sent the user looking in the wrong place."""
    write_image_folder(tmp_path / "imgs")
    for split, name in zip(("train", "test"), splits, strict=True):
        (tmp_path / "imgs" / split).rename(tmp_path / "imgs" / f"{name}.tmp")
        (tmp_path / "imgs" / f"{name}.tmp").rename(tmp_path / "imgs" / name)
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(tmp_path / "imgs", arcname="top")
    expected = "; expected train/ and test/ (lower case), each holding <class>/ folders of images"
    for source, prefix in (("imgs", ""), ("imgs.tar", "top/")):
        with pytest.raises(data.DataError) as caught:
            data.load_source(str(tmp_path / source))
        missing = "train" if splits[0] != "train" else "test"
        assert str(caught.value) == (f"{tmp_path / source}: no images found under {missing}/<class>/: "
                                     f"{found.replace('found ', 'found ' + prefix).replace(', ', ', ' + prefix)}"
                                     f"{expected}")


def test_images_in_a_val_folder_beside_train_and_test_are_named_not_dropped_unseen(tmp_path, capsys):
    """A train/ valid/ test/ layout read train/ and test/ and left valid/'s images out without a word."""
    write_image_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "test").rename(tmp_path / "imgs" / "valid")
    write_image_folder(tmp_path / "other")
    (tmp_path / "other" / "test").rename(tmp_path / "imgs" / "test")
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "logo.png")  # not in a split's place: not worth a word
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(tmp_path / "imgs", arcname="top")
    for source, prefix in (("imgs", ""), ("imgs.tar", "top/")):
        capsys.readouterr()
        assert len(data.load_source(str(tmp_path / source)).x_test) == 9
        assert capsys.readouterr().err.splitlines() == [
            f"warning: {tmp_path / source}: 9 images under {prefix}valid/ are not read: the splits are train/ and "
            "test/ (train.validation_fraction holds images out of train/ for val_acc)"]


def test_image_folder_with_mismatched_classes_or_no_layout(tmp_path):
    write_image_folder(tmp_path / "a")
    (tmp_path / "a" / "test" / "ship").rename(tmp_path / "a" / "test" / "boat")
    with pytest.raises(data.DataError, match="test classes"):
        data.load_source(str(tmp_path / "a"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(data.DataError, match="no images found under train/<class>/"):
        data.load_source(str(tmp_path / "flat"))


def test_a_source_holding_no_image_at_all_names_the_files_it_holds(tmp_path):
    """CIFAR-10's binary version (cifar-10-batches-bin/) or CIFAR-100's archive, given for the python CIFAR-10, said
    only 'no images found under train/<class>/', as of a folder laid out wrongly: the files it holds are named."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for name in ("batches.meta.txt", "data_batch_1.bin", "data_batch_2.bin", "test_batch.bin"):
        (folder / name).write_bytes(bytes(3073))
    with tarfile.open(tmp_path / "cifar-10-binary.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    for source, shown in ((folder, ""), (tmp_path / "cifar-10-binary.tar.gz", "cifar-10-batches-bin/")):
        with pytest.raises(data.DataError) as caught:
            data.load_source(str(source))
        assert str(caught.value).endswith(f": it holds no image file, only 4 others ({shown}batches.meta.txt, "
                                          f"{shown}data_batch_1.bin, {shown}data_batch_2.bin, ...)")


def test_a_hidden_folder_beside_the_class_folders_is_no_class_and_is_named(tmp_path, capsys):
    """A folder whose name starts with '.' (Jupyter's .ipynb_checkpoints/, a sync tool's .trash/) was a class: one
    more model output, trained on the copies it held, or, in train/ alone, 'test classes differ'. Keras's
    image_dataset_from_directory takes no such folder as a class: it is named in a warning, not read."""
    write_image_folder(tmp_path / "images")
    for split in ("train", "test"):
        shutil.copytree(tmp_path / "images" / split / "cat", tmp_path / "images" / split / ".ipynb_checkpoints")
    dataset = data.load_source(str(tmp_path / "images"))
    assert dataset.class_names == ("cat", "dog", "ship") and len(dataset.x_train) == len(dataset.x_test) == 9
    warning = capsys.readouterr().err
    assert "6 images in folders named with a leading '.' are not read" in warning
    assert "test/.ipynb_checkpoints/" in warning and "train/.ipynb_checkpoints/" in warning


def test_missing_source_is_named():
    with pytest.raises(data.DataError, match="data.source: 'nowhere/at/all'"):
        data.load_source("nowhere/at/all")


def test_a_source_that_is_a_link_to_nothing_names_its_target(tmp_path):
    """A data path that is a link whose target is gone (a dataset moved, a mount not there) was said to be
    "neither 'cifar10', 'synthetic' nor an existing path", of a name ls lists: the line says it is a link to what."""
    (tmp_path / "current.tar.gz").symlink_to(tmp_path / "v2" / "images.tar.gz")
    message = (f"data.source: {str(tmp_path / 'current.tar.gz')!r} is a link to {tmp_path / 'v2' / 'images.tar.gz'}, "
               "which does not exist")
    for read in (data.load_source, data.source_digest):
        with pytest.raises(data.DataError, match=f"^{re.escape(message)}$"):
            read(str(tmp_path / "current.tar.gz"))


def test_synthetic_is_deterministic_and_balanced():
    a = data.make_synthetic(n_train=500, n_test=100, seed=0)
    b = data.make_synthetic(n_train=500, n_test=100, seed=0)
    c = data.make_synthetic(n_train=500, n_test=100, seed=1)
    assert a.digest() == b.digest() != c.digest()
    assert a.x_train.dtype == np.uint8 and a.x_train.shape == (500, 32, 32, 3)
    assert len(set(a.y_train.tolist())) == 10


def test_one_changed_pixel_changes_the_digest():
    a = data.make_synthetic(n_train=50, n_test=10)
    x = a.x_test.copy()
    x[3, 5, 7, 1] ^= 1
    b = data.Dataset(a.x_train, a.y_train, x, a.y_test, a.class_names)
    assert a.digest() != b.digest()


def test_folders_that_differ_only_where_one_file_ends_and_the_next_begins_have_other_digests(tmp_path):
    """A folder's digest ran each file's name and bytes together: bytes moved from the front of a name to the end of
    the file before it gave the same digest. A ship moved out of the dataset (train/ship/x.png to x.png, no split) as
    a note beside it grew by 'train/ship/' kept the folder's prepare key: the dataset prepared before was reused."""
    before, after = tmp_path / "before", tmp_path / "after"
    write_image_folder(before)
    (before / "train" / "ship" / "notes.txt").write_text("ships")
    shutil.copy(before / "train" / "ship" / "0.jpg", before / "train" / "ship" / "x.png")
    shutil.copytree(before, after)
    (after / "train" / "ship" / "notes.txt").write_text("shipstrain/ship/")
    (after / "train" / "ship" / "x.png").rename(after / "x.png")
    assert len(data.load_source(str(before)).x_train) == len(data.load_source(str(after)).x_train) + 1
    assert data.source_digest(str(before)) != data.source_digest(str(after))


def test_a_folder_digest_counts_the_images_read_and_the_class_folders_not_other_files(tmp_path):
    """A README.txt, .DS_Store or Thumbs.db in an image folder was hashed into its digest: editing one prepared the same
    arrays afresh. Only what prepare reads counts: the images in class folders (their names and bytes) and the class
    folders themselves (an empty one is refused)."""
    root = tmp_path / "imgs"
    write_image_folder(root, classes=("cat", "dog"), per_class=2)
    digest = data.source_digest(str(root))
    for name in ("README.txt", "train/.DS_Store", "train/cat/Thumbs.db", "train/cat/._0.jpg", "val/cat/0.png",
                 "test/.ipynb_checkpoints/0.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not read")
        assert data.source_digest(str(root)) == digest, name
    (root / "README.txt").write_text("edited")
    assert data.source_digest(str(root)) == digest
    (root / "train" / "bird").mkdir()  # a class folder with no images: refused when read, so not the same source
    assert data.source_digest(str(root)) != digest
    (root / "train" / "bird").rmdir()
    shutil.copy(root / "train" / "cat" / "0.jpg", root / "train" / "cat" / "2.JPG")  # an image read: counted
    assert data.source_digest(str(root)) != digest
    (root / "train" / "cat" / "2.JPG").rename(root / "train" / "dog" / "2.JPG")  # its class: counted
    moved = data.source_digest(str(root))
    assert moved != digest
    (root / "train" / "dog" / "2.JPG").write_bytes((root / "train" / "cat" / "1.png").read_bytes())
    assert data.source_digest(str(root)) != moved
    write_official(tmp_path / "official")  # the official batches' folder (readme.html beside them): its 7 files
    batches = tmp_path / "official" / "cifar-10-batches-py"
    digest = data.source_digest(str(batches))
    (batches / "readme.html").write_text("<html></html>")
    assert data.source_digest(str(batches)) == digest
    (batches / "test_batch").write_bytes((batches / "data_batch_1").read_bytes())
    assert data.source_digest(str(batches)) != digest


def test_a_folder_holding_a_file_name_that_is_not_utf8_has_a_digest(tmp_path):
    """A file named in Latin-1 (caf\xe9.png, from an old tar or a Windows share) made the folder's digest, and so every
    prepare of it, a UnicodeEncodeError traceback: the name is hashed as the bytes it is."""
    write_image_folder(tmp_path / "images")
    os.rename(tmp_path / "images" / "train" / "cat" / "0.jpg", os.fsencode(tmp_path / "images" / "train" / "cat")
              + b"/caf\xe9.jpg")
    assert len(data.load_source(str(tmp_path / "images")).x_train) == 9
    assert len(data.source_digest(str(tmp_path / "images"))) == 64


def test_a_class_folder_named_in_latin_1_is_said_to_be_no_utf8(tmp_path):
    """train/caf\\xe9/ (Latin-1, from an old tar or a Windows share) was refused as a class name 'caf\\udce9' of
    characters MLflow cannot log, a name no one wrote: the folder is named, and what its name is not."""
    write_image_folder(tmp_path / "images")
    for split in ("train", "test"):
        os.rename(tmp_path / "images" / split / "cat", os.fsencode(tmp_path / "images" / split) + b"/caf\xe9")
    message = "images: class folder caf\\xe9/ (in test/ and train/) is not named in UTF-8 text: rename it"
    with pytest.raises(data.DataError, match=re.escape(message)):
        data.load_source(str(tmp_path / "images"))


def test_the_test_subset_does_not_depend_on_the_training_subset():
    """Runs over different data.max_train are scored on the same data.max_test images (their test_acc compare)."""
    full = data.make_synthetic(n_train=100, n_test=40)
    kept = [full.subset(max_train=n, max_test=10, seed=0).digest(test_only=True) for n in (0, 30, 60)]
    assert len(set(kept)) == 1
    assert full.subset(max_train=0, max_test=10, seed=1).digest(test_only=True) != kept[0]


def test_the_test_subset_keeps_each_classs_share():
    """A class's share of a test subset is its share of the split, to within one image (a random draw of 100 of
    1,000 balanced images gives some class 6 or 14); the training subset stays a plain random draw."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 100, 100, 100, 100, 300]).astype(np.int32)
    rng.shuffle(y)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    full = data.Dataset(x, y, x, y, tuple(f"c{i}" for i in range(10)))
    for seed in range(5):
        for n in (100, 120, 333):
            counts = np.bincount(full.subset(max_train=0, max_test=n, seed=seed).y_test, minlength=10)
            assert counts.sum() == n
            assert np.all(np.abs(counts - n * np.bincount(y) / len(y)) < 1 + 1e-9), (seed, n, counts)
    train_counts = [np.bincount(full.subset(max_train=100, max_test=0, seed=s).y_train, minlength=10)[:9]
                    for s in range(5)]
    assert any(c.max() - c.min() > 2 for c in train_counts)  # not stratified: a plain draw varies more


def test_prepared_file_round_trip_and_subset(tmp_path):
    d = data.make_synthetic(n_train=100, n_test=40).subset(max_train=30, max_test=0, seed=0)
    assert len(d.x_train) == 30 and len(d.x_test) == 40
    d.save(tmp_path / "d.npz")
    back = data.load_prepared(tmp_path / "d.npz")
    assert back.digest() == d.digest() and back.class_names == d.class_names
    with np.load(tmp_path / "d.npz") as f:
        np.testing.assert_allclose(f["mean"], d.channel_stats()[0])


def test_channel_stats_equal_the_float_mean_and_std_of_every_pixel():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    x[..., 2] //= 4  # channels with different statistics
    d = data.Dataset(x, np.zeros(50, np.int32), x[:5], np.zeros(5, np.int32), ("a",))
    mean, std = d.channel_stats()
    pixels = x.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-12)
    assert mean[2] < mean[0] / 3


def test_decode_image_resizes_and_converts():
    buf = io.BytesIO()
    Image.new("L", (64, 48), color=200).save(buf, format="PNG")
    pixels = data.decode_image(buf.getvalue())
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8 and (pixels == 200).all()
    with pytest.raises(data.DataError):
        data.decode_image(b"\x89PNG broken")


def transparent_png(mode: str) -> bytes:
    """A 32x32 PNG of `mode` whose left half is opaque blue (grey for LA) and right half fully transparent, the colour
    stored under it red (dark grey for LA); for RGBA and LA, the top-left pixel half-transparent black."""
    size, left = (32, 32), (0, 0, 16, 32)
    buf = io.BytesIO()
    if mode == "P":  # a palette with a transparent entry (tRNS), as GIFs and many icons are stored
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, 200, 0, 0, 0, 0, 255])
        img.paste(2, left)
        img.save(buf, format="PNG", transparency=1)
    elif mode == "RGB":  # a colour key: red is transparent (tRNS)
        img = Image.new("RGB", size, (200, 0, 0))
        img.paste((0, 0, 255), left)
        img.save(buf, format="PNG", transparency=(200, 0, 0))
    else:
        hidden, opaque, half = {"RGBA": ((200, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)),
                                "LA": ((30, 0), (90, 255), (0, 128))}[mode]
        img = Image.new(mode, size, hidden)
        img.paste(opaque, left)
        img.putpixel((0, 0), half)
        img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB"])
def test_a_transparent_images_background_is_white_not_the_colour_stored_under_it(mode):
    """`img.convert("RGB")` dropped the alpha channel: a PNG's transparent background, sent to the served model or in
    an image folder, read as whatever colour the file stored there (red here; black in most files). Transparent
    pixels are composited onto white."""
    pixels = data.decode_image(transparent_png(mode)).astype(int)
    assert (pixels[:, 16:] == 255).all()  # the transparent right half
    opaque = (90, 90, 90) if mode == "LA" else (0, 0, 255)
    assert (pixels[1:, :16] == opaque).all() and (pixels[0, 1:16] == opaque).all()
    if mode in ("RGBA", "LA"):  # half black over white: mid-grey, not black
        assert np.isin(pixels[0, 0], (127, 128)).all(), pixels[0, 0]


def test_an_undecodable_image_is_said_to_be_none_of_the_formats_read():
    """A broken cat.webp was 'not a decodable PNG/JPEG image', as if WebP (BMP, GIF, TIFF) were not read at all."""
    formats = {name.upper() for name in re.split(r", | or ", data.IMAGE_FORMATS)}
    assert formats == {Image.registered_extensions()[suffix] for suffix in data.IMAGE_SUFFIXES}  # every one named
    with pytest.raises(data.DataError) as caught:
        data.decode_image(b"RIFF\0\0\0\0WEBPVP8 broken", "train/cat/1.webp")
    assert str(caught.value).startswith("train/cat/1.webp: not a decodable PNG, JPEG, BMP, GIF, WebP or TIFF image (")


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO", "PCX", "EPS"])
def test_decode_image_reads_only_the_formats_it_names(fmt):
    """Pillow opens ~40 formats by their content: a .png holding PPM, TGA or ICO was read, one holding EPS handed
    to Ghostscript (where installed), from data files and from anyone who can reach the model server."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format=fmt)
    with pytest.raises(data.DataError, match=r"^cat.png: not a decodable PNG, .* image \(not one of those formats\)$"):
        data.decode_image(buf.getvalue(), "cat.png")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format="MPO")  # a camera's multi-picture JPEG is a JPEG
    assert np.abs(data.decode_image(buf.getvalue()).astype(int) - (10, 20, 30)).max() <= 2  # lossy


def test_decode_image_reads_16_bit_and_turns_photos_upright():
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(buf, format="PNG")  # 16-bit mid-grey
    assert (data.decode_image(buf.getvalue()) == 128).all()  # not white
    upright = np.zeros((32, 32, 3), dtype=np.uint8)
    upright[:16] = 255  # white on top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # a camera stores it on its side
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    pixels = data.decode_image(buf.getvalue()).astype(int)
    assert pixels[:12].mean() > 200 and pixels[-12:].mean() < 50


def test_a_photo_whose_exif_holds_a_tag_of_another_type_is_turned_upright_not_a_traceback(tmp_path):
    """Pillow's `exif_transpose` writes the EXIF back without the orientation, and that fails (struct.error) on a
    tag stored with another type than TIFF's (here Predictor, a number, stored as text): a photo with such EXIF was a
    traceback from prepare, the data file unnamed (and a served request's error). The EXIF is only read here."""
    upright = np.zeros((32, 32, 3), dtype=np.uint8)
    upright[:16] = 255  # white on top
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    exif[0x010F] = "Maker"
    buf = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=95, exif=exif)
    good = buf.getvalue()
    tag = next(t for t in (b"\x01\x0f\x00\x02", b"\x0f\x01\x02\x00") if t in good)  # Make, as text (either byte order)
    damaged = good.replace(tag, tag.replace(b"\x0f", b"\x3d"), 1)  # tag 0x013D, Predictor, a number in TIFF
    assert damaged != good
    pixels = data.decode_image(damaged).astype(int)
    assert pixels[:12].mean() > 200 and pixels[-12:].mean() < 50
    np.testing.assert_array_equal(pixels, data.decode_image(good))
    write_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=1)
    (tmp_path / "imgs" / "train" / "cat" / "1.jpg").write_bytes(damaged)
    assert len(data.load_source(str(tmp_path / "imgs")).x_train) == 3


@pytest.mark.parametrize("pixels", [np.full((32, 32), 0.5, dtype=np.float32), np.full((32, 32), 128, dtype=np.int32)],
                         ids=["float-0-1", "int32-0-255"])
def test_decode_image_refuses_32_bit_images_of_unknown_scale(pixels):
    buf = io.BytesIO()  # both decoded silently to black (mean 0) before; a 32-bit TIFF's range is anyone's guess
    Image.fromarray(pixels).save(buf, format="TIFF")
    with pytest.raises(data.DataError, match="cat.tif: a 32-bit .* image, whose pixel scale is unknown"):
        data.decode_image(buf.getvalue(), "cat.tif")


def test_real_cifar10_jpeg_copy(cifar_jpeg):
    d = cifar_jpeg  # data.load_source of the copy beside the project (conftest)
    assert d.x_train.shape == (50000, 32, 32, 3) and d.x_test.shape == (10000, 32, 32, 3)
    assert d.class_names == tuple(NAMES)
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    mean, _ = d.channel_stats()
    assert 100 < mean.min() < mean.max() < 140  # natural images, not noise or zeros


def test_an_npz_or_official_archive_with_a_class_it_never_trains_on_is_refused_naming_it(tmp_path):
    """An .npz of labels 0-8 (no class_names: CIFAR-10's ten were taken) or official batches with no truck was read:
    its model had an output no image trained, for a class it then scored 0 on, or on nothing. Refused, naming the
    class; a class with training images but none in the test split is read (evaluate scores the classes it has)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (18, 32, 32, 3), dtype=np.uint8)
    nine = np.arange(18) % 9  # 0-8: no truck
    np.savez(tmp_path / "nine.npz", x_train=x, y_train=nine, x_test=x, y_test=nine)
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path / "nine.npz"))
    assert str(err.value) == (f"{tmp_path / 'nine.npz'}: class 'truck' (label 9) has no images: a class with no "
                              "training images cannot be learned; give a class_names array naming only the classes "
                              "it holds, or add its images")
    np.savez(tmp_path / "untrained.npz", x_train=x, y_train=nine, x_test=x, y_test=np.arange(18) % 10,
             class_names=np.array(NAMES))
    with pytest.raises(data.DataError, match=r"untrained.npz: class 'truck' \(label 9\) has no training images"):
        data.load_source(str(tmp_path / "untrained.npz"))
    np.savez(tmp_path / "untested.npz", x_train=x, y_train=np.arange(18) % 10, x_test=x, y_test=nine)
    assert data.load_source(str(tmp_path / "untested.npz")).class_names == data.CIFAR10_CLASSES

    write_official(tmp_path / "official")
    folder = tmp_path / "official" / "cifar-10-batches-py"
    for name in data.CIFAR10_TRAIN_BATCHES:
        batch = pickle.loads((folder / name).read_bytes(), encoding="bytes")
        batch[b"labels"] = [v % 8 for v in batch[b"labels"]]  # no ship, no truck
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(data.DataError, match=r"cifar-10-batches-py: classes 'ship' \(label 8\), 'truck' \(label 9\) "
                                             r"have no training images: a class with no training images cannot be "
                                             r"learned; remove it from batches.meta's label_names, or add its images"):
        data.load_source(str(folder))


@pytest.mark.parametrize("protocol", [2, 5])
def test_an_official_batch_of_no_images_is_named_as_such(tmp_path, protocol):
    """A batch of no images pickled by Python 3 with protocol 2 (as the official ones are) was refused as a
    'forbidden type __builtin__.bytes' (its empty pixel bytes pickle as a call of bytes()), pointing at a crafted
    pickle; with protocol 5 it was read, a fifth of the training images fewer without a word."""
    write_official(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    batch = {b"batch_label": b"empty", b"labels": [], b"data": np.zeros((0, 3072), np.uint8)}
    (folder / "data_batch_4").write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(data.DataError) as err:
        data.load_source(str(folder))
    assert str(err.value) == f"{folder / 'data_batch_4'}: holds no images (a CIFAR-10 batch holds 'data' of (N, 3072)"\
                             " pixels with N > 0)"
    # bytes() is admitted with no arguments only: bytes(n) would allocate n bytes
    (folder / "data_batch_4").write_bytes(b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.")
    with pytest.raises(data.DataError, match=r"data_batch_4: not a valid CIFAR-10 batch \(forbidden call bytes"):
        data.load_source(str(folder))


def test_the_prepare_key_holds_the_image_decoders_versions_for_an_image_source_only(tmp_path, monkeypatch):
    """An image folder prepared under one Pillow (or libjpeg-turbo) was reused under another, whose JPEG decoder or
    resize may give other pixels: the dataset of the old decoder, under the new one's name. The key holds their
    versions where images are decoded, and only there: an .npz or official batches are read without Pillow."""
    import PIL
    from PIL import features

    from pipeline import config, prepare

    write_image_folder(tmp_path / "imgs")
    named = data.Dataset(*(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4) % 2) * 2, ("a", "b"))
    named.save(tmp_path / "d.npz")
    write_official(tmp_path / "official")
    sources = {"images": tmp_path / "imgs", "npz": tmp_path / "d.npz",
               "batches": tmp_path / "official" / "cifar-10-batches-py"}
    def keys() -> dict[str, str]:
        return {kind: prepare.prepare_key(config.load(None, f"data.source={path}")) for kind, path in sources.items()}

    before, version = keys(), features.version
    assert {kind: data.source_format(str(path)) for kind, path in sources.items()} == {k: k for k in sources}
    for patch in ((PIL, "__version__", "0.0.1"),
                  (features, "version", lambda name: "0.1" if name == "libjpeg_turbo" else version(name))):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            after = keys()
        assert after["images"] != before["images"], patch
        assert (after["npz"], after["batches"]) == (before["npz"], before["batches"])


def test_the_prepare_key_holds_numpys_version_where_its_generator_draws_the_data(tmp_path, monkeypatch):
    """NumPy keeps a seeded Generator's stream only within one build: the synthetic dataset and the subsets
    data.max_train/max_test draw were reused from another NumPy's draw. Its version is in the key where prepare
    draws."""
    from pipeline import config, prepare

    named = data.Dataset(*(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4) % 2) * 2, ("a", "b"))
    named.save(tmp_path / "d.npz")

    def key(overrides: str = "") -> str:
        return prepare.prepare_key(config.load(None, [f"data.source={tmp_path / 'd.npz'}", *overrides.split()]))

    drawn = ("data.source=synthetic", "data.max_train=2", "data.max_test=2")
    before = {overrides: key(overrides) for overrides in ("", *drawn)}
    with monkeypatch.context() as m:
        m.setattr(np, "__version__", "0.0.1")
        after = {overrides: key(overrides) for overrides in ("", *drawn)}
    assert after[""] == before[""]  # the whole file, as it is: no draw
    assert all(after[overrides] != before[overrides] for overrides in drawn)


def test_the_prepare_key_leaves_out_the_data_params_without_effect(tmp_path):
    """Data params without effect (data.synthetic_train of a file source, data.seed with no subset drawn) were in the
    key: each other value prepared the same arrays again."""
    from pipeline import config, prepare

    named = data.Dataset(*(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4) % 2) * 2, ("a", "b"))
    named.save(tmp_path / "d.npz")

    def key(overrides: str = "") -> str:
        return prepare.prepare_key(config.load(None, [f"data.source={tmp_path / 'd.npz'}", *overrides.split()]))

    assert key("data.synthetic_train=500 data.synthetic_test=50 data.seed=3") == key()
    assert key("data.max_train=2 data.seed=3") != key("data.max_train=2")  # another subset
    assert key("data.source=synthetic data.synthetic_train=500") != key("data.source=synthetic")


def test_a_subset_of_all_the_images_or_more_keys_as_all_and_more_is_warned_about(tmp_path, capsys):
    """data.max_train (or max_test) at or above the images a source holds takes them all, as 0 does, but keyed
    otherwise: a rerun of max_train=0 after 60000 prepared CIFAR-10's identical arrays again. Where the source's
    counts are known from the params (cifar10, synthetic) it keys as 0; above the count, prepare says it takes all."""
    from pipeline import config, prepare

    def key(overrides: str) -> str:
        return prepare.prepare_key(config.load(None, overrides.split()))

    cifar = "data.source=cifar10"
    assert key(f"{cifar} data.max_train=60000 data.max_test=10000 data.seed=3") == key(cifar)
    assert key(f"{cifar} data.max_train=50000") == key(cifar) != key(f"{cifar} data.max_train=49999")
    synthetic = "data.source=synthetic data.synthetic_train=20 data.synthetic_test=10"
    assert key(f"{synthetic} data.max_train=20 data.max_test=11") == key(synthetic)
    assert key(f"{synthetic} data.max_test=9") != key(synthetic)
    whole = prepare.build(config.load(None, synthetic.split()))
    assert capsys.readouterr().err == ""
    more = prepare.build(config.load(None, [*synthetic.split(), "data.max_train=30", "data.max_test=10"]))
    assert more.digest() == whole.digest()
    assert capsys.readouterr().err == ("warning: data.max_train 30 is above the 20 training images synthetic holds: "
                                       "all 20 are taken, as with 0\n")
    named = data.Dataset(*(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4) % 2) * 2, ("a", "b"))
    named.save(tmp_path / "d.npz")  # a path, whose counts only reading it tells: said as it is read
    prepare.build(config.load(None, [f"data.source={tmp_path / 'd.npz'}", "data.max_test=5"]))
    assert capsys.readouterr().err == (f"warning: data.max_test 5 is above the 4 test images {tmp_path / 'd.npz'} "
                                       "holds: all 4 are taken, as with 0\n")


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_npz_labels_one_hot_are_named_as_such(tmp_path, dtype):
    """Labels saved as keras.utils.to_categorical gives them, (N, 10) one-hot rows, were refused as "must hold
    integer labels, got float32" or "labels of shape (20, 10)": neither said what the file holds or what to give."""
    x, y = np.zeros((20, 32, 32, 3), np.uint8), np.arange(20) % 10
    np.savez(tmp_path / "onehot.npz", x_train=x, y_train=np.eye(10, dtype=dtype)[y], x_test=x, y_test=y)
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path / "onehot.npz"))
    assert str(err.value) == (f"{tmp_path / 'onehot.npz'}: y_train holds rows of 10 values per image, shape (20, 10) "
                              "(one-hot, as keras.utils.to_categorical writes them?): give one class index per image, "
                              "y_train.argmax(axis=1)")


def test_an_npz_holding_no_arrays_is_named_as_an_npz(tmp_path):
    """`np.savez(path)` with no arrays (an empty zip named .npz) was read as an image folder: "no images found under
    train/<class>/", a layout an .npz has nothing to do with."""
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path / "empty.npz"))
    assert str(err.value) == (f"{tmp_path / 'empty.npz'}: no array x_train, y_train, x_test, y_test (an .npz source "
                              "holds x_train, y_train, x_test, y_test, and optionally class_names)")


def test_an_official_batch_of_0_bytes_is_named_as_empty(tmp_path):
    """A batch file of 0 bytes (an extraction or a copy cut short) was 'not a valid CIFAR-10 batch (Ran out of
    input)', pickle's words."""
    write_official(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"")
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path / "cifar-10-batches-py"))
    assert str(err.value) == (f"{tmp_path / 'cifar-10-batches-py' / 'data_batch_2'}: an empty file (0 bytes), not a "
                              "CIFAR-10 batch: a copy or an extraction cut short? Copy or extract it again")


@pytest.mark.parametrize("uri, hint", [
    ("runs:/0123abcd/dataset/dataset.npz", "a prepared dataset's URI, which train and evaluate take as "
                                           "-P dataset_uri=runs:/0123abcd/dataset/dataset.npz"),
    ("file:///data/x.npz", "a file URI: give the path, /data/x.npz"),
    ("s3://bucket/cifar.tar.gz", "a URI: prepare reads a file or folder on this machine; download it and give "
                                 "its path"),
    ("https://example.com/cifar.tar.gz", "a URI: prepare reads a file or folder on this machine; download it and "
                                         "give its path"),
])
def test_a_uri_given_as_data_source_says_what_takes_it(uri, hint):
    """`-P data=runs:/<id>/dataset/dataset.npz` (prepare's last line, dataset_uri=..., given to the wrong -P), a
    file:// URI or a remote one (s3://, https://) was "neither 'cifar10', 'synthetic' nor an existing path", with no
    word of what it is, and named as `s3:/bucket/...`, not as given."""
    from pipeline import config

    source = config.load(None, f"data.source={uri}").data.source  # as a command has it
    assert source == uri
    with pytest.raises(data.DataError) as err:
        data.load_source(source)
    assert str(err.value) == f"data.source: {uri!r} is {hint}"


@pytest.mark.parametrize("source, meant", [("CIFAR10", "cifar10"), ("cifar-10", "cifar10"), ("Synthetic", "synthetic"),
                                           ("CIFAR_10", "cifar10")])
def test_a_misspelt_built_in_source_names_the_closest_one(source, meant):
    """`-P data=CIFAR10` or `cifar-10` was "neither 'cifar10', 'synthetic' nor an existing path", leaving the user to
    spot the spelling."""
    with pytest.raises(data.DataError) as err:
        data.load_source(source)
    assert str(err.value) == (f"data.source: {source!r} is neither 'cifar10', 'synthetic' nor an existing path; did "
                              f"you mean {meant}?")


def test_a_relative_path_given_in_another_folder_is_told_where_it_is_read(tmp_path, monkeypatch):
    """`mlflow run /path/to/project -P data=images` in the folder holding `images` runs the step in the project's
    folder: it was "neither 'cifar10', 'synthetic' nor an existing path", of a folder `ls` lists there. $PWD is the
    shell's folder (a process started in another keeps it), or that of `mlflow run`, the step's parent."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "images").mkdir()
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(os, "getppid", os.getpid)  # the parent's folder (below) is this process's: nothing to say
    monkeypatch.setenv("PWD", str(tmp_path))
    with pytest.raises(data.DataError) as err:
        data.load_source("images")
    assert str(err.value) == (f"data.source: 'images' is neither 'cifar10', 'synthetic' nor an existing path (not in "
                              f"{ROOT}, the folder mlflow run runs each step in, but in {tmp_path}, where the command "
                              f"was given: give its absolute path, {tmp_path}/images)")
    monkeypatch.setenv("PWD", str(ROOT))  # the same folder: nothing to say of it
    with pytest.raises(data.DataError, match=r"^data.source: 'images' is neither 'cifar10', 'synthetic' nor an "
                                             r"existing path$"):
        data.load_source("images")
    # `mlflow run`'s step: started in the project's folder through `bash -c`, which sets $PWD to it; its parent,
    # `mlflow run`, was given the command in the folder holding `images`
    monkeypatch.chdir(tmp_path)
    step = subprocess.run([sys.executable, "-c", "from pipeline import data; data.load_source('images')"], cwd=ROOT,
                          env={**os.environ, "PWD": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert step.stderr.strip().splitlines()[-1] == (
        f"pipeline.data.DataError: data.source: 'images' is neither 'cifar10', 'synthetic' nor an existing path (not "
        f"in {ROOT}, the folder mlflow run runs each step in, but in {tmp_path}, where the command was given: give its "
        f"absolute path, {tmp_path}/images)")


def test_cifar100_is_not_said_to_be_cifar10():
    with pytest.raises(data.DataError) as err:
        data.load_source("cifar100")
    assert str(err.value) == "data.source: 'cifar100' is neither 'cifar10', 'synthetic' nor an existing path"


@pytest.mark.parametrize("name", ["cifar10.tar.gz", "images.zip", "dataset.npz", "cifar-10-python.tar.gz", "data"])
def test_a_source_file_of_0_bytes_is_named_as_empty(tmp_path, name):
    """A source file of 0 bytes (a download or a copy cut short) was 'unreadable archive (not a whole zip or tar file)'
    or, under a name of no archive, 'not a dataset source' followed by the list of every source data.source takes."""
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path / name))
    assert str(err.value) == (f"{tmp_path / name}: an empty file (0 bytes), not a dataset: a download or a copy cut "
                              "short? Copy or download it again")


def test_a_folder_holding_a_dataset_archive_names_the_archive_to_give(tmp_path):
    """`-P data=../shared/datasets`, the folder the archive is in, said only that it holds 'no image file, only 2 others
    (README.md, cifar10-jpeg-q75.tar.gz)': it names the archive as the source to give."""
    (tmp_path / "README.md").write_text("the data\n")
    (tmp_path / "cifar10-jpeg-q75.tar.gz").write_bytes(b"\x1f\x8b not read")
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path))
    assert str(err.value).endswith(f"only 2 others (README.md, cifar10-jpeg-q75.tar.gz): give the archive itself, "
                                   f"data.source={tmp_path / 'cifar10-jpeg-q75.tar.gz'}")


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_split_folder_given_as_the_source_names_the_folder_above_it(tmp_path, split):
    """`-P data=cifar/train` (the split, not the dataset) said only 'no images found under train/<class>/', though
    it holds train/<class>/'s images: it names the folder above, which holds train/ and test/."""
    for part in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "cifar" / part / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / "cifar" / part / cls / "0.png")
    with pytest.raises(data.DataError) as err:
        data.load_source(str(tmp_path / "cifar" / split))
    assert str(err.value).endswith(f"...): this is a {split}/ folder itself: give the folder above it, which holds "
                                   f"train/ and test/, data.source={tmp_path / 'cifar'}")
