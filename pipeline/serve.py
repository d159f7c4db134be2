"""The served model: a pyfunc around the trained Keras model that speaks in class names.

Input, as JSON bodies for `mlflow models serve` (or the same objects passed to `predict` in process):
- pixel tensors `{"inputs": [[[[r, g, b], ...], ...], ...]}`: integers 0-255, shape (n, 32, 32, 3)
  (a single (32, 32, 3) image is accepted too);
- encoded images (PNG, JPEG, BMP, GIF, WebP or TIFF) of up to 16.8 megapixels, base64 strings:
  `{"inputs": ["<b64>", ...]}`, `{"dataframe_split": {"columns": ["image"], "data": [["<b64>"], ...]}}` or
  `{"dataframe_records": [{"image": "<b64>"}, ...]}` (or the same records under "inputs", or a CSV or Parquet body with
  that column); URL-safe base64, base64 without its `=` padding and `data:<media type>;base64,` URIs are read too.
  They are converted to 32x32 RGB by `pipeline.data.decode_image`, the function training images went through (a
  transparent background composited onto white).
  Large ones go best in a frame: MLflow reads an "inputs" list into one array of strings as long as the longest.
  Raw bytes work in process.
Output: one row per image with the predicted `label`, its `probability` and all class
`probabilities` (in `class_names` order).

The model is logged without an enforcing signature: MLflow would cast a uint8 tensor signature's
input silently (floats in [0, 1] become 0), so all validation happens here. Bad input raises an
MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400 and
the message; any other exception would become a 400 without the reason.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline.config import KERAS_BACKENDS, SHIFT_FILLS, TTA_MODES
from pipeline.data import CHANNELS, IMAGE_FORMATS, IMAGE_SIZE, PIL_FORMATS, DataError, decode_image

KERAS_ARTIFACT = "keras_model"
CLASSES_ARTIFACT = "class_names"
IMAGE_COLUMN = "image"
PIXEL_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)
# A few hundred bytes of PNG can declare a canvas of billions of pixels: refuse those before decoding.
MAX_ENCODED_PIXELS = 4096 * 4096
# Said wherever the formats are (README, metadata, predict's help): a 24-megapixel camera JPEG is refused.
SIZE_LIMIT = f"up to {MAX_ENCODED_PIXELS / 1e6:.1f} megapixels (4096x4096)"
# Browsers hand out `data:image/png;base64,...`; accept the prefix rather than make every client strip it, with
# RFC 2397's parameters (`;name=cat.png`, `;charset=utf-8`) and in any case, as the RFC allows, and with spaces
# between its parts (`data:image/png; base64,`, as hand-written clients have it), which can mean nothing else.
DATA_URI_PREFIX = re.compile(r"^data:\s*[\w/+.-]*\s*(;\s*[\w.+-]+\s*=[^;,]*)*;\s*base64\s*,", re.IGNORECASE)
# `base64 cat.png` (GNU coreutils) and MIME encoders wrap lines at 76 characters: valid base64 all the same.
WHITESPACE = re.compile(r"\s+")
URL_SAFE = str.maketrans("-_", "+/")  # base64url's letters, in the standard alphabet (`unpadded`)
# A file's name sent in place of its bytes (`{"inputs": ["cat.png"]}`): never base64, whose alphabet has no dot.
FILE_NAME = re.compile(r"^\S*\.(png|jpe?g|bmp|gif|webp|tiff?)$", re.IGNORECASE)
# A URL in place of the image (http, s3, file...): never base64 either, which has no colon.
URL = re.compile(r"^[a-z][a-z0-9+.-]*://\S*$", re.IGNORECASE)
# A number or boolean as text: MLflow reads `{"inputs": ["<b64>", 5, true]}` as strings ('5', 'True'), which are not
# base64 of any image (all but 'True' not even valid base64). No image's base64 is a bare number.
NUMBER = re.compile(r"^[-+]?((\d+\.?\d*|\.\d+)(e[-+]?\d+)?|inf(inity)?|nan|true|false)$", re.IGNORECASE)
# `mlflow models serve` runs each request's predict in a thread of its own. On JAX, Keras's predict function donates
# the model's weight buffers to each call: two calls at once, and one ran on buffers the other had given up ("Buffer
# has been deleted or donated", an HTTP 400 "unexpected error"; 11 of 16 requests sent together). TensorFlow's
# functions run side by side safely: there, requests run at once, as before.
JAX_MODEL_CALLS = threading.Lock()
# The modules of pipeline/ whose code a served model runs to score pixels (see `pipeline.tracking.steps`, where evaluate
# compares them with a model's logged copy before it scores it).
SCORING_CODE = ("augment", "serve")
# Images the model runs on at a time: memory stays that of 256 images (times the test-time views) however large the
# request, and a request past the server's time limit stops within one chunk (`request_deadline`).
PREDICT_CHUNK = 256

INPUT_FORMATS = (
    'pixel tensors {"inputs": [[[[r, g, b], ...]]]}: integers 0-255, shape (n, 32, 32, 3); '
    f'encoded {IMAGE_FORMATS} images of {SIZE_LIMIT} as base64 strings: {{"inputs": ["<b64>", ...]}}, '
    f'or a dataframe_split / dataframe_records column named "{IMAGE_COLUMN}"; '
    "they are resized to 32x32 RGB (bilinear) as the training images were."
)
OUTPUT_FORMAT = "one row per image: label (class name), probability (of that class), probabilities (all classes)"


class BadInput(MlflowException):
    """A request the model refuses: HTTP 400 with this message alone. MLflow's scoring server puts the whole request
    before a model's message (`e.message = f"Failed to predict data '{data}'. \\nError: {e.message}"`): dozens of lines
    of a pixel array, or every base64 string of a batch of photos whole, megabytes, before the reason. That rewrite
    keeps the reason only."""

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        reason = getattr(self, "_reason", None)
        prefixed = reason is not None and value.startswith("Failed to predict data '") and value.endswith(
            f"\nError: {reason}")
        if not prefixed:
            self._reason = value


def bad_input(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and `message`."""
    return BadInput(f"bad input: {message}", error_code=INVALID_PARAMETER_VALUE)


