"""The served model: input decoding and validation in process, then a real `mlflow models serve`.

One tiny model is trained once for the module against a temporary SQLite store; one server is
started on a free loopback port and killed at the end.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from bench.servers import free_port, start_model_server, stop_group
from pipeline import config, data, evaluate, predict, prepare, serve, train
from pipeline import tracking as tracking_layer
from pipeline.data import decode_image
from pipeline.tracking import PIPELINE_DIR, resume, steps, training
from pipeline.tracking.resume import TRAIN_CODE
from tests.conftest import http_stub

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_SECONDS = 300  # MLflow and TensorFlow imported, the model loaded: minutes on a loaded CI machine
# decode_image's word for bytes that are no image it reads, in the served model's 400s as in data
UNDECODABLE = "not a decodable PNG, JPEG, BMP, GIF, WebP or TIFF image"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- helpers ----------------------------------------------------------------------------------

def random_pixels(n: int, seed: int = 0, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    """uint8 RGB pixels (n, height, width, 3)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """One uint8 (h, w, 3) image -> PNG or JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    """A Pillow image -> its bytes in `fmt`, saved with `options`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def post(url: str, body: dict | bytes) -> tuple[int, dict]:
    """POST a JSON body (dict, or raw bytes sent as is) to `<url>/invocations` -> (status, parsed answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ping(url: str) -> int:
    with urllib.request.urlopen(f"{url}/ping", timeout=10) as response:
        return response.status


def assert_same_predictions(served: list[dict], local: pd.DataFrame) -> None:
    """Predictions over HTTP equal in-process ones: labels exactly, probabilities to float32 noise."""
    assert [row["label"] for row in served] == local["label"].tolist()
    np.testing.assert_allclose([row["probabilities"] for row in served], np.stack(local["probabilities"]), atol=1e-5)
    np.testing.assert_allclose([row["probability"] for row in served], local["probability"], atol=1e-5)


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> Iterator[tuple[Path, str]]:
    """A temporary SQLite tracking store, active for the module: (folder, tracking URI)."""
    tmp = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{tmp}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield tmp, uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def model_uri(tracking) -> str:
    """Prepare and train a one-epoch tiny model in process; its `models:/` URI. Served with flip_shift TTA, trained
    with reflect fills: the server's shifted views must fill their border so."""
    tmp, _ = tracking
    cfg = config.load(ROOT / "params" / "tiny.yaml",
                      ["train.epochs=1", "train.verbose=0", "data.synthetic_train=512", "data.synthetic_test=64",
                       "train.shift_fill=reflect", "evaluate.tta=flip_shift"])
    experiment = mlflow.create_experiment("serve-tests", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        return train.run(cfg, prepare.run(cfg))


@pytest.fixture(scope="module")
def local_model(model_uri) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(model_uri)


@pytest.fixture(scope="module")
def server(model_uri, tracking) -> Iterator[str]:
    """`mlflow models serve` on a free loopback port; its base URL. Killed (whole group) at teardown."""
    tmp, uri = tracking
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_model_server(model_uri, port, tmp / "server.log", timeout=SERVER_START_SECONDS,
                                 env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    try:
        yield url
    finally:
        stop_group(process)


# --- input handling, no server ----------------------------------------------------------------

def test_to_pixels_accepts_integer_tensors_and_single_images():
    pixels = random_pixels(3)
    for given in (pixels, pixels.tolist(), pixels.astype(np.int64), pixels.astype(float)):
        out = serve.to_pixels(given)
        assert out.dtype == np.uint8 and out.shape == (3, 32, 32, 3)
        np.testing.assert_array_equal(out, pixels)
    np.testing.assert_array_equal(serve.to_pixels(pixels[0].tolist()), pixels[:1])
    # Black as floats, and integers 0 and 1 (a very dark image): not mistaken for pixels scaled to [0, 1].
    for dark in (np.zeros((1, 32, 32, 3)), np.ones((1, 32, 32, 3), dtype=np.int64), [[[[0, 1, 1]] * 32] * 32],
                 np.ones((1, 32, 32, 3), dtype=object)):
        np.testing.assert_array_equal(serve.to_pixels(dark), np.asarray(dark, dtype=np.uint8))


@pytest.mark.parametrize(("given", "problem"), [
    (random_pixels(2) / 255.0, "fractional values in [0, 1] (scaled to [0, 1]?)"),
    # the hint was "scaled to [0, 1]?" whatever the range: normalised pixels, and unrounded ones, are not
    (random_pixels(2) / 127.5 - 1, "fractional values in [-1, 1] (normalised?)"),
    (random_pixels(2) * 0.999, "fractional values in [0, 254.745] (round them to whole numbers)"),
    (np.ones((2, 32, 32, 3)), "floats of only 0.0 and 1.0 (scaled to [0, 1]?)"),
    (np.where(random_pixels(1) > 127, 1.0, 0.0), "floats of only 0.0 and 1.0 (scaled to [0, 1]?)"),
    (random_pixels(2).astype(np.int64) + 1, "0-255"),
    (random_pixels(2).astype(np.int64) - 256, "0-255"),
    (np.full((1, 32, 32, 3), np.nan), "NaN"),
    (random_pixels(2, shape=(16, 32)), "shape (n, 32, 32, 3)"),
    (np.zeros((1, 32, 32, 4), dtype=np.uint8), "3 channels"),
    (np.zeros((1, 32, 32, 1), dtype=np.uint8), "3 channels"),
    ([], "empty batch"),
    (np.zeros((0, 32, 32, 3)), "empty batch"),
    ([[[[1, 2, 3]]], [[[1, 2]]]], "(n, 32, 32, 3)"),
    (np.ones((1, 32, 32, 3), dtype=bool), "integers 0-255"),
], ids=["floats01", "normalised", "unrounded", "white01", "line-art01", "over255", "negative", "nan", "shape",
        "4channels", "1channel", "empty-list", "empty-array", "ragged", "bool"])
def test_to_pixels_refuses_bad_tensors(given, problem):
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels(given)
    assert problem in info.value.message
    assert info.value.get_http_status_code() == 400


@pytest.mark.parametrize("given", [
    np.array([["aGk="]]), [["aGk="]], [["aGk="], ["aGk="]], np.array([[b"hi"]]), [[["aGk="]]], [["aGk=", None]],
], ids=["array", "list", "two", "bytes", "deeper", "with-null"])
def test_to_pixels_tells_base64_nested_too_deep_to_unnest_it(given):
    # {"inputs": [["<b64>"]]}: told "pixels must have shape (n, 32, 32, 3), got (1, 1); send other sizes as base64
    # ... images", to a client sending base64 images
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels(given)
    assert "base64 images nested in lists" in info.value.message
    assert 'each image a string of its own: {"inputs": ["<b64>", ...]}' in info.value.message


def one_pixel(value, at=(0, 1, 2, 0)) -> np.ndarray:
    """A black (1, 32, 32, 3) image as an object array, `value` at `at`: what MLflow makes of a request holding it."""
    pixels = np.zeros((1, 32, 32, 3), dtype=object)
    pixels[at] = value
    return pixels


@pytest.mark.parametrize(("given", "problem"), [
    (one_pixel(None), "pixels must be integers 0-255, got null at [0, 1, 2, 0]"),
    (one_pixel(None).tolist(), "pixels must be integers 0-255, got null at [0, 1, 2, 0]"),
    (one_pixel("12").tolist(), "pixels must be integers 0-255, got '12' at [0, 1, 2, 0]"),
    (one_pixel(True, (0, 31, 0, 2)), "pixels must be integers 0-255, got True at [0, 31, 0, 2]"),
    (one_pixel(2**70), f"image 0: pixels must lie in 0-255, got values in [0, {2**70}]"),
    (one_pixel(-(2**70)).tolist(), f"image 0: pixels must lie in 0-255, got values in [{-(2**70)}, 0]"),
    # a string among numbers makes MLflow's array all text: which value it was is lost
    (one_pixel("12").astype(str), "pixels must be integers 0-255, got text (such as '0'): send numbers, not strings"),
], ids=["null", "null-list", "text-list", "bool", "beyond-int64", "beyond-int64-negative", "text-array"])
def test_to_pixels_says_which_value_is_not_a_pixel(given, problem):
    # nulls, text and integers beyond int64 among the pixels were told "got values of type object", naming none
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels(given)
    assert info.value.message == f"bad input: {problem}"


def with_bad_images(value, images=(2,), n: int = 5) -> np.ndarray:
    """`n` good float (n, 32, 32, 3) images, one pixel of each of `images` set to `value`."""
    pixels = random_pixels(n, seed=11).astype(np.float64)
    for i in images:
        pixels[i, 5, 6, 1] = value
    return pixels


@pytest.mark.parametrize(("given", "problem"), [
    (with_bad_images(np.nan), "image 2: pixels contain NaN or infinity"),
    (with_bad_images(-np.inf, (0, 3)), "images 0, 3 of 5: pixels contain NaN or infinity"),
    (with_bad_images(np.inf, range(5)), "images 0, 1, 2 and 2 more of 5: pixels contain NaN or infinity"),
    (with_bad_images(300), "image 2: pixels must lie in 0-255, got values in [0, 300]"),
    (with_bad_images(-1, (4,)), "image 4: pixels must lie in 0-255, got values in [-1, 255]"),
    # one image scaled to [0, 1] among whole ones: the range and the hint were the batch's ("[0, 255] (round them to
    # whole numbers)")
    (np.concatenate([random_pixels(3, seed=11), random_pixels(1, seed=12) / 255.0]),
     "image 3: pixels must be integers 0-255; got fractional values in [0, 1] (scaled to [0, 1]?)"),
    (with_bad_images(0.5, (1,)).tolist(), "image 1: pixels must be integers 0-255; got fractional values in [0, 255] "
                                          "(round them to whole numbers)"),
    (one_pixel(2**70, (0, 0, 0, 0)).repeat(2, axis=0), f"images 0, 1 of 2: pixels must lie in 0-255, got values in "
                                                       f"[0, {2**70}]"),
], ids=["nan", "inf-two", "inf-all", "over255", "negative", "one-scaled", "one-unrounded-list", "beyond-int64"])
def test_to_pixels_names_the_images_whose_pixels_are_refused(given, problem):
    # a batch of pixel tensors with one bad image was refused with "pixels contain NaN or infinity", or the range of the
    # whole batch, naming no image: in 10,000 rows, which one?
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels(given)
    assert info.value.message == f"bad input: {problem}"


@pytest.mark.parametrize(("given", "hint"), [
    (random_pixels(2).transpose(0, 3, 1, 2), "got (2, 3, 32, 32): channels first? move them last"),
    (random_pixels(1)[0].transpose(2, 0, 1), "got (3, 32, 32): channels first? move them last"),
    (random_pixels(2)[..., 0], "got (2, 32, 32): greyscale? send each grey value as r, g and b"),
    (random_pixels(1)[0, ..., 0], "got (32, 32): greyscale? send each grey value as r, g and b"),
    (random_pixels(2, shape=(16, 32)), "got (2, 16, 32, 3); send other sizes as base64"),
], ids=["channels-first", "channels-first-one", "greyscale", "greyscale-one", "other-size"])
def test_to_pixels_says_what_a_32x32_tensor_of_another_layout_needs(given, hint):
    # PyTorch's (n, 3, 32, 32) and greyscale (n, 32, 32) tensors, 32x32 already, were told "send other sizes as
    # base64 ... images"
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels(given.tolist())
    assert f"pixels must have shape (n, 32, 32, 3), {hint}" in info.value.message


@pytest.mark.parametrize(("given", "problem"), [
    (np.zeros((32, 32, 4), dtype=np.uint8), "pixels must have 3 channels (RGB), got 4 (shape (32, 32, 4))"),
    (np.zeros((32, 32, 1), dtype=np.uint8), "pixels must have 3 channels (RGB), got 1 (shape (32, 32, 1))"),
    (random_pixels(2).reshape(2, -1), "pixels must have shape (n, 32, 32, 3), got (2, 3072): flattened? send each "
                                      "image (32, 32, 3); CIFAR-10's rows of 3072 hold the red, green and blue planes "
                                      "in turn: row.reshape(3, 32, 32).transpose(1, 2, 0)"),
    (random_pixels(2).reshape(-1), "pixels must have shape (n, 32, 32, 3), got (6144,): flattened?"),
    # {"instances": [[image], [image]]}, or a batch wrapped in one more list
    (random_pixels(2)[:, None], "pixels must have shape (n, 32, 32, 3), got (2, 1, 32, 32, 3): nested a level too "
                                "deep? send a list of (32, 32, 3) images"),
    (random_pixels(2)[None], "pixels must have shape (n, 32, 32, 3), got (1, 2, 32, 32, 3): nested a level too deep?"),
], ids=["rgba-one", "grey-channel-one", "flattened", "flattened-all", "nested-each", "nested-batch"])
def test_to_pixels_says_what_a_single_flattened_or_nested_image_needs(given, problem):
    # one RGBA image (32, 32, 4) was told "send other sizes as base64 ... images", while a batch of them was told
    # "3 channels"; a flattened batch (n, 3072), as CIFAR-10's own files hold it, and images in one list too many, the
    # same, nothing of how to reshape them
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels(given.tolist())
    assert info.value.message.startswith(f"bad input: {problem}")


@pytest.mark.parametrize("given", [
    {"image": random_pixels(2).tolist()}, pd.DataFrame({"image": [random_pixels(1)[0].tolist()]}),
    [{"image": np.asarray(random_pixels(1)[0])}],
], ids=["named", "records", "inputs-records"])
def test_pixels_under_the_image_column_are_told_to_go_unnamed(given):
    # {"inputs": {"image": [[[[r, g, b], ...]]]}} and pixel records were told "expected a base64-encoded ... image
    # string, got list" (or "got ndarray"), nothing of how pixels are sent
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels(given)
    assert info.value.message == ("bad input: image 0: pixel values under 'image', which takes base64-encoded images; "
                                  'send pixel tensors unnamed, as {"inputs": [[[[r, g, b], ...]]]}')


def test_encoded_images_decode_like_training_images():
    big = random_pixels(1, seed=1, shape=(48, 64))[0]
    png, jpeg = encode(big, "PNG"), encode(big, "JPEG")
    expected = np.stack([decode_image(png), decode_image(jpeg)])
    for given in ([b64(png), b64(jpeg)], np.array([b64(png), b64(jpeg)]), [png, jpeg],
                  pd.DataFrame({"image": [b64(png), b64(jpeg)]}), {"image": [b64(png), b64(jpeg)]},
                  [f"data:image/png;base64,{b64(png)}", b64(jpeg)],
                  [base64.encodebytes(png).decode(), base64.encodebytes(jpeg).decode()],  # lines of 76, as `base64`
                  # a frame's column on its own, and records under "inputs" as the server passes them (0-d arrays):
                  # read as pixel values, they were refused with "pixels must have shape (n, 32, 32, 3), got (2,)"
                  pd.Series([b64(png), b64(jpeg)]), (b64(png), b64(jpeg)),
                  [{"image": np.array(b64(png))}, {"image": np.array(b64(jpeg)), "id": np.array(7)}]):
        np.testing.assert_array_equal(serve.to_pixels(given), expected)
    assert serve.to_pixels(b64(png)).shape == (1, 32, 32, 3)
    for one in ({"image": b64(png)}, {"image": np.array(b64(png))}):  # one named image, as MLflow passes it
        np.testing.assert_array_equal(serve.to_pixels(one), expected[:1])


@pytest.mark.parametrize("prefix", ["data:image/png;name=cat.png;base64,", "data:image/png;charset=utf-8;base64,",
                                    "DATA:image/PNG;BASE64,", "data:;base64,"],
                         ids=["name-parameter", "charset-parameter", "upper-case", "no-media-type"])
def test_data_uris_with_parameters_or_in_capitals_are_accepted(prefix):
    # RFC 2397's data: URIs may carry parameters before ";base64" and are case-insensitive: all but the plain
    # "data:image/png;base64," were refused with "not valid base64 (Only base64 data is allowed)"
    png = encode(random_pixels(1, seed=2)[0])
    np.testing.assert_array_equal(serve.to_pixels([prefix + b64(png)]), decode_image(png)[None])


@pytest.mark.parametrize("prefix", ["data:image/png; base64,", "data:image/png;base64, ", "data: image/png ; base64 ,",
                                    "data:image/png; charset=utf-8; base64,"])
def test_data_uris_with_spaces_between_their_parts_are_accepted(prefix):
    # a space after the semicolon (as some hand-written clients and docs have it) was refused with "not valid base64
    # (Only base64 data is allowed)", no word of the prefix
    png = encode(random_pixels(1, seed=2)[0])
    np.testing.assert_array_equal(serve.to_pixels([prefix + b64(png)]), decode_image(png)[None])


@pytest.mark.parametrize(("given", "header"), [("data:image/png,iVBORw0KGgo", "data:image/png,"),
                                               ("data:image/png;base64iVBORw0KGgo", "data:image/png;base64iVBORw0KGgo"),
                                               ("data:image/png;utf8,%89PNG", "data:image/png;utf8,")])
def test_a_data_uri_that_is_not_base64_is_refused_naming_its_header(given, header):
    # refused as "not valid base64 (Only base64 data is allowed)", which said nothing of the prefix at fault
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels([b64(encode(random_pixels(1)[0])), given])
    assert info.value.message.endswith(
        f"image 1: {header!r} is no data: URI of base64 data: give data:<media type>;base64,<the image's base64>")


def test_url_safe_and_unpadded_base64_are_accepted():
    # JavaScript's base64url, Python's urlsafe_b64encode and JWT-style encoders (- and _ for + and /, the = padding
    # left off) were refused with "not valid base64 (Only base64 data is allowed)" or "(Incorrect padding)"
    pngs = [encode(random_pixels(1, shape=(height, 32))[0]) for height in (32, 31, 30)]  # 0, 1 and 2 = of padding
    standard = [b64(png) for png in pngs]
    assert all(set(text) & set("+/") for text in standard) and {len(t.rstrip("=")) % 4 for t in standard} == {0, 2, 3}
    expected = serve.to_pixels(standard)
    for given in ([base64.urlsafe_b64encode(png).decode() for png in pngs], [t.rstrip("=") for t in standard],
                  [base64.urlsafe_b64encode(png).decode().rstrip("=") for png in pngs],
                  [f"data:image/png;base64,{t.rstrip('=')}" for t in standard]):
        np.testing.assert_array_equal(serve.to_pixels(given), expected)
    # the two alphabets mixed, and a length no padding completes: still refused
    mixed = standard[0].replace("/", "_", 1)
    whole = next(t for t in standard if len(t) % 4 == 0 and not t.endswith("="))
    for bad in (mixed, whole + "A"):
        with pytest.raises(MlflowException, match="image 0: not a base64 image: not valid base64"):
            serve.to_pixels([bad])


def test_raw_bytes_in_numpy_arrays_keep_their_trailing_zero_bytes():
    # numpy's fixed-width bytes drop trailing zero bytes: a BMP ending in a black row's padding, an LZW TIFF and a
    # lossless WebP lost their last bytes and were refused as undecodable
    pixels = random_pixels(1, seed=8, shape=(30, 30))[0]
    pixels[0] = 0
    images = [encode(pixels, "BMP"), encode(pixels, "WEBP"), encode(random_pixels(1, seed=9)[0], "PNG")]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "TIFF", compression="tiff_lzw")
    images.append(buffer.getvalue())
    assert all(raw.endswith(b"\0") for raw in images[:2] + images[3:])
    expected = np.stack([decode_image(raw) for raw in images])
    np.testing.assert_array_equal(serve.to_pixels(images), expected)  # a list keeps bytes whole
    for given in (np.array(images), {"image": np.array(images)}):
        np.testing.assert_array_equal(serve.to_pixels(given), expected)
    for i, raw in enumerate(images):
        for one in (np.array(raw), [{"image": np.array(raw)}], {"image": np.array(raw)}):
            np.testing.assert_array_equal(serve.to_pixels(one), expected[i:i + 1])


@pytest.mark.parametrize(("given", "problem"), [
    (["not base64!!"], "not valid base64"),
    (["iVBORw0K…"], "image 0: not a base64 image: not valid base64 (string argument should contain only ASCII"),
    ([b64(b"hello, not an image")], UNDECODABLE),
    ([b64(encode(random_pixels(1)[0])), 7], "image 1"),
    ([""], "image 0: empty image"),
    (pd.DataFrame({"img": ["x"]}), "a column 'image'"),
    (pd.DataFrame({"image": []}), "empty batch"),
    ({"image": np.array(["x"]), "picture": np.array(["y"])}, "take only 'image'"),  # {"instances": [{..}, {..}]}
    (np.array("abc"), f"image 0: {UNDECODABLE}"),  # what the server makes of {"inputs": "abc"}: one image
    (pd.DataFrame([]), "empty batch"),  # {"dataframe_records": []}: said "needs a column 'image'"
    (pd.DataFrame(np.zeros((1, 3072))), "[0, 1, 2, 3, 4] and 3067 more;"),  # flattened pixels: not 3,072 names
    ([{"picture": np.array("x")}], "a column 'image'"),  # {"inputs": [{"picture": ...}]}
    # its missing image is NaN in the frame: said "expected a base64-encoded ... image string, got float"
    ([{"image": np.array(b64(encode(random_pixels(1)[0])))}, {"img": np.array("y")}],
     "image 1: no image (null, or a record without 'image')"),
    (pd.DataFrame({"image": [b64(encode(random_pixels(1)[0])), None]}), "image 1: no image"),  # split's [null]
    (pd.DataFrame([{}, {}]), "a column 'image'"),  # {"dataframe_records": [{}, {}]}: said "empty batch"
    # Pillow reads ~40 formats: PPM was answered, EPS went to Ghostscript where installed (anyone's request)
    ([b64(encode(random_pixels(1)[0], "PPM"))], f"image 0: {UNDECODABLE} (not one of those formats)"),
    ([b64(encode(random_pixels(1)[0], "EPS"))], f"image 0: {UNDECODABLE} (not one of those formats)"),
    # a null before the images ({"inputs": [null, "<b64>"]}): the batch was read as pixel values, "pixels must have
    # shape (n, 32, 32, 3), got (2,); send other sizes as base64 ... images" to a client that had sent base64 images
    ([None, b64(encode(random_pixels(1)[0]))], "image 0: no image (null, or a record without 'image')"),
    (np.array([None, b64(encode(random_pixels(1)[0]))]), "image 0: no image (null, or a record without 'image')"),
    # only nulls ({"inputs": [null]}): read as pixel values, "pixels must have shape (n, 32, 32, 3), got (1,)"
    ([None], "image 0: no image (null, or a record without 'image')"),
    (np.array([None, None]), "image 0: no image (null, or a record without 'image')"),
    # {"dataframe_split": {"columns": ["image", "image"], ...}}: said "image 0: expected a base64-encoded ... image
    # string, got DataFrame"
    (pd.DataFrame([["x", "y"]], columns=["image", "image"]), "2 columns named 'image': send the images in one"),
    # file names in place of images: said "not valid base64 (Only base64 data is allowed)", with no word of files
    (["test/cat/0338.jpg"], "image 0: 'test/cat/0338.jpg' is a file name, not a base64 image: the model reads no "
                            "files; send the file's bytes base64-encoded (python -m pipeline.predict FILE does)"),
    (pd.DataFrame({"image": [b64(encode(random_pixels(1)[0])), " ~/photos/Cat.PNG\n"]}),
     "image 1: '~/photos/Cat.PNG' is a file name"),
    # URLs in place of images: said "not valid base64", or that a URL with an image's suffix was a file name
    (["http://example.com/img?id=3"], "image 0: 'http://example.com/img?id=3' is a URL, not a base64 image: the model "
                                      "fetches nothing; send the image's bytes base64-encoded"),
    (pd.DataFrame({"image": [b64(encode(random_pixels(1)[0])), "https://example.com/cat.jpg"]}),
     "image 1: 'https://example.com/cat.jpg' is a URL, not a base64 image"),
    ([f"s3://bucket/{'x' * 200}.png"], f"image 0: 's3://bucket/{'x' * 88}...' is a URL"),
    # a number or boolean among base64 strings ({"inputs": ["<b64>", 5]}): MLflow makes every item text, and "5" was
    # "not valid base64 (... number of data characters (1) ...)", "True" and "inf" base64 of no image
    (np.array([b64(encode(random_pixels(1)[0])), "5"]), "image 1: '5' is a number or true/false, not a base64 image "
                                                          "(a list mixing base64 strings with other values is read as "
                                                          "strings): send each image as a base64 string"),
    (np.array([b64(encode(random_pixels(1)[0])), "True", "-2.5e3"]), "image 1: 'True' is a number or true/false"),
    (np.array([b64(encode(random_pixels(1)[0])), "inf"]), "image 1: 'inf' is a number or true/false"),
    # records among other values ({"inputs": [{"image": "<b64>"}, 5]}, an object array from MLflow): said "pixels must
    # have shape (n, 32, 32, 3), got (2,); send other sizes as base64 ... images" to a client that sent records
    (np.array([{"image": b64(encode(random_pixels(1)[0]))}, 5], dtype=object),
     "image 1: int among records: send each image as a record {\"image\": \"<b64>\"}, or each as a base64 string "
     "unnamed"),
    ([{"image": b64(encode(random_pixels(1)[0]))}, b64(encode(random_pixels(1)[0]))], "image 1: str among records"),
    (np.array([{"image": b64(encode(random_pixels(1)[0]))}, None], dtype=object),
     "image 1: no image (null, or a record without 'image')"),
], ids=["invalid-base64", "non-ascii", "not-an-image", "mixed-batch", "empty-string", "wrong-column", "empty-frame",
        "instances-dropped", "0-d-string", "no-records", "pixel-columns", "records-wrong-key", "record-without-image",
        "null-image", "records-without-columns", "ppm", "eps", "null-first", "null-first-array", "only-null",
        "only-nulls-array", "two-image-columns", "file-name",
        "file-name-in-frame", "url", "url-with-suffix", "long-url", "number-among-strings", "boolean-among-strings",
        "infinity-among-strings", "number-among-records", "string-among-records", "null-among-records"])
def test_to_pixels_refuses_bad_images(given, problem):
    with pytest.raises(MlflowException, match="bad input") as info:
        serve.to_pixels(given)
    assert problem in info.value.message


def test_to_pixels_refuses_huge_canvas_before_decoding(capsys):
    buffer = io.BytesIO()
    Image.new("1", (5000, 4000)).save(buffer, "PNG")  # 1-bit: small to build, 20 Mpx declared
    with pytest.raises(MlflowException, match="too large"):
        serve.to_pixels([buffer.getvalue()])
    # The limit is said where the formats are: "of any size" there, a 24-megapixel camera JPEG got a 400.
    assert serve.SIZE_LIMIT == "up to 16.8 megapixels (4096x4096)" and serve.SIZE_LIMIT in serve.INPUT_FORMATS
    serving = (ROOT / "README.md").read_text().split("## Serving", 1)[1].split("\n## ", 1)[0]
    assert "any size" not in serving and serving.count("16.8 megapixels") == 2
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    assert "16.8 megapixels" in " ".join(capsys.readouterr().out.split())


def decoding_memory_mib(raw: bytes, tmp_path: Path) -> float:
    """MiB a fresh Python's resident memory rises to while `decode_image` decodes `raw` (the kernel's high-water mark,
    reset first: Pillow's buffers are not Python's, which tracemalloc would see; a process of its own, as memory this
    one freed would be reused unseen)."""
    image = tmp_path / "image"
    image.write_bytes(raw)
    script = textwrap.dedent(f"""
        import re
        from pathlib import Path
        from pipeline.data import decode_image

        def status(key):
            return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024

        raw = Path({str(image)!r}).read_bytes()
        Path("/proc/self/clear_refs").write_text("5")
        before = status("VmRSS")
        decode_image(raw)
        print(status("VmHWM") - before)
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


def test_an_image_at_the_pixel_limit_decodes_in_the_memory_of_one_copy(tmp_path):
    # A 4096x4096 image (the limit) took 133 MiB to decode as RGB, two copies of Pillow's 64 MiB (the decoded image
    # converted to the mode it had), and a 16-bit greyscale one 316 MiB (float64 scaling to 8 bits)
    side = serve.MAX_ENCODED_PIXELS ** 0.5
    ramp = np.add.outer(np.arange(side), np.arange(side))
    rgb, grey16 = io.BytesIO(), io.BytesIO()
    Image.fromarray(np.repeat((ramp % 256).astype(np.uint8)[..., None], 3, axis=2)).save(rgb, "PNG")
    Image.fromarray((ramp * 8).astype(np.uint16)).save(grey16, "PNG")
    assert decoding_memory_mib(rgb.getvalue(), tmp_path) < 100
    assert decoding_memory_mib(grey16.getvalue(), tmp_path) < 160
    # the same pixels as before: 16-bit values v scaled to round(v / 257)
    small = io.BytesIO()
    Image.fromarray(np.arange(65536, dtype=np.uint16).reshape(256, 256)).save(small, "PNG")
    expected = np.rint(np.arange(65536).reshape(256, 256) / 257).astype(np.uint8)
    expected = np.asarray(Image.fromarray(expected).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(small.getvalue()), expected)


# --- the logged model -------------------------------------------------------------------------

def test_logged_model_documents_formats_and_enforces_no_casting_signature(model_uri):
    info = mlflow.models.get_model_info(model_uri)
    assert info.signature is None  # a uint8 tensor signature would silently cast floats to 0
    assert "base64" in info.metadata["input_formats"] and "0-255" in info.metadata["input_formats"]
    assert info.saved_input_example_info["serving_input_path"] == "serving_input_example.json"


def test_logged_model_metadata_says_how_it_was_trained_and_what_it_takes(model_uri, local_model):
    """A person serving the model reads its MLmodel metadata (`mlflow.models.get_model_info(uri).metadata`): it named
    the input formats, the classes and the served test-time augmentation only, not whether the weights are an EMA
    average, the arch, the input the network takes or the run that trained it. The fixture's tiny run trains
    without EMA; a run with it records its momentum and BN recalibration."""
    info = mlflow.models.get_model_info(model_uri)
    meta, run_id = info.metadata, info.run_id
    assert (meta["train_run_id"], meta["params"]) == (run_id, f"runs:/{run_id}/config.json")
    assert mlflow.artifacts.load_dict(meta["params"])["train"]["ema"] is False
    assert meta["ema_weights"] is False and "ema_momentum" not in meta
    assert meta["arch"] == local_model.unwrap_python_model().model.name == "preact_resnet11"
    assert (meta["input_shape"], meta["image_size"], meta["input_dtype"], meta["input_range"]) == (
        [None, 32, 32, 3], 32, "uint8", "0-255")
    assert (meta["backend"], meta["tta"]) == (keras.backend.backend(), "flip_shift")
    with_ema = config.load(ROOT / "params" / "tiny.yaml", ["train.ema=true", "train.ema_momentum=0.95",
                                                           "train.ema_bn_batches=3"])
    assert training.trained_with(with_ema, run_id) == {
        "train_run_id": run_id, "params": f"runs:/{run_id}/config.json", "ema_weights": True, "ema_momentum": 0.95,
        "ema_bn_batches": 3}


def imported_packages(code: Path) -> dict[str, set[str]]:
    """Every top-level module that `pipeline.serve` in a logged model's `code/` copy imports, lazily too, through the
    modules of `pipeline` it imports, with the distributions (normalised names) that install it (mlflow: mlflow,
    mlflow-skinny and mlflow-tracing): what serving it needs installed."""
    def source(module: str) -> Path:  # pipeline.x -> code/pipeline/x.py, or its __init__.py
        path = code.joinpath(*module.split("."))
        return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")

    to_read, read, top_names = ["pipeline", "pipeline.serve"], set(), set()
    while to_read:
        module = to_read.pop()
        if module in read or not source(module).exists():  # `from pipeline.config import X`: X is no module
            continue
        read.add(module)
        for node in ast.walk(ast.parse(source(module).read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "pipeline":
                    to_read.append(name)
                elif name.split(".")[0] not in sys.stdlib_module_names:
                    top_names.add(name.split(".")[0])
    distributions = importlib.metadata.packages_distributions()
    return {name: {re.sub(r"[-_.]+", "-", d).lower() for d in distributions[name]} for name in top_names}


def test_logged_requirements_pin_every_package_the_served_code_imports(model_uri):
    """requirements.txt (what `--env-manager virtualenv` or `uv` installs) pins each package the served code imports,
    and cloudpickle, which reads python_model.pkl, to the versions that logged it, and nothing else: NumPy, PyYAML and
    cloudpickle were missing, left to whatever release another package's range admitted on the day."""
    folder = Path(mlflow.artifacts.download_artifacts(model_uri))
    pins = dict(line.split("==") for line in (folder / "requirements.txt").read_text().split())
    pins = {re.sub(r"[-_.]+", "-", name).lower(): pinned for name, pinned in pins.items()}
    assert pins == {name: importlib.metadata.version(name) for name in pins}
    # the backend's package is imported on that backend only (augment: TensorFlow's replica context)
    backend = keras.backend.backend()
    needed = {module: dists for module, dists in imported_packages(folder / "code").items()
              if module not in ("tensorflow", "jax")} | {backend: {backend}}
    assert [module for module, dists in needed.items() if not dists & set(pins)] == []
    assert set(pins) - set().union(*needed.values()) == {"cloudpickle"}
    assert pins["cloudpickle"] == mlflow.models.Model.load(folder).flavors["python_function"]["cloudpickle_version"]


def test_serving_requirements_of_a_jax_model_pin_jaxlib(monkeypatch):
    """jax==X admits older jaxlib releases (0.10.2: jaxlib 0.10.1 too): the one that trained the model is pinned."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    pins = training.serving_requirements()
    assert pins[:2] == [f"jax=={importlib.metadata.version('jax')}", f"jaxlib=={importlib.metadata.version('jaxlib')}"]
    assert not any(pin.startswith("tensorflow") for pin in pins)


def test_served_model_loads_on_the_backend_it_was_trained_on_from_its_own_code(model_uri, local_model, tmp_path):
    """Keras picks TensorFlow where KERAS_BACKEND is unset, which a JAX model's logged environment lacks ("No module
    named 'tensorflow'" in a fresh `--env-manager uv`): the model loads on its own backend instead. So too where
    KERAS_BACKEND is set empty, which Keras reads as unset (the model loaded on TensorFlow there). Run from another
    folder, without the checkout on the path: `pipeline` comes from the model's `code/` copy."""
    assert local_model.unwrap_python_model().backend == keras.backend.backend()
    folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    with (folder / "python_model.pkl").open("wb") as f:  # the same model, as if trained on JAX
        cloudpickle.dump(serve.ImageClassifier("flip_shift", "reflect", "jax"), f)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "KERAS_BACKEND": ""}
    script = ("import mlflow; model = mlflow.pyfunc.load_model('model'); import keras, pipeline; "
              "print(keras.backend.backend(), pipeline.__file__, model.predict(model.input_example)['label'].size)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["jax", str(folder / "code" / "pipeline" / "__init__.py"), "2"]


def test_a_tensorflow_model_loads_where_only_jax_is_installed(model_uri, tmp_path):
    """Keras picks TensorFlow where KERAS_BACKEND is unset: a model trained on TensorFlow, loaded where only JAX is
    installed (a GPU host with jax[cuda12]), died in Keras's import on "No module named 'tensorflow'". It loads on
    JAX, as the saved model does on either. TensorFlow hidden: Python started without its site, on a copy of
    site-packages (links) less TensorFlow's packages."""
    folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    with (folder / "python_model.pkl").open("wb") as f:  # the same model, as trained on TensorFlow whatever runs here
        cloudpickle.dump(serve.ImageClassifier("flip_shift", "reflect", "tensorflow"), f)
    site = tmp_path / "site-packages"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("tensorflow", "tf_keras")):
            (site / entry.name).symlink_to(entry)
    env = {**{k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "PYTHONPATH")}, "PYTHONPATH": str(site)}
    script = ("import importlib.util, mlflow; assert importlib.util.find_spec('tensorflow') is None; "
              "model = mlflow.pyfunc.load_model('model'); import keras; "
              "print(keras.backend.backend(), model.predict(model.input_example)['label'].size)")
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["jax", "2"]