def request_deadline() -> float | None:
    """In `mlflow models serve`, the time (`time.monotonic`) at which the server's time limit for the request now
    predicted (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s by default) has run out, counted from now; None elsewhere.
    Past it the server has answered HTTP 504, but cannot stop the thread predicting: without this, a request of
    thousands of images went on to the end for no one (a core busy and the memory growing, 30 s past the 504 for
    3,000 images), and each retry added one more."""
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

    if not _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get():  # set by the scoring server as it starts
        return None
    return time.monotonic() + MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()


def check_deadline(deadline: float | None, done: str) -> None:
    """Stop the request past `deadline`: an MlflowException no client receives, and a line in the server's log saying
    how far it got (`done`)."""
    if deadline is None or time.monotonic() <= deadline:
        return
    from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
    from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED

    message = (f"stopped with {done}: past the server's time limit of "
               f"{MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()} s (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT), for which "
               f"its client was answered HTTP 504; send fewer images a request, or raise the limit")
    logging.getLogger(__name__).warning("pipeline.serve: a request %s", message)
    raise MlflowException(message, error_code=DEADLINE_EXCEEDED)


def to_pixels(model_input: Any, deadline: float | None = None) -> np.ndarray:
    """Any accepted input (see the module docstring) -> validated uint8 pixels (n, 32, 32, 3); encoded images are
    decoded one at a time until `deadline` (see `request_deadline`)."""
    rows = model_input.tolist() if isinstance(model_input, np.ndarray) and model_input.dtype == object and (
        model_input.ndim == 1) else model_input  # MLflow's array of `{"inputs": [{"image": ...}, 5]}`
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):  # else the first item's form names the others
        model_input = pd.DataFrame(records(rows))  # records under "inputs": [{"image": ...}], as dataframe_records
    if isinstance(model_input, (pd.DataFrame, dict)):
        return decode_images(image_column(model_input), deadline)
    encoded = encoded_images(model_input)
    if encoded is not None:
        return decode_images(encoded, deadline)
    return check_pixels(model_input)


def records(rows: list) -> list[dict]:
    """`rows`, a list starting with a record (dict), checked to hold nothing else: bad_input naming the first that is
    not."""
    for i, row in enumerate(rows):
        if row is None:
            to_bytes(row, f"image {i}")  # its refusal of a null
        if not isinstance(row, dict):
            raise bad_input(f"image {i}: {type(row).__name__} among records: send each image as a record "
                            f'{{"{IMAGE_COLUMN}": "<b64>"}}, or each as a base64 string unnamed')
    return rows


def image_column(model_input: pd.DataFrame | dict) -> list:
    """The `image` column of a DataFrame (dataframe_split / _records) or dict (named `inputs`) as a list."""
    names = list(model_input.columns if isinstance(model_input, pd.DataFrame) else model_input)
    if not names and not len(model_input):  # {"dataframe_records": []}; [{}, {}] has rows, without their image
        raise bad_input("empty batch: no images to predict")
    if IMAGE_COLUMN not in names:  # other columns (ids, file names) may ride along and are ignored
        shown = f"{names[:5]}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"  # not 3,072 pixel columns
        raise bad_input(f"named inputs need a column '{IMAGE_COLUMN}' of base64 {IMAGE_FORMATS} images, "
                        f"got {shown}; send pixel tensors unnamed, as {{\"inputs\": [[[[r, g, b], ...]]]}}")
    # `instances` rows become columns: a row whose image key is misspelled would drop out unseen, and the answer
    # would have fewer rows than the request (a DataFrame keeps every row).
    if isinstance(model_input, dict) and len(names) > 1:
        raise bad_input(f"named inputs take only '{IMAGE_COLUMN}', got {names}; send other columns "
                        f"(ids, file names) in a dataframe_records or dataframe_split")
    values = model_input[IMAGE_COLUMN]
    if isinstance(values, pd.DataFrame):  # {"dataframe_split": {"columns": ["image", "image"], ...}}
        raise bad_input(f"{values.shape[1]} columns named '{IMAGE_COLUMN}': send the images in one")
    if isinstance(values, np.ndarray):  # 0-d: {"inputs": {"image": "<base64>"}}, one image
        return array_items(values)
    if isinstance(values, pd.Series):
        return values.tolist()
    return list(values) if isinstance(values, (list, tuple)) else [values]


def encoded_images(model_input: Any) -> list | None:
    """The encoded images of an unnamed batch (base64 strings or bytes), or None if it holds pixel values."""
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, (pd.Series, tuple)):  # in process: a frame's image column passed on its own
        model_input = list(model_input)
    if isinstance(model_input, np.ndarray):
        # Only a 0-d (a bare `"inputs": "..."`) or 1-d array of text or objects can hold encoded images;
        # don't copy pixel tensors to lists.
        if model_input.ndim > 1 or model_input.dtype.kind not in "USO":
            return None
        if model_input.ndim == 0:
            return array_items(model_input)
        model_input = array_items(model_input)
    # A list holding text is a batch of encoded images (a pixel tensor's items are rows); to_bytes reports any item
    # that is not, a null first one too. So is one of nulls only ({"inputs": [null]}): no pixel tensor is.
    if isinstance(model_input, list) and (any(isinstance(item, (str, bytes)) for item in model_input)
                                          or model_input and all(item is None for item in model_input)):
        return model_input
    return None


def array_items(values: np.ndarray) -> list:
    """An array's items as a list (a 0-d array: its one item). Fixed-width bytes (numpy's "S", what `np.array` makes
    of raw image bytes) whole: numpy drops their trailing zero bytes, with which many BMP, TIFF and WebP files end
    (refused as truncated then); the zero padding up to the array's width is ignored by every decoder, as any bytes
    after the image are."""
    if values.ndim > 1:  # rows, refused item by item as lists
        return values.tolist()
    if values.dtype.kind == "S":
        return [row.tobytes() for row in values.reshape(-1, 1)]
    return values.reshape(-1).tolist()