@pytest.mark.parametrize(("backend", "problem"), [
    ("tensorflw", "KERAS_BACKEND: 'tensorflw' is no Keras backend (jax, numpy, openvino, tensorflow, torch)"),
    ("JAX", "KERAS_BACKEND: 'JAX' is no Keras backend (jax, numpy, openvino, tensorflow, torch)"),
    (next(name for name in config.KERAS_BACKENDS if importlib.util.find_spec(name) is None),
     "is not installed here"),
], ids=["misspelt", "capitals", "not-installed"])
def test_a_keras_backend_keras_cannot_load_is_refused_at_load_naming_the_variable(model_uri, monkeypatch, backend,
                                                                                  problem):
    """KERAS_BACKEND=tensorflw (or JAX, or one not installed) loaded the model into Keras's import traceback
    ("ValueError: Unable to import backend : tensorflw"); it is refused in one line naming the variable, the backends
    installed here and what an unset one loads. In process: Keras unloaded for the test, as in a fresh one."""
    monkeypatch.setenv("KERAS_BACKEND", backend)
    monkeypatch.delitem(sys.modules, "keras")  # Keras reads KERAS_BACKEND as it is first imported
    installed = " or ".join(name for name in config.KERAS_BACKENDS if importlib.util.find_spec(name))
    with pytest.raises(MlflowException) as info:
        mlflow.pyfunc.load_model(model_uri)
    message = info.value.message
    assert problem in message and "\n" not in message, message
    assert message.endswith(f"set one installed here (KERAS_BACKEND={installed}), or unset it: the model loads on "
                            f"{keras.backend.backend()}, which trained it"), message
    assert "keras" not in sys.modules  # refused before Keras's import