def pad_for_jax(pixels: np.ndarray) -> np.ndarray:
    """On JAX, `pixels` padded with black images to the next power of two: JAX compiles the model once per batch size,
    and a server answering requests of 1, 2, 3, ... images compiled for each new size, in that request's time (on a
    2-core AMD EPYC, 2026-12-05: 1.2-1.4 s for the seed's ResNet-164 against 0.03 s to run it on 3 images, 0.2 s for
    quick's ResNet-9); padded, at most log2 of the chunk size + 1 sizes. Each image's probabilities are its own (the
    model normalises with its moving statistics: no image sees another). TensorFlow retraces for new sizes less
    often (Keras's reduce_retracing): unpadded there."""
    import keras

    n = len(pixels)
    if keras.backend.backend() != "jax" or n == 0 or not n & (n - 1):
        return pixels
    return np.concatenate([pixels, np.zeros((2 ** n.bit_length() - n, *pixels.shape[1:]), pixels.dtype)])


def decode_images(items: list, deadline: float | None = None) -> np.ndarray:
    """Base64 strings or raw bytes of encoded images -> uint8 pixels (n, 32, 32, 3), stopped past `deadline`."""
    if not items:
        raise bad_input("empty batch: send at least one image")
    decoded = []
    for i, item in enumerate(items):
        check_deadline(deadline, f"{i} of {len(items)} images decoded")
        decoded.append(decode_one(to_bytes(item, f"image {i}"), f"image {i}"))
    return np.stack(decoded)


def to_bytes(item: Any, name: str) -> bytes:
    """A base64 string (optionally a `data:` URI) or raw bytes -> the encoded image bytes."""
    if isinstance(item, np.ndarray) and item.ndim == 0:  # MLflow makes each value of an "inputs" record a 0-d array
        item = array_items(item)[0]
    if item is None or (isinstance(item, float) and np.isnan(item)):  # a record without the column is NaN in a frame
        raise bad_input(f"{name}: no image (null, or a record without '{IMAGE_COLUMN}')")
    if isinstance(item, bytes):
        raw = item
    elif isinstance(item, str):
        if URL.match(item.strip()):
            raise bad_input(f"{name}: {shortened(item.strip())!r} is a URL, not a base64 image: the model fetches "
                            f"nothing; send the image's bytes base64-encoded")
        if FILE_NAME.match(item.strip()):
            raise bad_input(f"{name}: {item.strip()!r} is a file name, not a base64 image: the model reads no files; "
                            f"send the file's bytes base64-encoded (python -m pipeline.predict FILE does)")
        text = item.strip()
        if NUMBER.match(text):
            raise bad_input(f"{name}: {shortened(text)!r} is a number or true/false, not a base64 image (a list mixing "
                            f"base64 strings with other values is read as strings): send each image as a base64 string")
        if text[:5].lower() == "data:":
            if not (prefix := DATA_URI_PREFIX.match(text)):  # percent-encoded data, or a header cut short
                header = text[:text.index(",") + 1] if "," in text else text
                raise bad_input(f"{name}: {shortened(header, 40)!r} is no data: URI of base64 data: give "
                                f"data:<media type>;base64,<the image's base64>")
            text = text[prefix.end():]
        try:
            raw = base64.b64decode(unpadded(WHITESPACE.sub("", text)), validate=True)
        except ValueError as exc:  # binascii.Error, and text beyond ASCII (a pasted "…"): was a 400 without a reason
            raise bad_input(f"{name}: not a base64 image: not valid base64 ({exc})") from None
    elif isinstance(item, (list, np.ndarray)):
        raise bad_input(f"{name}: pixel values under '{IMAGE_COLUMN}', which takes base64-encoded images; send pixel "
                        'tensors unnamed, as {"inputs": [[[[r, g, b], ...]]]}')
    else:
        raise bad_input(f"{name}: expected a base64-encoded {IMAGE_FORMATS} image string, got {type(item).__name__}")
    if not raw:
        raise bad_input(f"{name}: empty image")
    return raw


def shortened(text: str, limit: int = 100) -> str:
    """`text` as an error message quotes it: its first `limit` characters, '...' marking the cut."""
    return text if len(text) <= limit else text[:limit] + "..."


def unpadded(text: str) -> str:
    """Base64 `text` in the standard alphabet with its `=` padding: URL-safe base64 (RFC 4648's base64url: - and _ for
    + and /, as JavaScript's and Python's urlsafe encoders write it) is read as the same bytes, and padding left off (as
    base64url often is) completed. Neither is ambiguous: - and _ mean nothing else, and the padding only says what the
    length does. Text mixing the two alphabets is left as it is, and refused."""
    if not set(text) & set("+/"):
        text = text.translate(URL_SAFE)
    return text + "=" * (-len(text) % 4) if "=" not in text else text


def decode_one(raw: bytes, name: str) -> np.ndarray:
    """Encoded image bytes -> uint8 (32, 32, 3) through `decode_image`, refusing oversized canvases first."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw), formats=PIL_FORMATS) as img:  # reads the header only
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise bad_input(f"{name}: image too large ({exc})") from None
    except Exception:  # noqa: BLE001 - undecodable bytes are reported by decode_image below, in one wording
        width = height = 0
    if width * height > MAX_ENCODED_PIXELS:
        raise bad_input(f"{name}: image too large ({width}x{height}, at most {MAX_ENCODED_PIXELS} pixels)")
    try:
        return decode_image(raw, name)
    except DataError as exc:
        raise bad_input(str(exc)) from None


def check_pixels(model_input: Any) -> np.ndarray:
    """Pixel values (array or nested lists) -> uint8 (n, 32, 32, 3), refusing anything that is not
    integers 0-255 in that shape: floats scaled to [0, 1] would otherwise be silently misread."""
    try:
        x = np.asarray(model_input)
    except ValueError as exc:  # ragged nested lists
        raise bad_input(f"pixels must form an (n, 32, 32, 3) array ({exc})") from None
    if x.size == 0:
        raise bad_input("empty batch: send at least one image")
    if x.shape[-3:] != PIXEL_SHAPE and (x.dtype.kind in "US" or x.dtype == object and any(
            isinstance(item, (str, bytes)) for item in x.flat)):  # {"inputs": [["<b64>"]]}: read as pixel values
        raise bad_input(f"base64 images nested in lists (shape {x.shape}): send each image a string of its own: "
                        '{"inputs": ["<b64>", ...]}')
    given = x.shape
    if x.shape == PIXEL_SHAPE or x.ndim == 3 and x.shape[:2] == PIXEL_SHAPE[:2] and x.shape[2] in (1, 2, 4):
        x = x[None]  # one image: (32, 32, 4) is RGBA, not 32 images of 32x4 pixels
    if x.ndim == 4 and x.shape[1:3] == PIXEL_SHAPE[:2] and x.shape[3] != CHANNELS:
        raise bad_input(f"pixels must have {CHANNELS} channels (RGB), got {x.shape[3]} (shape {given})")
    if x.ndim != 4 or x.shape[1:] != PIXEL_SHAPE:
        # 32x32 already, in another layout: PyTorch's channels first, or greyscale. Other sizes: the decoder resizes.
        if x.ndim in (3, 4) and x.shape[-3:] == (CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
            hint = ": channels first? move them last, (n, 3, 32, 32) -> (n, 32, 32, 3)"
        elif x.ndim in (2, 3) and x.shape[-2:] == PIXEL_SHAPE[:2]:
            hint = ": greyscale? send each grey value as r, g and b"
        elif x.ndim > 4 and x.shape[-3:] == PIXEL_SHAPE:
            hint = f": nested a level too deep? send a list of {PIXEL_SHAPE} images"
        elif x.ndim in (1, 2) and x.shape[-1] % np.prod(PIXEL_SHAPE) == 0:
            hint = (f": flattened? send each image {PIXEL_SHAPE}; CIFAR-10's rows of 3072 hold the red, green and blue "
                    "planes in turn: row.reshape(3, 32, 32).transpose(1, 2, 0)")
        else:
            hint = f"; send other sizes as base64 {IMAGE_FORMATS} images"
        raise bad_input(f"pixels must have shape (n, 32, 32, 3), got {x.shape}{hint}")
    if x.dtype == np.uint8:
        return x
    if x.dtype == object or x.dtype.kind in "US" and isinstance(model_input, list):
        x = numbers_of(np.asarray(model_input, dtype=object).reshape(x.shape) if isinstance(model_input, list) else x)
    if x.dtype.kind in "US":  # MLflow made every value text for one string among them: which one is lost
        raise bad_input(f"pixels must be integers 0-255, got text (such as {str(x.flat[0])!r}): send numbers, "
                        "not strings")
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise bad_input(f"pixels must be integers 0-255, got values of type {x.dtype}")
    # Each check names the images it refuses (by their index in the batch, as encoded images are named) and gives the
    # range of those alone: one bad image among 10,000 is found, and its hint is not the batch's.
    per_image = x.reshape(len(x), -1)
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(per_image).all(axis=1)
        if bad.any():
            raise bad_input(f"{images_named(bad)}: pixels contain NaN or infinity")
        bad = (np.mod(per_image, 1) != 0).any(axis=1)
        if bad.any():  # the likely cause, from the range: scaled, normalised or unrounded
            low, high = per_image[bad].min(), per_image[bad].max()
            cause = ("scaled to [0, 1]?" if low >= 0 and high <= 1 else "normalised?" if low < 0
                     else "round them to whole numbers")
            raise bad_input(f"{images_named(bad)}: pixels must be integers 0-255; got fractional values in "
                            f"[{low:g}, {high:g}] ({cause})")
        # Whole floats pass (JSON clients send 255.0), but only 0.0 and 1.0 is an image scaled to [0, 1] (white,
        # line art) that would read as nearly black: a brightest pixel of 1 of 255 is no real image. All 0.0 passes.
        if x.min() >= 0 and x.max() == 1:
            raise bad_input("pixels must be integers 0-255; got floats of only 0.0 and 1.0 (scaled to [0, 1]?)")
    check_range(per_image.min(axis=1), per_image.max(axis=1))
    return x.astype(np.uint8)


def check_range(lows: Any, highs: Any) -> None:
    """bad_input naming the images whose lowest (`lows`) or highest (`highs`) value is outside 0-255, with the range."""
    lows, highs = np.asarray(lows, dtype=object), np.asarray(highs, dtype=object)  # exact: ints beyond int64 too
    bad = ((lows < 0) | (highs > 255)).astype(bool)
    if bad.any():
        low, high = (f"{v:g}" if isinstance(v, (float, np.floating)) else str(v) for v in (min(lows[bad]),
                                                                                          max(highs[bad])))
        raise bad_input(f"{images_named(bad)}: pixels must lie in 0-255, got values in [{low}, {high}]")


def images_named(bad: np.ndarray) -> str:
    """A per-image mask -> 'image 2', or 'images 0, 3 of 5', or 'images 0, 1, 2 and 7 more of 10'."""
    index = np.flatnonzero(bad)
    if len(index) == 1:
        return f"image {index[0]}"
    more = f" and {len(index) - 3} more" if len(index) > 3 else ""
    return f"images {', '.join(str(i) for i in index[:3])}{more} of {len(bad)}"


def numbers_of(items: np.ndarray) -> np.ndarray:
    """Pixel values of an object array (nulls, text or integers beyond int64 among them) as numbers; bad_input naming
    the first that is no number and where it is, or the range of integers beyond 0-255."""
    for index, item in np.ndenumerate(items):
        if isinstance(item, bool) or not isinstance(item, (int, float, np.integer, np.floating)):
            raise bad_input(f"pixels must be integers 0-255, got {'null' if item is None else repr(item)} at "
                            f"{list(index)}")
    # Python's integers, exactly: beyond what a float or int64 holds
    check_range([min(image.flat) for image in items], [max(image.flat) for image in items])
    whole = all(isinstance(item, (int, np.integer)) for item in items.flat)  # 0s and 1s: a dark image, not scaled
    return items.astype(np.int64 if whole else np.float64)


def scoring_code_changes(code: Path) -> list[str]:
    """The files of SCORING_CODE (`pipeline/<module>.py`) whose copy in `code` (a logged model's `code/pipeline/`)
    differs, byte for byte, from the source of `pipeline` this process runs (`pipeline.source`: what it loaded, not the
    files on disk now), or is missing there."""
    from pipeline import source

    def logged_bytes(path: Path) -> bytes | None:
        return path.read_bytes() if path.is_file() else None

    return [f"pipeline/{module}.py" for module in SCORING_CODE
            if logged_bytes(code / f"{module}.py") != source.FILES[f"{module}.py"]]


def unset_backend(trained: str) -> str | None:
    """The backend a model trained on `trained` loads on where KERAS_BACKEND is unset (see `ImageClassifier`): that one
    where installed, else TensorFlow or JAX, whichever is; None where neither is (Keras's own choice then)."""
    return next((name for name in dict.fromkeys((trained, "tensorflow", "jax")) if importlib.util.find_spec(name)),
                None)


def check_backend(backend: str, trained: str) -> None:
    """MlflowException, in one line naming KERAS_BACKEND, where Keras cannot load `backend` (its value): no backend's
    name (a misspelling, JAX in capitals) or one not installed here. Keras's import failed on it with its traceback
    ("ValueError: Unable to import backend : tensorflw"), in `mlflow models serve` between uvicorn's frames and
    MLflow's: in the scoring server this line alone ends the process. The training commands refuse such a value as
    well (`pipeline.inputs.check_configured_backend`)."""
    installed = [name for name in KERAS_BACKENDS if importlib.util.find_spec(name)]  # numpy's scores too
    if backend in installed:
        return
    problem = (f"{backend!r} is no Keras backend ({', '.join(KERAS_BACKENDS)})" if backend not in KERAS_BACKENDS
               else f"{backend} is not installed here")
    unset = unset_backend(trained)
    default = f"the model loads on {unset}{', which trained it' if unset == trained else ''}" if unset else (
        "Keras loads its default")
    message = (f"KERAS_BACKEND: {problem}; set one installed here (KERAS_BACKEND={' or '.join(installed)}), "
               f"or unset it: {default}")
    if "mlflow.pyfunc.scoring_server.app" in sys.modules:  # `mlflow models serve`'s worker, loading the model to serve
        # An exception here reached uvicorn as a traceback of its frames and MLflow's: the line alone, then exit.
        raise SystemExit(message)
    raise MlflowException(message)


def to_frame(probs: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Class probabilities (n, classes) -> one row per image: label, probability, probabilities."""
    best = probs.argmax(axis=1)
    return pd.DataFrame({"label": [class_names[i] for i in best],
                         "probability": probs[np.arange(len(probs)), best].astype(float),
                         "probabilities": [p.astype(float).tolist() for p in probs]})


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Wraps the Keras model (artifact `keras_model`) and its class names (artifact `class_names`).

    tta: test-time augmentation, the probabilities averaged over `tta_views`: "flip" each image and its
    mirror image, "flip_shift" those and both shifted by one pixel diagonally either way (6 views), the uncovered
    border filled as the training shifts filled it: `shift_fill`, train.shift_fill of the run that trained it.
    Evaluate scores through `predict_proba` too, so the measured and the served model agree.
    backend: the Keras backend that trained it (`keras.backend.backend()`), which `load_context` loads it on where
    KERAS_BACKEND is unset and that backend is installed: Keras picks TensorFlow otherwise, which a JAX model's logged
    environment lacks. The saved model loads on either: where only TensorFlow is installed it runs there, where only
    JAX is, there.
    """

    # `predict` has no type hints on purpose: `to_pixels` validates every request (see INPUT_FORMATS), and
    # a type-hint schema would make MLflow cast inputs first. This is MLflow's switch for such models (its
    # ChatModel uses it); without it MLflow warns "Add type hints to the `predict` method" on every import.
    _skip_type_hint_validation = True

    def __init__(self, tta: str = "none", shift_fill: str = "nearest", backend: str | None = None):
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        if shift_fill not in SHIFT_FILLS:
            raise ValueError(f"shift_fill must be one of {', '.join(SHIFT_FILLS)}, got {shift_fill!r}")
        self.tta, self.shift_fill, self.backend = tta, shift_fill, backend

    def load_context(self, context):
        # A process imports `pipeline` once, from the first model it loads (or the checkout): a model logged with other
        # scoring code would score with that one's, silently (MLflow puts each model's code/ on sys.path, but a module
        # imported already is not imported again). Models logged before `pipeline.source` have no copy to compare.
        code = Path(context.artifacts[KERAS_ARTIFACT]).parents[1] / "code" / "pipeline"
        changed = scoring_code_changes(code) if code.is_dir() and "pipeline.source" in sys.modules else []
        if changed:
            imported = Path(sys.modules["pipeline"].__file__).parent
            raise MlflowException(f"{', '.join(changed)} logged with this model ({code}) "
                                  f"{'differs' if len(changed) == 1 else 'differ'} from the code of `pipeline` this "
                                  f"process imported ({imported}), which it would score with: load it in a process of "
                                  f"its own")
        # Keras reads KERAS_BACKEND once, when first imported: nothing this module imports at its top loads it.
        # Models logged before the backend was recorded have none (TensorFlow trained them). Where that backend is not
        # installed, the other: Keras's own choice is TensorFlow, which a JAX-only environment lacks. A KERAS_BACKEND
        # set empty is unset to Keras.
        trained = getattr(self, "backend", None) or "tensorflow"
        if "keras" not in sys.modules and os.environ.get("KERAS_BACKEND"):
            check_backend(os.environ["KERAS_BACKEND"], trained)
        elif "keras" not in sys.modules and (unset := unset_backend(trained)):
            os.environ["KERAS_BACKEND"] = unset
        import keras

        # Models logged before inference copies dropped the augmentation layer still hold that custom class:
        # importing its module registers it with Keras, else they fail to load in a fresh process (the server).
        import pipeline.augment  # noqa: F401

        self.model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        with open(context.artifacts[CLASSES_ARTIFACT]) as f:
            self.class_names = json.load(f)

    def predict_proba(self, pixels: np.ndarray, batch_size: int | None = None,
                      deadline: float | None = None) -> np.ndarray:
        """uint8 pixels (n, 32, 32, 3) -> float32 class probabilities (n, classes), `batch_size` (PREDICT_CHUNK) at a
        time, stopped past `deadline` (see `request_deadline`).

        `predict_on_batch` reuses one compiled function; `Model.predict` builds a data pipeline per call,
        which on a 2-core CPU costs ~140 ms for one image (2 ms here) and doubles the time of 256.
        """
        batch_size = batch_size or PREDICT_CHUNK
        chunks = []
        for start in range(0, len(pixels), batch_size):
            check_deadline(deadline, f"{start} of {len(pixels)} images scored")
            chunks.append(self._predict_batch(pixels[start:start + batch_size]))
        if not chunks:
            return np.zeros((0, self.model.output_shape[-1]), dtype=np.float32)
        return np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks])

    def _predict_batch(self, pixels: np.ndarray) -> np.ndarray:
        import keras

        from pipeline.augment import normalized_zero, tta_views  # imports Keras: not before load_context

        # Models logged before tta existed have none; before shift_fill, their shifted views repeated the edge.
        tta, fill = getattr(self, "tta", "none"), getattr(self, "shift_fill", "nearest")
        n = len(pixels)
        with JAX_MODEL_CALLS if keras.backend.backend() == "jax" else contextlib.nullcontext():  # reads weights too
            zero = normalized_zero(self.model) if tta == "flip_shift" and fill == "constant" else None
            views = tta_views(pad_for_jax(pixels), tta, fill, zero)
            probs = [np.asarray(self.model.predict_on_batch(v), dtype=np.float32)[:n] for v in views]
        return probs[0] if len(probs) == 1 else np.mean(probs, axis=0)  # one view: no stacking copy per request

    def predict(self, context, model_input, params=None):
        """Any accepted input (see the module docstring) -> a DataFrame, one row per image."""
        deadline = request_deadline()
        return to_frame(self.predict_proba(to_pixels(model_input, deadline), deadline=deadline), self.class_names)