def test_serving_on_a_misspelt_keras_backend_says_so_in_one_line(model_uri, tracking, tmp_path):
    """`KERAS_BACKEND=tensorflw mlflow models serve` printed Keras's import traceback, and the reason in its last
    line, between uvicorn's frames and MLflow's; the server's output names the variable in its first line now."""
    _, uri = tracking
    done = subprocess.run([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                           "-p", str(free_port()), "-h", "127.0.0.1", "-w", "1"],
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri, "KERAS_BACKEND": "tensorflw"},
                          capture_output=True, text=True, timeout=SERVER_START_SECONDS)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    refused = next(i for i, line in enumerate(lines) if line.startswith("KERAS_BACKEND: 'tensorflw' is no Keras "
                                                                          "backend (jax, numpy, openvino"))
    assert not [line for line in lines[:refused] if line.startswith("Traceback")], done.stderr[-3000:]
    assert "Unable to import backend" not in done.stderr


def test_scoring_a_served_model_runs_no_code_of_pipeline_but_scoring_code(model_uri):
    """Loading the served model and scoring pixels with it (flip_shift views, reflected borders: the most code it
    runs) runs code of `steps.SCORING_CODE`'s modules of pipeline/ only, and of both: the files evaluate compares with
    the model's logged copy before it scores it. All of them are training code too (`TRAIN_CODE`): a model `main`
    trains, or goes on from, has them as the checkout has."""
    files: set[str] = set()

    def profile(frame, event, arg):  # all it does per call: Keras's loading makes ~10^5
        files.add(frame.f_code.co_filename)

    def profiled(call):
        sys.setprofile(profile)
        try:
            return call()
        finally:
            sys.setprofile(None)

    model = profiled(lambda: mlflow.pyfunc.load_model(model_uri))
    pixels = random_pixels(3, seed=8)
    model.predict(pixels)  # Keras traces its predict function here, unprofiled: the same code of pipeline/ runs
    profiled(lambda: model.predict(pixels))
    ran = {Path(f).relative_to(PIPELINE_DIR).with_suffix("").as_posix() for f in files
           if Path(f).is_relative_to(PIPELINE_DIR)}
    assert ran == set(steps.SCORING_CODE), ran
    assert set(steps.SCORING_CODE) <= set(TRAIN_CODE)


def test_a_model_logged_after_an_edit_on_disk_carries_the_code_this_process_loaded(model_uri, local_model, tmp_path,
                                                                                    monkeypatch):
    """A `main` trains, evaluates and logs its model in one process: pipeline/ edited on disk meanwhile (a pull, an
    editor) is not the code it trained and scores with. The model is logged with the code the process loaded, its
    `train_code` stays, and the check of a logged model's scoring code compares with that code too. The files on disk
    are an edited copy here, wherever the pipeline reads pipeline/ from disk (`PIPELINE_DIR`); the checkout's stay as
    they are, the bytes this process imported."""
    loaded = {f"{module}.py": (PIPELINE_DIR / f"{module}.py").read_bytes() for module in TRAIN_CODE}
    train_code = resume.train_code()
    edited = tmp_path / "pipeline"
    shutil.copytree(PIPELINE_DIR, edited, ignore=shutil.ignore_patterns("__pycache__"))
    for name, code in loaded.items():
        (edited / name).write_bytes(code + b"# edited on disk\n")
    for module in (tracking_layer, training, steps):
        monkeypatch.setattr(module, "PIPELINE_DIR", edited, raising=False)

    assert resume.train_code() == train_code
    # the model logged before the edit: its scoring code is this process's, whatever the disk holds now
    assert steps.scoring_code_changes(mlflow.artifacts.download_artifacts(model_uri)) == []
    classifier = local_model.unwrap_python_model()
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serve-tests").experiment_id):
        info = training.log_model(classifier.model, classifier.class_names, random_pixels(2))
    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "logged")))
    code = folder / "code" / "pipeline"
    assert {name: (code / name).read_bytes() for name in loaded} == loaded
    # the package's layout, every module of it, as `mlflow models serve` imports it
    assert ({p.relative_to(code).as_posix() for p in code.rglob("*") if p.is_file()} ==
            {p.relative_to(PIPELINE_DIR).as_posix() for p in PIPELINE_DIR.rglob("*.py")})
    assert steps.scoring_code_changes(folder) == []
    (code / "serve.py").write_bytes(loaded["serve.py"] + b"# edited on disk\n")  # as edited: other code than loaded
    assert steps.scoring_code_changes(folder) == ["pipeline/serve.py"]


def test_a_model_whose_scoring_code_differs_from_the_code_imported_is_refused_at_load(model_uri, tmp_path):
    """A process imports `pipeline` once: the first model it loads (or the checkout, in a notebook that imported it)
    provides it, and a second model loaded there, logged with other scoring code (a challenger trained after an edit
    of augment.py), scored with the first one's code, silently. It is refused at load now, naming the file; one
    logged with the same code loads."""
    folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    assert mlflow.pyfunc.load_model(str(folder)).predict(random_pixels(1))["label"].size == 1
    augment = folder / "code" / "pipeline" / "augment.py"
    augment.write_bytes(augment.read_bytes() + b"# trained after an edit\n")
    with pytest.raises(MlflowException, match=r"pipeline/augment\.py.*differs from the code of `pipeline` this "
                                              r"process imported.*load it in a process of its own"):
        mlflow.pyfunc.load_model(str(folder))


def test_modules_imported_after_an_edit_on_disk_run_the_source_read_at_the_first_import(tmp_path):
    """`main` imports train, evaluate and register once its params are checked, after the package: a module imported
    after an edit on disk runs the source read when the package was first imported, even where a `.pyc` of the edited
    file is cached, as do the digests of the code and the scoring-code check. In a process of its own, on a copy of
    pipeline/ (edited there, the checkout's never)."""
    shutil.copytree(PIPELINE_DIR, tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent("""
        import json, py_compile, sys
        from pathlib import Path

        import mlflow

        import pipeline
        from pipeline.tracking import code_digest, steps

        package = Path(pipeline.__file__).resolve().parent
        assert package == Path.cwd().resolve() / "pipeline", package
        assert "pipeline.inputs" not in sys.modules
        names = ("inputs", "serve", "augment")
        digest = code_digest(*names)
        loaded = {name: (package / f"{name}.py").read_bytes() for name in names}
        for name in names:
            (package / f"{name}.py").write_bytes(loaded[name] + b"\\nEDITED = True\\n")
        # the cached .pyc another process importing the edited file leaves
        py_compile.compile(str(package / "inputs.py"), doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)

        import pipeline.inputs

        model = Path("model")
        (model / "code" / "pipeline").mkdir(parents=True)
        for name in ("serve", "augment"):
            (model / "code" / "pipeline" / f"{name}.py").write_bytes(loaded[name])
        meta = mlflow.models.Model()
        meta.add_flavor("python_function", code="code")
        meta.save(str(model / "MLmodel"))
        print(json.dumps({"edited_runs": hasattr(pipeline.inputs, "EDITED"),
                          "digest_moved": code_digest(*names) != digest,
                          "scoring_code_changes": steps.scoring_code_changes(model)}))
        """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"edited_runs": False, "digest_moved": False,
                                                        "scoring_code_changes": []}
    assert b"EDITED = True" in (tmp_path / "pipeline" / "inputs.py").read_bytes()  # the edit was made


def test_in_process_predict_returns_labels_and_probabilities(local_model):
    frame = local_model.predict(random_pixels(4))
    assert list(frame.columns) == ["label", "probability", "probabilities"]
    assert len(frame) == 4 and all(len(p) == 10 for p in frame["probabilities"])
    assert all(math.isclose(sum(p), 1, abs_tol=1e-4) for p in frame["probabilities"])


def serving_with_time_limit(monkeypatch, model, seconds: int) -> None:
    """This process set up as `mlflow models serve` sets up its server (MLflow's own `init`), with a request time limit
    of `seconds` (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT); both restored at teardown."""
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", str(seconds))
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")  # init sets it: undone at teardown
    scoring_server.init(model)


@pytest.mark.parametrize("encoded", [False, True], ids=["pixels", "encoded"])
def test_a_served_prediction_stops_once_the_servers_time_limit_has_run_out(local_model, monkeypatch, caplog, encoded):
    # The server answers HTTP 504 when its time limit runs out, but the thread running predict went on to the end: a
    # request of 3,000 images, refused at 8 s, kept a core busy and the server's memory growing for 30 s more, and
    # each retry added one more such thread
    serving_with_time_limit(monkeypatch, local_model, 1)
    classifier, calls = local_model.unwrap_python_model(), []
    slowed = serve.decode_one if encoded else classifier._predict_batch

    def slow(*args):
        calls.append(len(args[0]))
        time.sleep(0.25)
        return slowed(*args)

    monkeypatch.setattr(serve, "PREDICT_CHUNK", 2)
    if encoded:
        monkeypatch.setattr(serve, "decode_one", slow)
    else:
        monkeypatch.setattr(classifier, "_predict_batch", slow)
    pixels = random_pixels(20, seed=13)
    given = [encode(image) for image in pixels] if encoded else pixels
    stopped = (rf"stopped with \d+ of 20 images {'decoded' if encoded else 'scored'}: past the server's time limit of "
               r"1 s \(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT\)")
    with pytest.raises(MlflowException, match=stopped):
        local_model.predict(given)
    assert 0 < len(calls) < 10
    assert "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT" in caplog.text  # said in the server's log: its client got a 504
    # In process (no server), a prediction takes as long as it takes
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "false")
    monkeypatch.setattr(serve, "PREDICT_CHUNK", 10)
    calls.clear()
    assert len(local_model.predict(given[:8])) == 8 and len(calls) == (8 if encoded else 1)


def test_concurrent_predictions_on_jax_answer_each_request(model_uri, tmp_path):
    """`mlflow models serve` runs each request's predict in a thread of its own: on JAX, Keras's predict function
    donates the model's weight buffers, and of 16 requests at once 11 got HTTP 400 "unexpected error" (JAX's "Buffer
    has been deleted or donated"). In a JAX process of its own, as the server runs: every answer, equal to one
    request at a time."""
    folder = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model"))
    script = textwrap.dedent(f"""
        import json, threading
        import numpy as np, mlflow

        model = mlflow.pyfunc.load_model({folder!r})
        import keras

        rng = np.random.default_rng(0)
        batches = [rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8) for _ in range(8)]  # one shape to compile
        alone = [np.stack(model.predict(b)["probabilities"]) for b in batches]
        errors, worst = [], 0.0
        for _ in range(3):
            start, answers = threading.Barrier(len(batches)), [None] * len(batches)

            def ask(i):
                start.wait()
                try:
                    answers[i] = np.stack(model.predict(batches[i])["probabilities"])
                except Exception as exc:
                    errors.append(f"{{type(exc).__name__}}: {{str(exc)[:200]}}")

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(batches))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            worst = max([worst] + [float(np.abs(a - b).max()) for a, b in zip(alone, answers) if b is not None])
        print(json.dumps({{"backend": keras.backend.backend(), "errors": errors, "worst": worst}}))
        """)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["backend"] == "jax" and result["errors"] == [] and result["worst"] < 1e-5, result


# --- over HTTP --------------------------------------------------------------------------------

def test_served_flip_shift_fills_the_border_as_the_model_trained(server, model_uri, local_model):
    """train records the model's train.shift_fill beside its tta, and the server (a fresh process) shifts the test
    views with mirrored borders, as the training shifts made them; they repeated the edge pixels whatever the fill."""
    info = mlflow.models.get_model_info(model_uri)
    assert (info.metadata["tta"], info.metadata["shift_fill"]) == ("flip_shift", "reflect")
    keras_model, pixels = local_model.unwrap_python_model().model, random_pixels(3, seed=6)

    def average(mode):  # numpy's own padding, then the window moved (1, 1) and (-1, -1)
        views = [pixels, pixels[:, :, ::-1]]
        for step in (1, -1):
            for v in (pixels, pixels[:, :, ::-1]):
                views.append(np.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)[:, 1 - step:33 - step,
                                                                                     1 - step:33 - step])
        return np.mean([keras_model.predict(v, verbose=0) for v in views], axis=0)

    status, answer = post(server, {"inputs": pixels.tolist()})
    assert status == 200
    np.testing.assert_allclose([row["probabilities"] for row in answer["predictions"]], average("reflect"), atol=1e-5)
    assert not np.allclose(average("reflect"), average("edge"), atol=1e-5)


def test_serving_input_example_is_answered(server, model_uri):
    folder = Path(mlflow.artifacts.download_artifacts(model_uri))
    status, answer = post(server, (folder / "serving_input_example.json").read_bytes())
    assert status == 200 and len(answer["predictions"]) == 2


def test_served_pixel_tensors_match_in_process(server, local_model):
    pixels = random_pixels(5, seed=2)
    status, answer = post(server, {"inputs": pixels.tolist()})
    assert status == 200
    assert_same_predictions(answer["predictions"], local_model.predict(pixels))


@pytest.mark.parametrize("layout", ["inputs", "dataframe_split", "dataframe_records", "inputs_records"])
def test_served_png_and_jpeg_match_in_process(server, local_model, layout):
    images = [encode(random_pixels(1, seed=3)[0], "PNG"), encode(random_pixels(1, seed=4, shape=(48, 64))[0], "PNG"),
              encode(random_pixels(1, seed=5, shape=(48, 64))[0], "JPEG")]
    encoded = [b64(raw) for raw in images]
    body = {"inputs": {"inputs": encoded},
            "dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
            "dataframe_records": {"dataframe_records": [{"image": e} for e in encoded]},
            "inputs_records": {"inputs": [{"image": e} for e in encoded]}}[layout]
    status, answer = post(server, body)
    assert status == 200
    assert_same_predictions(answer["predictions"], local_model.predict(encoded))
    # The same as sending the pixels decode_image makes of them: one preprocessing path.
    decoded = np.stack([decode_image(raw) for raw in images])
    assert_same_predictions(answer["predictions"], local_model.predict(decoded))


def kinds_of_images() -> dict[str, bytes]:
    """One file of each kind a user sends, 10 (one per class of the tiny model): formats, modes and sizes decode_image
    converts (a transparent background, greyscale, a palette, 16 bits, CMYK, an animation, an EXIF rotation)."""
    rng = np.random.default_rng(11)
    rgb = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(32, 32), (48, 64), (40, 24)]]
    rgba = rgb[1].convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8)))
    palette = rgb[0].convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {"rgb.jpg": saved(rgb[0], "JPEG", quality=75), "wide.png": saved(rgb[1], "PNG"),
            "rgba.png": saved(rgba, "PNG"), "grey.png": saved(rgb[2].convert("L"), "PNG"),
            "palette-transparent.png": saved(palette, "PNG", transparency=3),
            "16-bit.png": saved(Image.fromarray(np.asarray(rgb[1].convert("L"), np.uint16) * 257), "PNG"),
            "cmyk.jpg": saved(rgb[1].convert("CMYK"), "JPEG"),
            "animated.gif": saved(rgb[0], "GIF", save_all=True, append_images=[rgb[0].transpose(0)]),
            "lossy.webp": saved(rgb[2], "WEBP"), "rotated.jpg": saved(rgb[2], "JPEG", exif=exif)}


@pytest.fixture(scope="module")
def folder_dataset(tracking, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    """An image folder of the tiny model's classes, prepared as the pipeline prepares one: its dataset URI, and its
    test files' bytes by name (one file, of its own kind, per class)."""
    folder = tmp_path_factory.mktemp("folder-dataset")
    files = kinds_of_images()
    for i, (name, raw) in enumerate(files.items()):
        for split in ("train", "test"):
            (folder / split / f"class_{i}").mkdir(parents=True)
        (folder / "test" / f"class_{i}" / name).write_bytes(raw)
        (folder / "train" / f"class_{i}" / "a.png").write_bytes(encode(random_pixels(1, seed=i)[0]))
    cfg = config.load(ROOT / "params" / "tiny.yaml", [f"data.source={folder}"])
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serve-tests").experiment_id):
        return prepare.run(cfg), files


def scored_by_evaluate(monkeypatch, model_uri: str, dataset_uri: str, tta: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """evaluate.run of `model_uri` on `dataset_uri`, `evaluate.tta` set to `tta`: the test pixels it scored, their
    class probabilities (as its metrics were computed from them) and its run's params."""
    scored = {}

    def score(probs, dataset):
        scored.update(pixels=dataset.x_test, probs=probs)
        return original(probs, dataset)

    original = evaluate.score
    monkeypatch.setattr(evaluate, "score", score)
    cfg = config.load(ROOT / "params" / "tiny.yaml", [f"evaluate.tta={tta}"])
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serve-tests").experiment_id) as run:
        metrics = evaluate.run(cfg, model_uri, dataset_uri)
    np.testing.assert_allclose(evaluate.score(scored["probs"], prepare.load_dataset(dataset_uri))[0]["test_loss"],
                               metrics["test_loss"])
    return scored["pixels"], scored["probs"], mlflow.get_run(run.info.run_id).data.params


@pytest.mark.parametrize("tta", ["none", "flip", "flip_shift"])
def test_the_served_model_scores_the_images_evaluate_scored_with_its_probabilities(
        request, monkeypatch, model_uri, local_model, folder_dataset, tta):
    """What evaluate measured is what is served: the same images, sent as the README documents (base64 PNG, JPEG and
    the rest in each layout, raw bytes and data: URIs in process, integer and float pixel tensors), get the class
    probabilities evaluate computed its metrics from, under the test-time augmentation it recorded on its run. The
    module's model (flip_shift) through a real server; others, logged from its Keras model, through the scoring
    server's own request handling in process."""
    from mlflow.pyfunc.scoring_server import invocations

    dataset_uri, files = folder_dataset
    if tta == "flip_shift":
        served_uri, server = model_uri, request.getfixturevalue("server")

        def ask(body: dict) -> list[dict]:
            status, answer = post(server, body)
            assert status == 200, answer
            return answer["predictions"]
    else:
        with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("serve-tests").experiment_id):
            served_uri = training.log_model(local_model.unwrap_python_model().model, list(data.SYNTHETIC_CLASSES),
                                            random_pixels(2), tta=tta).model_uri
        model = mlflow.pyfunc.load_model(served_uri)

        def ask(body: dict) -> list[dict]:
            answer = invocations(json.dumps(body), "application/json", model, None)
            assert answer.status == 200, answer.response
            return json.loads(answer.response)["predictions"]

    # evaluate told to use another augmentation scores as served, and records that one
    told = "none" if tta != "none" else "flip"
    pixels, probs, params = scored_by_evaluate(monkeypatch, served_uri, dataset_uri, told)
    assert params["evaluate.tta"] == tta == mlflow.models.get_model_info(served_uri).metadata["tta"]
    # each file's test image, found by its pixels: prepare decoded it as the server does
    rows = [np.flatnonzero((pixels == decode_image(raw)).all(axis=(1, 2, 3))) for raw in files.values()]
    assert [len(found) for found in rows] == [1] * len(files), list(files)
    expected = probs[np.concatenate(rows)]
    assert len({tuple(p.round(3)) for p in expected}) == len(files)  # the images tell apart: a wrong one shows

    encoded = [b64(raw) for raw in files.values()]
    ordered = pixels[np.concatenate(rows)]
    answers = {
        "base64": ask({"inputs": encoded}),
        "dataframe_split": ask({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}),
        "dataframe_records": ask({"dataframe_records": [{"image": e} for e in encoded]}),
        "data URIs": ask({"inputs": [f"data:image/png;base64,{e}" for e in encoded]}),
        "integer pixels": ask({"inputs": ordered.tolist()}),
        "float pixels": ask({"inputs": ordered.astype(float).tolist()})}
    python_model = mlflow.pyfunc.load_model(served_uri)
    answers |= {f"in process, {name}": python_model.predict(given).to_dict("records") for name, given in [
        ("raw bytes", list(files.values())), ("base64", encoded), ("uint8 pixels", ordered),
        ("float32 pixels", ordered.astype(np.float32))]}
    for form, rows_served in answers.items():
        labels = [data.SYNTHETIC_CLASSES[i] for i in expected.argmax(axis=1)]
        assert [row["label"] for row in rows_served] == labels, form
        np.testing.assert_allclose([row["probabilities"] for row in rows_served], expected, atol=1e-5, err_msg=form)


NAN_BODY = json.dumps({"inputs": np.where(random_pixels(1) > 100, np.nan, 1.0).tolist()}).encode()


@pytest.mark.parametrize(("body", "problem"), [
    ({"inputs": (random_pixels(2) / 255).tolist()}, "fractional values"),
    ({"inputs": np.ones((1, 32, 32, 3)).tolist()}, "floats of only 0.0 and 1.0"),
    ({"inputs": (random_pixels(1).astype(int) + 200).tolist()}, "must lie in 0-255"),
    ({"inputs": (random_pixels(1).astype(int) - 300).tolist()}, "must lie in 0-255"),
    ({"inputs": random_pixels(1, shape=(32, 16)).tolist()}, "shape (n, 32, 32, 3)"),
    ({"inputs": np.zeros((1, 32, 32, 4), dtype=int).tolist()}, "3 channels"),
    ({"inputs": []}, "empty batch"),
    ({"dataframe_split": {"columns": ["image"], "data": []}}, "empty batch"),
    (NAN_BODY, "NaN"),
    ({"inputs": ["%%% not base64 %%%"]}, "not valid base64"),
    ({"inputs": [b64(b"GIF89a? no, just text")]}, UNDECODABLE),
    ({"dataframe_records": [{"picture": b64(b"x")}]}, "a column 'image'"),
    ({"inputs": [[[[1, 2, 3]]], [[[1, 2]]]]}, "inhomogeneous"),
    (b'{"inputs": [[[', "valid JSON"),
    ({"inputs": "abc"}, f"image 0: {UNDECODABLE}"),  # "abc=" unpadded: base64 of no image
    ({"inputs": [None, b64(encode(random_pixels(1)[0]))]}, "image 0: no image"),
    ({"inputs": with_bad_images(300).tolist()}, "image 2: pixels must lie in 0-255, got values in [0, 300]"),
    ({"inputs": ["https://example.com/cat.jpg"]}, "image 0: 'https://example.com/cat.jpg' is a URL"),
], ids=["floats01", "white01", "over255", "negative", "shape", "4channels", "empty", "empty-frame", "nan",
        "invalid-base64", "not-an-image", "wrong-column", "ragged", "broken-json", "bare-string", "null-first",
        "one-bad-pixel-image", "url"])
def test_bad_requests_get_400_with_the_reason_and_the_server_keeps_serving(server, body, problem):
    status, answer = post(server, body)
    assert status == 400, answer
    assert problem in answer["message"]
    assert ping(server) == 200


@pytest.mark.parametrize(("body", "problem"), [
    ({"inputs": (random_pixels(2) / 255).tolist()},
     "images 0, 1 of 2: pixels must be integers 0-255; got fractional values in [0, 1] (scaled to [0, 1]?)"),
    ({"inputs": [b64(encode(random_pixels(1, shape=(64, 64))[0])), "not base64!"]},
     "image 1: not a base64 image: not valid base64 (Only base64 data is allowed)"),
    ({"dataframe_records": [{"image": b64(b"no image")}]}, f"image 0: {UNDECODABLE} (not one of those formats)"),
    ({"inputs": [b64(encode(random_pixels(1)[0])), 5]},
     "image 1: '5' is a number or true/false, not a base64 image (a list mixing base64 strings with other values is "
     "read as strings): send each image as a base64 string"),
    ({"inputs": [{"image": b64(encode(random_pixels(1)[0]))}, 5]},
     'image 1: int among records: send each image as a record {"image": "<b64>"}, or each as a base64 string unnamed'),
], ids=["pixels", "long-strings", "frame", "number-among-strings", "number-among-records"])
def test_a_refused_request_is_answered_with_its_reason_alone_in_one_line(local_model, body, problem):
    # MLflow's handler put the whole request before the reason: "Failed to predict data '[[[[0.85 0.64 ...' \nError:
    # bad input: ...", over dozens of lines, and a list of base64 strings whole (megabytes for a batch of photos)
    from mlflow.pyfunc.scoring_server import invocations

    with pytest.raises(MlflowException) as info:
        invocations(json.dumps(body), "application/json", local_model, None)
    assert info.value.get_http_status_code() == 400
    assert json.loads(info.value.serialize_as_json())["message"] == f"bad input: {problem}"


def test_the_scoring_servers_other_bodies_are_answered_as_the_readme_says(local_model):
    """What README's Serving section says of the bodies besides JSON's four layouts, through MLflow's own request
    handler: CSV and Parquet with an `image` column are answered as JSON is; a `params` field is ignored; another
    Content-Type is a 415, none a 500; a body that is not JSON a 400 quoting it whole; base64 strings and pixel
    arrays in one batch are a 400 (MLflow's, before the model)."""
    from mlflow.pyfunc.scoring_server import invocations

    encoded = [b64(encode(random_pixels(1, seed=seed)[0])) for seed in range(2)]

    def answer(body: str | bytes, content_type: str = "application/json") -> tuple[int, str]:
        try:
            got = invocations(body, content_type, local_model, None)
        except MlflowException as exc:
            return exc.get_http_status_code(), exc.message
        return got.status, got.response

    status, expected = answer(json.dumps({"inputs": encoded}))
    assert status == 200
    parquet = io.BytesIO()
    pd.DataFrame({"id": [3, 4], "image": encoded}).to_parquet(parquet)
    assert answer("id,image\n3,{}\n4,{}\n".format(*encoded), "text/csv") == (200, expected)
    assert answer(parquet.getvalue(), "application/vnd.apache.parquet") == (200, expected)
    assert answer(json.dumps({"inputs": encoded, "params": {"tta": "none"}})) == (200, expected)
    status, message = answer(json.dumps({"inputs": encoded}), "text/plain")
    assert status == 415 and "Got 'text/plain'" in message
    with pytest.raises(AttributeError):  # no Content-Type: `None.split`, which MLflow's server answers HTTP 500
        answer(json.dumps({"inputs": encoded}), None)
    cut_short = json.dumps({"inputs": encoded})[:-3]  # not JSON: MLflow's 400 quotes the whole body
    status, message = answer(cut_short)
    assert status == 400 and "valid JSON" in message and cut_short in message
    status, message = answer(json.dumps({"inputs": [encoded[0], random_pixels(1)[0].tolist()]}))
    assert status == 400 and "inhomogeneous shape" in message


def test_deeply_nested_json_is_answered_as_the_readme_says(local_model):
    """What README's Serving section says of JSON nested deep (`[[[[...]]]]`), through MLflow's own request handler in
    this process, whose recursion limit is the server's (`pipeline` raises it to 20,000): up to 64 levels the model's
    400 naming the shape; deeper, MLflow's 400 (numpy's 64 dimensions, or a RecursionError's text); from about 20,000,
    json.loads's RecursionError, before any answer, which MLflow's server answers HTTP 500."""
    from mlflow.pyfunc.scoring_server import invocations

    def nested(depth: int) -> str:
        return '{"inputs": ' + "[" * depth + "0" + "]" * depth + "}"

    def refusal(depth: int) -> tuple[int, str]:
        with pytest.raises(MlflowException) as info:
            invocations(nested(depth), "application/json", local_model, None)
        return info.value.get_http_status_code(), info.value.message

    assert sys.getrecursionlimit() == 20_000
    status, message = refusal(64)
    assert status == 400 and message.startswith("bad input: pixels must have shape (n, 32, 32, 3), got (1, 1, 1")
    assert refusal(65) == (400, "Invalid input. setting an array element with a sequence. The requested array would "
                                "exceed the maximum number of dimension of 64.")
    status, message = refusal(19_900)
    assert status == 400 and "RecursionError" in message
    with pytest.raises(RecursionError):  # raised where MLflow's handler catches nothing: its server's HTTP 500
        invocations(nested(20_000), "application/json", local_model, None)


def test_server_answers_good_requests_after_bad_ones(server, local_model):
    post(server, {"inputs": (random_pixels(1) / 255).tolist()})
    status, answer = post(server, {"inputs": random_pixels(1).tolist()})
    assert status == 200
    assert_same_predictions(answer["predictions"], local_model.predict(random_pixels(1)))


# --- the client -------------------------------------------------------------------------------

def test_predict_client_runs_as_a_script_with_the_standard_library_alone():
    # the README sends users outside the project's folder to `python <project>/pipeline/predict.py`, any Python 3.10+
    tree = ast.parse((ROOT / "pipeline" / "predict.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= sys.stdlib_module_names | {"__future__"}, imported - sys.stdlib_module_names


def test_predict_client_prints_one_line_per_image_and_fails_clearly(server, local_model, tmp_path, capsys):
    files = [tmp_path / "a.png", tmp_path / "b.jpg"]
    files[0].write_bytes(encode(random_pixels(1, seed=6)[0], "PNG"))
    files[1].write_bytes(encode(random_pixels(1, seed=7, shape=(48, 64))[0], "JPEG"))
    assert predict.main([str(f) for f in files] + ["--url", server, "--batch-size", "1"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    expected = local_model.predict([b64(f.read_bytes()) for f in files])
    assert [line[0] for line in lines] == [str(f) for f in files]
    assert [line[1] for line in lines] == expected["label"].tolist()
    np.testing.assert_allclose([float(line[2]) for line in lines], expected["probability"], atol=1e-3)

    (tmp_path / "cut.png").write_bytes(files[0].read_bytes()[:60])  # a PNG's start: the server finds it truncated
    assert predict.main([str(tmp_path / "cut.png"), "--url", server]) == 2  # bad input, as a missing file
    err = capsys.readouterr().err
    assert "HTTP 400" in err and UNDECODABLE in err and "Failed to predict" not in err

    assert predict.main([str(files[0]), "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "5"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "missing.png"), "--url", server]) == 2
    assert "no such file" in capsys.readouterr().err


def test_predict_client_names_the_refused_file_of_a_later_batch(server, tmp_path, capsys):
    files = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "cut.png"]
    for seed, path in enumerate(files[:2]):
        path.write_bytes(encode(random_pixels(1, seed=seed)[0], "PNG"))
    files[2].write_bytes(files[0].read_bytes()[:60])
    assert predict.main([str(f) for f in files] + ["--url", server, "--batch-size", "2"]) == 2
    out, err = capsys.readouterr()
    assert f"{files[2]}: {UNDECODABLE}" in err and "image 0" not in err and len(err.splitlines()) == 1
    assert out == ""  # no predictions printed when a request fails, as the module docstring says


@pytest.mark.parametrize(("make", "problem"), [
    (lambda d: d / "missing.png", "no such file"),
    (lambda d: d / "*.jpeg", "no such file (a shell pattern that matched no file?)"),
    (lambda d: (d / "folder").mkdir() or d / "folder", "a folder holding no image file (of the suffixes .png .jpg "
                                                       ".jpeg .bmp .gif .webp .tif .tiff)"),
    (lambda d: (d / "empty.png").touch() or d / "empty.png", "an empty file, not an image"),
    (lambda d: d / ("x" * 300 + ".png"), "cannot read (File name too long)"),
    # a link whose target was moved said "no such file", of a name `ls` lists
    (lambda d: (d / "link.png").symlink_to("moved.png") or d / "link.png", "a link to moved.png, which is missing"),
], ids=["missing", "glob-matching-nothing", "directory", "empty", "name-too-long", "dangling-link"])
def test_predict_client_refuses_a_bad_file_before_sending_any(tmp_path, capsys, make, problem):
    # a missing file, a folder or an unreadable file was found only as its batch was read: exit 1, after the batches
    # before it had been sent and scored for nothing (their predictions never printed)
    good = tmp_path / "a.png"
    good.write_bytes(encode(random_pixels(1)[0], "PNG"))
    bad = make(tmp_path)
    sent = []
    with answering(200, json.dumps({"predictions": [{"label": "cat", "probability": 0.5}]}).encode(),
                   requests=sent) as url:
        assert predict.main([str(good), str(bad), "--url", url, "--batch-size", "1"]) == 2
    out, err = capsys.readouterr()
    assert sent == [] and out == ""
    assert err == f"error: {bad}: {problem}\n"


@pytest.mark.parametrize(("url", "problem"), [
    ("localhost", "expected http://host:port, got 'localhost'"),
    ("localhost:5000", "expected http://host:port"),
    ("ftp://127.0.0.1", "expected http://host:port"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://127.0.0.1:abc", "not a valid URL"),
    ("http://exa mple.com", "not a valid URL"),
    # a typo's empty label, which urllib's IDNA encoding refuses as it connects: "unexpected answer from", exit 1
    ("http://model..example.com:5001", "not a valid URL: 'http://model..example.com:5001' (an empty label or one of "
                                       "over 63 characters in its host)"),
    # urllib decodes the host's %XX: refused as it connected, exit 1 after the files were read
    ("http://exa%20mple.com", "not a valid URL: 'http://exa%20mple.com' (a space or control character in its host)"),
    # a model URI is what `mlflow models serve -m` takes: the line said only "expected http://host:port"
    ("models:/cifar10-resnet@champion", "expected http://host:port, got 'models:/cifar10-resnet@champion' (a model "
                                        "URI: serve it first, `mlflow models serve -m models:/cifar10-resnet@champion "
                                        "--env-manager local -p 5001`, then give --url http://127.0.0.1:5001)"),
    ("runs:/0123abcd/model", "got 'runs:/0123abcd/model' (a model URI: serve it first, `mlflow models serve -m "
                             "runs:/0123abcd/model "),
], ids=["no-scheme", "host-port", "ftp", "ipv6", "port", "space", "empty-label", "encoded-space", "models-uri",
        "runs-uri"])
def test_predict_client_refuses_a_bad_url_in_one_line(tmp_path, capsys, url, problem):
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    assert predict.main([str(image), "--url", url, "--timeout", "5"]) == 2  # a usage error, as a bad --timeout
    err = capsys.readouterr().err
    assert err.startswith("error: --url: ") and problem in err and len(err.splitlines()) == 1
    assert predict.main([str(tmp_path / "missing.png"), "--url", url]) == 2  # checked before any file is read
    assert capsys.readouterr().err == err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_predict_client_refuses_a_bad_timeout_before_connecting(tmp_path, capsys, timeout):
    # inf overflowed the socket's timeout (a traceback), nan and -1 read as "unexpected answer from" the server
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with pytest.raises(SystemExit) as info:
        predict.main([str(image), "--url", f"http://127.0.0.1:{free_port()}", "--timeout", timeout])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--timeout must be a number of seconds > 0, got {timeout}" in err
    # the usage named "predict.py", under pytest "pytest": no command a user can run
    assert err.startswith("usage: python -m pipeline.predict [-h]") and "\npython -m pipeline.predict: error: " in err


def test_predict_client_reports_a_server_slower_than_the_timeout_as_such(tmp_path, capsys):
    # a server that took longer than --timeout to answer (a large batch on a CPU, a model still loading) was reported
    # as "cannot reach http://... (timed out)": the server is up, and the cure is a longer --timeout, not a restart
    import socket

    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with socket.create_server(("127.0.0.1", 0)) as listener:  # connections complete in its backlog, never answered
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        assert predict.main([str(image), "--url", url, "--timeout", "0.5"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "cannot reach" not in err
    assert f"no answer from {url} within --timeout 0.5 s" in err


@pytest.mark.parametrize("body", [b"Request processing time exceeded limit",  # `mlflow models serve`'s own
                                  b"<html><head><title>504 Gateway Time-out</title></head></html>"],  # a proxy's
                         ids=["model-server", "proxy"])
def test_predict_client_says_what_to_do_when_the_server_runs_out_of_time(tmp_path, capsys, body):
    # `mlflow models serve` answers 504 to a request it took longer than its own limit on (60 s): the client said
    # "server refused the request (HTTP 504): Request processing time exceeded limit", which names no cure; raising
    # --timeout, the advice of the client's own timeout, cannot help there
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for path in files:
        path.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with answering(504, body) as url:
        assert predict.main([str(f) for f in files] + ["--url", url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "refused" not in err and "<" not in err
    assert f"{url} ran out of time on a request of 3 images (HTTP 504: " in err
    assert "lower --batch-size, or raise the server's limit (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT" in err


def read_request(conn, *, whole: bool = True) -> None:
    """Read an HTTP request from socket `conn`: its head, and its body too where `whole`."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(65536)
    head, _, body = request.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
    while whole and len(body) < length:
        body += conn.recv(65536)


def respond(handler, status: int, body: bytes) -> None:
    """Answer an `http_stub` request with `status` and `body`."""
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextlib.contextmanager
def answering(status: int, body: bytes, authorizations: list | None = None,
              requests: list | None = None) -> Iterator[str]:
    """A loopback HTTP server answering every POST with `status` and `body`; its base URL. Each request's
    Authorization header (None without one) is appended to `authorizations`, its (path, body) to `requests`."""
    def answer(handler) -> None:
        request = handler.rfile.read(int(handler.headers["Content-Length"]))
        if requests is not None:
            requests.append((handler.path, request))
        if authorizations is not None:
            authorizations.append(handler.headers["Authorization"])
        respond(handler, status, body)

    with http_stub(answer) as url:
        yield url


def test_predict_client_sends_the_urls_credentials_and_hides_the_password(tmp_path, capsys):
    # http://user:password@host (a model server behind a proxy asking for a password) was read by urllib as the host
    # name "user:password@host": "cannot reach ... (Name or service not known)", the password printed
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    seen = []
    with answering(200, json.dumps({"predictions": [{"label": "cat", "probability": 0.5}]}).encode(),
                   seen) as url:
        assert predict.main([str(image), "--url", url.replace("//", "//ann:s%40cret@")]) == 0
    assert seen == ["Basic " + b64(b"ann:s@cret")]
    assert capsys.readouterr().out == f"{image}\tcat\t0.5000\n"
    unreachable = f"http://ann:s3cret@127.0.0.1:{free_port()}"
    assert predict.main([str(image), "--url", unreachable]) == 1
    err = capsys.readouterr().err
    assert "s3cret" not in err and f"cannot reach http://ann:***@127.0.0.1:{unreachable.rsplit(':', 1)[1]} (" in err


@pytest.mark.parametrize("password", ["s3cr/et", "s3cr?et", "s3cr#et", "12/s3cret", "12?s3cret", "5000#s3cret"],
                         ids=["slash", "question-mark", "hash", "digits-slash", "digits-question-mark", "digits-hash"])
def test_predict_client_hides_a_password_holding_a_url_delimiter(tmp_path, capsys, password):
    # a '/', '?' or '#' not written %2F, %3F, %23 ends the host part where urllib reads it: the password's start was
    # read as the port and shown, "(Port could not be cast to integer value as 's3cr')", and with a '/' the whole URL.
    # One that starts with digits is a port to urllib: the request went to host "ann", the password in its path
    # ("cannot reach http://ann:12/s3cret@127.0.0.1:5000 (Name or service not known)")
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    assert predict.main([str(image), "--url", f"http://ann:{password}@127.0.0.1:5000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --url: not a valid URL: 'http://ann:***@127.0.0.1:5000' (") and "%2F" in err
    assert "s3cr" not in err and "et@" not in err and len(err.splitlines()) == 1


def test_predict_client_sends_images_the_server_holds_at_their_own_size(local_model, tmp_path):
    # sent as {"inputs": [...]}, MLflow's server read the batch into one numpy array of fixed-width strings, each as
    # long as the longest: a 3.5 MB photo among 63 thumbnails took 1.2 GB of the server's memory
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    files = [tmp_path / f"{i}.png" for i in range(16)]
    files[0].write_bytes(encode(random_pixels(1, seed=1, shape=(128, 128))[0]))
    for seed, path in enumerate(files[1:], start=2):
        path.write_bytes(encode(random_pixels(1, seed=seed, shape=(8, 8))[0]))
    sent = []
    answer = {"predictions": [{"label": "cat", "probability": 0.5}] * len(files)}
    with answering(200, json.dumps(answer).encode(), requests=sent) as url:
        assert predict.main([str(f) for f in files] + ["--url", url]) == 0
    parsed = infer_and_parse_data(json.loads(sent[0][1]))
    held = parsed.nbytes if isinstance(parsed, np.ndarray) else parsed.memory_usage(deep=True).sum()
    assert held < 2 * len(sent[0][1])
    expected = local_model.predict([b64(f.read_bytes()) for f in files])  # and the served model reads it as sent
    assert_same_predictions(local_model.predict(parsed).to_dict("records"), expected)


def named_png(name: str, size: int = 0) -> bytes:
    """A PNG's signature and `name`, zero-padded to `size` bytes: `naming_server` labels it `name`."""
    return PNG_SIGNATURE + name.encode().ljust(size - len(PNG_SIGNATURE), b"\0")


@contextlib.contextmanager
def naming_server(sent: list) -> Iterator[str]:
    """A loopback stand-in for the model server that labels each image of `named_png` with its name; the number of
    images of each request is appended to `sent`. Its base URL."""
    def answer(handler) -> None:
        rows = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))["dataframe_split"]["data"]
        sent.append(len(rows))
        labels = [base64.b64decode(row[0])[len(PNG_SIGNATURE):].split(b"\0")[0].decode() for row in rows]
        respond(handler, 200, json.dumps({"predictions": [{"label": label, "probability": 0.5}
                                                          for label in labels]}).encode())

    with http_stub(answer) as url:
        yield url


def test_predict_client_sends_every_image_of_a_folder_sorted_and_says_what_it_left_out(tmp_path, capsys):
    # `python -m pipeline.predict photos/` was refused as "a directory, not an image file"
    folder = tmp_path / "photos"
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / ".thumbnails").mkdir()
    for name in ("b.png", "a.JPG", "c.webp", "sub/d.png", "sub/deep/e.tif", ".thumbnails/t.png", "._a.JPG"):
        (folder / name).write_bytes(named_png(name))
    for name in ("notes.txt", ".DS_Store", "sub/labels.csv"):
        (folder / name).write_text("not an image")
    (folder / "sub" / "loop").symlink_to("..")  # read once
    sent = []
    with naming_server(sent) as url:
        assert predict.main([str(folder), str(folder / "b.png"), "--url", url]) == 0
        out, err = capsys.readouterr()
        assert [line.split("\t")[:2] for line in out.splitlines()] == [
            [str(folder / name), name] for name in ("a.JPG", "b.png", "c.webp", "b.png")]
        assert err == (f"note: {folder}: 3 image files taken; left out: 1 file (notes.txt) of no image suffix (.png "
                       f".jpg .jpeg .bmp .gif .webp .tif .tiff), 3 hidden files (.DS_Store, ._a.JPG, .thumbnails/), "
                       f"1 subfolder (sub/): --recursive reads those\n")

        assert predict.main([str(folder), "--url", url, "--recursive"]) == 0
        out, err = capsys.readouterr()
        assert [line.split("\t")[1] for line in out.splitlines()] == [
            "a.JPG", "b.png", "c.webp", "sub/d.png", "sub/deep/e.tif"]
        assert "2 files (notes.txt, sub/labels.csv) of no image suffix" in err and "subfolder" not in err

        (folder / "sub" / "deep" / "cut.jpg").write_bytes(b"%PDF-1.4 no image")  # checked as a file named is
        assert predict.main([str(folder), "--url", url, "-r"]) == 2
        assert capsys.readouterr().err.endswith(f"error: {folder}/sub/deep/cut.jpg: not a PNG, JPEG, BMP, GIF, WebP or "
                                                f"TIFF image (its first bytes: b'%PDF-1.4')\n")
    assert sent == [4, 5]


def test_predict_client_refuses_a_folder_of_no_image_before_sending_any(tmp_path, capsys):
    folder = tmp_path / "scans"
    (folder / "2024").mkdir(parents=True)
    (folder / "2024" / "a.png").write_bytes(named_png("a"))
    (folder / "index.html").write_text("<html>")
    sent = []
    with naming_server(sent) as url:
        assert predict.main([str(tmp_path / "ok.png"), str(folder), "--url", url]) == 2
        assert capsys.readouterr().err == (f"error: {folder}: a folder holding no image file (of the suffixes .png "
                                           f".jpg .jpeg .bmp .gif .webp .tif .tiff); it holds 1 file (index.html) of "
                                           f"no image suffix (.png .jpg .jpeg .bmp .gif .webp .tif .tiff), 1 subfolder "
                                           f"(2024/): --recursive reads those\n")
    assert sent == []
    assert predict.IMAGE_SUFFIXES == data.IMAGE_SUFFIXES  # the suffixes an image folder's dataset is read by


def stdin_of(monkeypatch, raw: bytes, tty: bool = False) -> None:
    stream = io.TextIOWrapper(io.BytesIO(raw))
    monkeypatch.setattr(stream, "isatty", lambda: tty, raising=False)
    monkeypatch.setattr(sys, "stdin", stream)


def test_predict_client_reads_one_image_from_standard_input_for_a_dash(tmp_path, capsys, monkeypatch):
    # `curl -s <url> | python -m pipeline.predict -` said "-: no such file"
    (tmp_path / "a.png").write_bytes(named_png("a.png"))
    sent = []
    with naming_server(sent) as url:
        stdin_of(monkeypatch, named_png("piped"))
        assert predict.main([str(tmp_path / "a.png"), "-", "--url", url]) == 0
        assert capsys.readouterr().out == f"{tmp_path}/a.png\ta.png\t0.5000\n-\tpiped\t0.5000\n"
        for raw, tty, args, problem in [
                (b"", False, ["-"], "-: standard input is empty, not an image"),
                (b"%PDF-1.4", False, ["-"], "-: not a PNG, JPEG, BMP, GIF, WebP or TIFF image (its first bytes: "
                                            "b'%PDF-1.4')"),
                (named_png("x"), True, ["-"], "-: standard input is a terminal: pipe an image into it"),
                (named_png("x"), False, ["-", "-"], "- given twice: standard input holds one image"),
                (named_png("x"), False, ["-", str(tmp_path / "missing.png")], "missing.png: no such file")]:
            stdin_of(monkeypatch, raw, tty)
            assert predict.main([*args, "--url", url]) == 2
            out, err = capsys.readouterr()
            assert out == "" and err.startswith("error: ") and problem in err and len(err.splitlines()) == 1, err
    assert sent == [2]
    # a video piped in by mistake is refused from its first bytes, not read whole first
    video = io.BytesIO(b"\x00\x00\x00\x20ftypisom" + bytes(8 << 20))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(video)))
    assert predict.main(["-", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "its first bytes: b'\\x00\\x00\\x00 ftyp'" in capsys.readouterr().err and video.tell() < 1 << 20


def test_predict_client_sends_large_files_in_smaller_requests_and_prints_in_the_files_order(tmp_path, capsys,
                                                                                            monkeypatch):
    # 64 phone photos (3 MB each) went in one request of 250 MB: 1 GB more of the server's memory, and 28 s of its
    # 60 s time limit on a 2-core CPU (HTTP 504 past it); a request holds MAX_REQUEST_BYTES of files at most
    monkeypatch.setattr(predict, "MAX_REQUEST_BYTES", 2500)
    sizes = [1000, 1000, 1000, 5000, 1000, 100, 100]
    files = [tmp_path / f"img{i}.png" for i in range(len(sizes))]
    for path, size in zip(files, sizes, strict=True):
        path.write_bytes(named_png(path.stem, size))
    sent = []
    with naming_server(sent) as url:
        assert predict.main([str(f) for f in files] + ["--url", url, "--batch-size", "3"]) == 0
    assert sent == [2, 1, 1, 3]  # 2000 bytes; 1000 (3000 over the limit); 5000 alone; 1000 + 100 + 100, 3 images
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert lines == [[str(f), f.stem, "0.5000"] for f in files]


def test_predict_client_tells_a_file_gone_after_the_check_in_one_line(tmp_path, capsys, monkeypatch):
    # a file removed between the check of every file and its batch (another process cleaning the folder) ended in a
    # FileNotFoundError traceback from the batching
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    check = predict.check_files
    monkeypatch.setattr(predict, "check_files", lambda paths: (check(paths), image.unlink()))
    assert predict.main([str(image), "--url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert capsys.readouterr().err == f"error: {image}: cannot read (No such file or directory)\n"


def test_predict_client_prints_a_file_name_not_in_the_locales_encoding_escaped(tmp_path, capsys):
    # a name of Latin-1 bytes on a UTF-8 system (from an old archive) ended, once every image was answered, in a
    # UnicodeEncodeError traceback from print, and no predictions: stderr escapes such names, stdout did not
    image = tmp_path / os.fsdecode(b"caf\xe9.png")
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with answering(200, json.dumps({"predictions": [{"label": "cat", "probability": 0.5}]}).encode()) as url:
        assert predict.main([str(image), "--url", url]) == 0
    assert capsys.readouterr().out == f"{tmp_path}/caf\\xe9.png\tcat\t0.5000\n"


def test_predict_client_prints_one_line_of_three_fields_per_image_whatever_the_file_names(tmp_path, capsys):
    # a tab or a newline in a file name (legal on Linux) went out as it was: two lines for one image, or four fields
    files = [tmp_path / "tab\tname.png", tmp_path / "new\nline.png"]
    for path in files:
        path.write_bytes(encode(random_pixels(1)[0], "PNG"))
    answer = {"predictions": [{"label": "cat", "probability": 0.5}] * 2}
    with answering(200, json.dumps(answer).encode()) as url:
        assert predict.main([str(f) for f in files] + ["--url", url]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert lines == [[f"{tmp_path}/tab\\tname.png", "cat", "0.5000"], [f"{tmp_path}/new\\nline.png", "cat", "0.5000"]]


def test_predict_client_refuses_an_empty_file_name(tmp_path, capsys, monkeypatch):
    # `python -m pipeline.predict "$IMAGE"` with IMAGE unset was read as the folder `.`: ".: a directory, not an image"
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    assert predict.main([str(image), "", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err == "error: file name 2 of 2 is empty (an unset shell variable?)\n"


def test_predict_client_refuses_a_file_of_no_image_format_before_sending_any(tmp_path, capsys):
    # `python -m pipeline.predict photos/*` over a folder holding a PDF or a .DS_Store was refused by the server only
    # as that file's batch came, after the batches before it were scored for nothing
    good = tmp_path / "a.png"
    good.write_bytes(encode(random_pixels(1)[0], "PNG"))
    notes = tmp_path / "notes.pdf"
    notes.write_bytes(b"%PDF-1.4\n%...")
    sent = []
    with answering(200, b"{}", requests=sent) as url:
        assert predict.main([str(good), str(notes), "--url", url, "--batch-size", "1"]) == 2
    out, err = capsys.readouterr()
    assert sent == [] and out == ""
    assert err == f"error: {notes}: not a PNG, JPEG, BMP, GIF, WebP or TIFF image (its first bytes: b'%PDF-1.4')\n"


def test_predict_client_names_a_heic_photo_under_a_jpeg_name_as_such(tmp_path, capsys):
    # a phone's photos exported as IMG_0001.jpg may be HEIC: "its first bytes: b'\\x00\\x00\\x00\\x18ftyp'" said nothing
    photo = tmp_path / "IMG_0001.jpg"
    photo.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100))
    assert predict.main([str(photo), "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err == (f"error: {photo}: not a PNG, JPEG, BMP, GIF, WebP or TIFF image (a HEIF or AVIF "
                                       f"image, brand 'heic': convert it to JPEG or PNG)\n")


def test_predict_client_takes_every_format_and_mode_the_server_decodes(tmp_path):
    # the client's check of a file's first bytes must pass all that Pillow writes in the served formats
    pixels = random_pixels(1, shape=(8, 8))[0]
    images = {f"{mode}.{fmt.lower()}": (Image.fromarray(pixels).convert(mode), fmt)
              for fmt in ("PNG", "JPEG", "BMP", "GIF", "WebP", "TIFF") for mode in ("RGB", "L")}
    images |= {"rgba.png": (Image.fromarray(pixels).convert("RGBA"), "PNG"),
               "16-bit.png": (Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), "PNG"),
               "cmyk.tiff": (Image.fromarray(pixels).convert("CMYK"), "TIFF"),
               "big-endian.tiff": (Image.fromarray(pixels[..., 0].astype(">u2")), "TIFF"),
               "bigtiff.tiff": (Image.fromarray(pixels), "TIFF", {"big_tiff": True})}
    files = []
    for name, (image, fmt, *options) in images.items():
        image.save(tmp_path / name, fmt, **(options[0] if options else {}))
        decode_image((tmp_path / name).read_bytes())  # the server decodes it
        files.append(tmp_path / name)
    predict.check_files(files)


def test_predict_client_reads_an_images_size_from_its_header_as_the_server_does():
    # the client reads sizes by hand (it imports no Pillow): each format's, as Pillow opens it, without decoding
    pixels = random_pixels(1, shape=(23, 37))[0]
    image, frames = Image.fromarray(pixels), [Image.fromarray(pixels), Image.fromarray(255 - pixels)]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the pixels are the same many
    files = {"png": saved(image, "PNG"), "jpeg": saved(image, "JPEG"), "progressive": saved(image, "JPEG",
                                                                                           progressive=True),
             "jpeg-exif": saved(image, "JPEG", exif=exif), "cmyk-jpeg": saved(image.convert("CMYK"), "JPEG"),
             "bmp": saved(image, "BMP"), "bmp-1bit": saved(image.convert("1"), "BMP"),
             "gif": saved(image, "GIF"), "animated-gif": saved(frames[0], "GIF", save_all=True,
                                                               append_images=frames[1:]),
             "webp": saved(image, "WEBP"), "webp-lossless": saved(image, "WEBP", lossless=True),
             "webp-alpha": saved(image.convert("RGBA"), "WEBP"),
             "animated-webp": saved(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
             "tiff": saved(image, "TIFF"), "tiff-big-endian": saved(Image.fromarray(pixels[..., 0].astype(">u2")),
                                                                     "TIFF"),
             "bigtiff": saved(image, "TIFF", big_tiff=True),
             "tiff-pages": saved(frames[0], "TIFF", save_all=True, append_images=frames[1:])}
    # a GIF whose first frame reaches past its logical screen: Pillow widens its size to the frame's
    wide = bytearray(files["gif"])
    wide[6:8] = (10).to_bytes(2, "little")
    files["gif-frame-past-screen"] = bytes(wide)
    for name, raw in files.items():
        with Image.open(io.BytesIO(raw)) as opened:
            assert predict.declared_size(io.BytesIO(raw)) == opened.size, name
    for name, raw in files.items():  # a header cut short: the server is left to refuse it
        assert predict.declared_size(io.BytesIO(raw[:8])) is None, name


@pytest.mark.parametrize(("fmt", "mode", "options"), [
    ("PNG", "1", {}), ("JPEG", "L", {}), ("GIF", "1", {}), ("BMP", "1", {}), ("TIFF", "1", {"compression": "group4"}),
    ("WEBP", "L", {"lossless": True})])
def test_predict_client_refuses_an_image_over_the_servers_pixel_limit_before_sending_any(tmp_path, capsys, fmt,
                                                                                         mode, options):
    # an image over 16.8 megapixels (a 24-megapixel camera photo) was refused by the server only as its batch came,
    # after the batches before it were scored for nothing
    assert predict.MAX_PIXELS == serve.MAX_ENCODED_PIXELS
    good, large = tmp_path / "a.png", tmp_path / f"large.{fmt.lower()}"
    good.write_bytes(encode(random_pixels(1)[0], "PNG"))
    Image.new(mode, (4097, 4096)).save(large, fmt, **options)
    sent = []
    with answering(200, b"{}", requests=sent) as url:
        assert predict.main([str(good), str(large), "--url", url, "--batch-size", "1"]) == 2
    out, err = capsys.readouterr()
    assert sent == [] and out == ""
    assert err == (f"error: {large}: 4097x4096 pixels, over the 16.8 megapixels (4096x4096) the server decodes: save "
                   f"it smaller\n")
    Image.new(mode, (4096, 4096)).save(large, fmt, **options)  # at the limit: sent
    predict.check_files([large])


@pytest.mark.parametrize(("status", "message", "code"), [
    (400, "bad input: image 1: not a decodable PNG, JPEG, BMP, GIF, WebP or TIFF image", 2),
    (400, "Invalid input. Data is not compatible with model signature.", 1),  # not the files: this client's request
], ids=["an-image-refused", "the-request-refused"])
def test_predict_client_exits_2_when_the_server_refuses_a_file(tmp_path, capsys, status, message, code):
    # a file the server refused (not an image, truncated, too large) is bad input as a missing one is: it exited 1, as
    # for a server down or failing
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in files:
        path.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with answering(status, json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()) as url:
        assert predict.main([str(f) for f in files] + ["--url", url]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"error: server refused the request (HTTP {status}): ") and len(err.splitlines()) == 1
    assert (f"{files[1]}: not a decodable" in err) == (code == 2)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_predict_client_names_where_a_redirect_points(tmp_path, capsys, status):
    # a gateway moving http:// to https:// (or a path): urllib turned a 301 or 302 into a GET without the images,
    # "server refused the request (HTTP 405): Method Not Allowed", and a 307 or 308 into "(HTTP 308): (no message)"
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    seen = []

    def moved(handler) -> None:
        seen.append(handler.command)
        handler.send_response(status)
        handler.send_header("Location", "https://models.example.com/cifar/invocations")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    with http_stub(moved) as url:
        assert predict.main([str(image), "--url", url]) == 1
    assert seen == ["POST"]  # not followed
    assert capsys.readouterr().err == (f"error: {url} redirects to https://models.example.com/cifar/invocations "
                                       f"(HTTP {status}); give --url the address it moved to\n")


def test_predict_client_says_what_to_do_when_no_server_listens(tmp_path, capsys, monkeypatch):
    # "cannot reach http://127.0.0.1:5001 ([Errno 111] Connection refused)" named no cure: a server not started yet,
    # or one on another port (`mlflow models serve` defaults to 5000, the README serves on 5001)
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    port = free_port()
    assert predict.main([str(image), "--url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach http://127.0.0.1:{port} (") and len(err.splitlines()) == 1
    assert err.endswith(f"): no server listens there; start one (`mlflow models serve -m <model uri> --env-manager "
                        f"local -p {port}`) or give --url the port one serves on\n")


def test_predict_client_names_the_proxy_it_went_through(tmp_path, capsys, monkeypatch):
    # with http_proxy set (a corporate shell) and no no_proxy, urllib sends even 127.0.0.1 through the proxy: a proxy
    # down said "cannot reach http://127.0.0.1:5001 (Connection refused)" of a server that was up
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = f"http://127.0.0.1:{free_port()}"
    proxy = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("http_proxy", proxy)
    assert predict.main([str(image), "--url", server, "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach {server} (") and len(err.splitlines()) == 1
    assert err.endswith(f") through the proxy {proxy} (http_proxy; add 127.0.0.1 to no_proxy to go direct)\n")
    with answering(502, b"<html><title>502 Bad Gateway</title></html>") as proxy:
        monkeypatch.setenv("http_proxy", proxy)
        assert predict.main([str(image), "--url", server]) == 1
    assert capsys.readouterr().err == (f"error: server failed on the request (HTTP 502): 502 Bad Gateway through the "
                                       f"proxy {proxy} (http_proxy; add 127.0.0.1 to no_proxy to go direct)\n")


@pytest.mark.parametrize(("status", "body", "problem"), [
    (500, json.dumps({"error_code": "INTERNAL_ERROR", "message": "boom\nat line two\n  and three"}).encode(),
     "server failed on the request (HTTP 500): boom at line two and three"),
    (503, b"", "server failed on the request (HTTP 503): (no message)"),
], ids=["multi-line-message", "no-body"])
def test_predict_client_tells_a_server_failure_in_one_line(tmp_path, capsys, status, body, problem):
    # a server's message over several lines (a model's error, a traceback) went out as it was, over several lines; and
    # a server failing (5xx) was said to have "refused the request", as if the images were at fault
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with answering(status, body) as url:
        assert predict.main([str(image), "--url", url]) == 1
    assert capsys.readouterr().err == f"error: {problem}\n"


def test_predict_client_says_what_to_do_when_a_proxy_finds_the_request_too_large(tmp_path, capsys):
    # nginx in front of the server refuses a body over 1 MB by default (client_max_body_size): the line said only
    # "server refused the request (HTTP 413): 413 Request Entity Too Large ...", nothing of --batch-size
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for path in files:
        path.write_bytes(encode(random_pixels(1)[0], "PNG"))
    page = b"<html><head><title>413 Request Entity Too Large</title></head><body>nginx</body></html>"
    with answering(413, page) as url:
        assert predict.main([str(f) for f in files] + ["--url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {url} refused a request of 3 images, ") and len(err.splitlines()) == 1
    assert err.endswith(" as too large (HTTP 413: 413 Request Entity Too Large nginx): lower --batch-size\n")
    with answering(413, page) as url:
        assert predict.main([str(files[0]), "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {url} refused a request of 1 image, ")  # one image, not "1 images"
    assert err.endswith(f"): {files[0]} alone is over its limit (nginx: client_max_body_size)\n")


def test_predict_client_names_a_file_on_stderr_escaped_as_on_stdout(tmp_path, capsys):
    # the names in an error line went out as they were: a newline in one split the line in two, and a name of Latin-1
    # bytes on a UTF-8 system showed as \udce9 (or, on a stderr that does not escape, raised UnicodeEncodeError)
    files = [tmp_path / "new\nline.png", tmp_path / os.fsdecode(b"caf\xe9.png")]
    for path in files:
        path.write_bytes(encode(random_pixels(1)[0], "PNG"))
    refusal = json.dumps({"error_code": "BAD_REQUEST", "message": "image 0: not decodable; image 1: too large"})
    with answering(400, refusal.encode()) as url:
        assert predict.main([str(f) for f in files] + ["--url", url]) == 2
    assert capsys.readouterr().err == (f"error: server refused the request (HTTP 400): {tmp_path}/new\\nline.png: "
                                       f"not decodable; {tmp_path}/caf\\xe9.png: too large\n")
    folder = tmp_path / "tab\tand\nnewline.png"
    folder.mkdir()
    assert predict.main([str(folder), "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}/tab\\tand\\nnewline.png: a folder holding no image file "
                                       f"(of the suffixes .png .jpg .jpeg .bmp .gif .webp .tif .tiff)\n")


@pytest.mark.parametrize(("given", "path"), [
    ("", "/invocations"), ("/", "/invocations"), ("/model/", "/model/invocations"),
    ("/?key=k1", "/invocations?key=k1"), ("/model?key=k1#top", "/model/invocations?key=k1"),
], ids=["bare", "slash", "path", "query", "path-query-fragment"])
def test_predict_client_posts_to_invocations_under_the_urls_path_keeping_its_query(tmp_path, given, path):
    # http://host/?key=k1 (a gateway's key) was posted to `/?key=k1/invocations`: "HTTP 404 ... no model server"
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    sent = []
    with answering(200, json.dumps({"predictions": [{"label": "cat", "probability": 0.5}]}).encode(),
                   requests=sent) as url:
        assert predict.main([str(image), "--url", url + given]) == 0
    assert sent[0][0] == path


def test_predict_client_tells_an_https_url_of_a_plain_http_server_so(tmp_path, capsys):
    # `mlflow models serve` speaks plain HTTP: https://host:port said "cannot reach ... ([SSL: WRONG_VERSION_NUMBER]
    # wrong version number (_ssl.c:1006))", as if the server were down
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with answering(200, json.dumps({"predictions": [{"label": "cat", "probability": 0.5}]}).encode()) as url:
        secure = url.replace("http://", "https://")
        assert predict.main([str(image), "--url", secure, "--timeout", "10"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {secure} answers no TLS (") and len(err.splitlines()) == 1
    assert err.endswith(f"): `mlflow models serve` speaks plain HTTP, --url {url}\n")


def test_predict_client_stopped_by_ctrl_c_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    # Ctrl-C during a long list of images ended in urllib's traceback, exit 1
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for path in files:
        path.write_bytes(encode(random_pixels(1)[0], "PNG"))
    calls = []

    def answer_then_stop(url, images, timeout, names):
        calls.append(names)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [{"label": "cat", "probability": 0.5}]

    monkeypatch.setattr(predict, "request_predictions", answer_then_stop)
    assert predict.main([str(f) for f in files] + ["--batch-size", "1"]) == 130  # 128 + SIGINT, as a shell reports
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: stopped (Ctrl-C) at {files[1]}, after 1 of 3 images; none printed\n"

    def stop(paths):  # the check of every file, long on a slow network folder
        raise KeyboardInterrupt

    monkeypatch.setattr(predict, "check_files", stop)
    assert predict.main([str(f) for f in files]) == 130
    assert capsys.readouterr() == ("", "error: stopped (Ctrl-C) before any request\n")


@pytest.mark.parametrize("stdout", ["closed-pipe", "full-disk"])
def test_predict_client_tells_predictions_it_could_not_write_in_one_line(tmp_path, stdout):
    # `python -m pipeline.predict *.png | head -1` and a full disk ended in a traceback once every image was scored
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    if stdout == "closed-pipe":  # the reader gone before the client writes, as `head` once it has its lines
        reader, writer = os.pipe()
        os.close(reader)
    else:
        writer = os.open("/dev/full", os.O_WRONLY)
    with answering(200, json.dumps({"predictions": [{"label": "cat", "probability": 0.5}]}).encode()) as url:
        done = subprocess.run([sys.executable, "-m", "pipeline.predict", str(image), "--url", url], cwd=ROOT,
                              stdout=writer, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(writer)
    assert done.returncode == 1
    assert done.stderr == ("" if stdout == "closed-pipe" else
                           "error: cannot write the predictions (No space left on device)\n")


@contextlib.contextmanager
def replying(raw: bytes) -> Iterator[str]:
    """A loopback TCP server that reads each whole request and answers `raw` as it is (no HTTP framing added),
    then closes the connection; its base URL."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):  # the listener closed at the end
            while True:
                conn, _ = listener.accept()
                with conn:
                    read_request(conn)
                    conn.sendall(raw)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


@pytest.mark.parametrize(("raw", "problem"), [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "no HTTP answer from"),
    (b"\x15\x03\x01\x00\x02\x02\x46", "no HTTP answer from"),  # a TLS server's alert
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"predictions\": [",
     "was cut short (17 bytes read, 983 more expected)"),
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 1000\r\n\r\n{\"message\": \"bad",
     "server refused the request (HTTP 400)"),
], ids=["ssh", "tls-alert", "cut-short", "error-cut-short"])
def test_predict_client_reports_an_answer_that_is_not_http_or_cut_short_in_one_line(tmp_path, capsys, raw, problem):
    # http.client's BadStatusLine and IncompleteRead are no OSError: --url at another service's port, or a server that
    # stopped mid-answer, ended in a traceback
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with replying(raw) as url:
        assert predict.main([str(image), "--url", url, "--timeout", "10"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and problem in err, err
    assert err.isprintable() or err[:-1].isprintable()


@pytest.mark.parametrize("read_body", [True, False], ids=["closed-after-the-request", "reset-during-the-upload"])
def test_predict_client_tells_a_connection_closed_without_an_answer_from_an_unreachable_server(tmp_path, capsys,
                                                                                                read_body):
    # a server that took the request and closed without answering (it stopped; or `mlflow models serve`, whose time
    # limit counts the upload, gave up on a batch of photos still arriving over a slow link, and reset the connection)
    # was reported as "cannot reach http://... (Connection reset by peer)", as if the server were down or the URL wrong
    import socket
    import threading

    files = [tmp_path / f"{i}.png" for i in range(2)]
    for seed, path in enumerate(files):
        path.write_bytes(encode(random_pixels(1, seed=seed, shape=(512, 512))[0], "PNG"))  # ~1 MB each
    listener = socket.create_server(("127.0.0.1", 0))

    def close_without_answer() -> None:
        conn, _ = listener.accept()
        with conn:
            read_request(conn, whole=read_body)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")  # closed at once: a reset

    threading.Thread(target=close_without_answer, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        assert predict.main([str(f) for f in files] + ["--url", url, "--timeout", "10"]) == 1
    finally:
        listener.close()
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "cannot reach" not in err, err
    assert f"{url} closed the connection without an answer to a request of 2 images (" in err
    assert "lower --batch-size" in err and "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT" in err


@pytest.mark.parametrize("answer", [[0], [{"label": 3, "probability": 0.9}], {"label": "cat"}],
                         ids=["numbers", "numeric-label", "not-a-list"])
def test_predict_client_reports_another_models_answer_in_one_line(tmp_path, capsys, answer):
    # another model's server (a text classifier takes strings too) answered rows that `row['label']` crashed on
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with answering(200, json.dumps({"predictions": answer}).encode()) as url:
        assert predict.main([str(image), "--url", url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert "unexpected answer from" in err and "is it serving this project's model?" in err


@pytest.mark.parametrize(("body", "shown"), [
    (b"<html><body>Welcome to nginx!</body></html>", "<html><body>Welcome to nginx!</body></html>"),
    (b"[1, 2]", "[1, 2]"),
    (b'{"status": "ok"}', '{"status": "ok"}'),
    (b'{"predictions": [{"label": "cat", "probability": NaN}]}', '[{"label": "cat", "probability": NaN}]'),
    (b'{"predictions": [{"label": "cat", "probability": true}]}', '[{"label": "cat", "probability": true}]'),
    (b'{"predictions": [{"label": "cat", "probability": 7.5}]}', '[{"label": "cat", "probability": 7.5}]'),
], ids=["html", "list", "no-predictions", "nan", "bool", "out-of-range"])
def test_predict_client_reports_an_answer_that_holds_no_predictions_in_one_line(tmp_path, capsys, body, shown):
    # a 200 that was not JSON, or JSON without "predictions", said "unexpected answer from ... (JSONDecodeError(
    # 'Expecting value: line 1 column 1 (char 0)'))" or "(KeyError('predictions'))", naming nothing of the answer; a
    # probability NaN, true or 7.5 was printed as nan, 1.0000, 7.5000
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with answering(200, body) as url:
        assert predict.main([str(image), "--url", url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"error: unexpected answer from {url}: {shown} holds no label and probability per image; ")


@pytest.mark.parametrize(("status", "page", "problem"), [
    (404, b"<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n"
          b"<p>The requested URL was not found on the server.</p>\n",  # what `mlflow server` answers
     "no model server at --url"),
    (502, b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
          b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
     "server failed on the request (HTTP 502): 502 Bad Gateway 502 Bad Gateway nginx"),
], ids=["tracking-server", "proxy-page"])
def test_predict_client_reports_a_server_that_is_not_a_model_server_in_one_line(tmp_path, capsys, status, page,
                                                                                 problem):
    # `mlflow server` (a tracking server, port 5000 by default like --url's) answered an HTML page: the error ran over
    # six lines of HTML and said "server refused the request (HTTP 404)" without saying --url was wrong
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    with answering(status, page) as url:
        assert predict.main([str(image), "--url", url]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and problem in err and "<" not in err


def test_predict_client_names_a_url_ending_in_invocations(server, tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(encode(random_pixels(1)[0], "PNG"))
    assert predict.main([str(image), "--url", f"{server}/invocations"]) == 1
    err = capsys.readouterr().err
    assert f"HTTP 404 for {server}/invocations/invocations: no model server at --url {server}/invocations" in err
