"""Ask a running model server (`mlflow models serve -m <model uri>`) what some pictures show.

Usage: python -m pipeline.predict cat.png dog.jpg photos/ --url http://127.0.0.1:5000
A folder stands for the image files in it (by suffix; hidden files and others left out, and counted on stderr), sorted
by name, and those of its subfolders with --recursive; `-` for one image read from standard input, printed as `-`.
Sends the files (PNG, JPEG, BMP, GIF, WebP or TIFF, up to 16.8 megapixels) as base64, a `dataframe_split` column
`image`, to `<url>/invocations` (under the URL's path, before its query) and prints one line per image: file, predicted
label, its probability (tab-separated). Exits 2 with one line on stderr, before reading any file, when --url is not an
http(s) URL (as for a bad --batch-size or --timeout), and before any request when a file is missing (a shell pattern
that matched nothing among them), a folder holding no image file, empty, unreadable, of another format (its first bytes)
or declaring more than 16.8 megapixels in its header, and when the server refuses an image (HTTP 400, naming the file:
not an image, truncated, too large). Exits 1 with a message on stderr when the server cannot be reached or does not
answer within --timeout, runs out of its own time limit (HTTP 504) or closes the connection without an answer, it
refuses the request otherwise or fails on it (HTTP 5xx), or its answer is not a model server's (another service on that
port, an answer cut short), or its predictions cannot be written (a full disk; quietly into a closed pipe, `| head`). No
predictions are printed when it exits non-zero (130 after Ctrl-C). A --url of http://user:password@host:port sends the
user and password as HTTP Basic authentication (a server behind a proxy that asks for them); messages show the password
as ***. A proxy the environment names (http_proxy; no_proxy) is used, as urllib does, and named in error lines; a
redirect is not followed but named (urllib would send a GET without the images).
Only the standard library is used, so the client starts fast and needs no ML packages.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import math
import os
import re
import ssl
import stat
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Files' bytes per request, at most: the server holds a request's JSON whole (and base64 is 4/3 of the bytes), and its
# time limit counts the upload. 64 photos of 2.8 MB took it 1 GB more memory and 28 s of its 60 s (2-core AMD EPYC,
# 2026-12-07).
MAX_REQUEST_BYTES = 16 * 2**20
# How the files of the formats the server decodes start (Pillow's own tests of them; WebP's is RIFF....WEBP): any other
# file is refused before any request. The server still decodes each, and refuses a truncated or corrupt one.
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF87a", b"GIF89a",
                    b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")  # TIFF, BigTIFF
# The files of a folder that are sent: those of the suffixes the server's formats have (pipeline.data.IMAGE_SUFFIXES)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The most pixels the server decodes an image of (pipeline.serve.MAX_ENCODED_PIXELS: this client imports nothing of the
# project): a larger image is refused here, from its header, before any request.
MAX_PIXELS = 4096 * 4096
# OpenSSL's reasons for an answer that is no TLS record, which a plain HTTP server's 400 page is (1.1 and 3.0; 3.2+)
PLAIN_HTTP_ANSWERS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"}


# An image to send: a file, or the bytes read from standard input (`-`)
Image = Path | bytes


class PredictError(RuntimeError):
    """A file, the connection or the server's answer made the prediction fail; the message says which."""


class BadInput(PredictError):
    """The command's input is bad (a --url, a file, or an image the server refused): exit 2, as for a usage error."""


class Stopped(PredictError):
    """Ctrl-C, while images were sent: exit 130, as a shell reports a command SIGINT stopped, and no traceback."""


def count(n: int, noun: str) -> str:
    """`1 image`, `3 images`."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def check_files(paths: list[Path]) -> None:
    """BadInput naming the first of `paths` that is no readable, non-empty file starting as an image of the served
    formats does, or whose header declares more pixels than the server decodes: checked before any request, so a bad
    file late in the list does not cost the batches before it (their predictions would not be printed)."""
    for path in paths:
        try:
            mode = path.stat()
        except FileNotFoundError:
            if path.is_symlink():  # `ls` lists it
                raise BadInput(f"{shown(path)}: a link to {shown(path.readlink())}, which is missing") from None
            # the shell passes a pattern that matched nothing as it is: `*.png` in a folder of .jpg files
            hint = " (a shell pattern that matched no file?)" if re.search(r"[*?[]", path.name) else ""
            raise BadInput(f"{shown(path)}: no such file{hint}") from None
        except OSError as exc:
            raise BadInput(f"{shown(path)}: cannot read ({exc.strerror or exc})") from None
        if stat.S_ISDIR(mode.st_mode):
            raise BadInput(f"{shown(path)}: a directory, not an image file")
        if not stat.S_ISREG(mode.st_mode):  # a FIFO or a device would block the read, or never end
            raise BadInput(f"{shown(path)}: not a regular file")
        if mode.st_size == 0:
            raise BadInput(f"{shown(path)}: an empty file, not an image")
        try:
            with path.open("rb") as file:
                check_image(shown(path), file)
        except OSError as exc:
            raise BadInput(f"{shown(path)}: cannot read ({exc.strerror or exc})") from None


def check_image(name: str, file: BinaryIO) -> None:
    """BadInput naming `name` where `file` (at its start) does not start as an image of the served formats, or its
    header declares more than MAX_PIXELS: the server would refuse it as its batch came. Its header only is read."""
    start = file.read(16)
    if not (start.startswith(IMAGE_SIGNATURES) or start[:4] == b"RIFF" and start[8:12] == b"WEBP"):
        # a phone's HEIC photo (or an AVIF) exported under a .jpg name: its ISO box `ftyp`, then the brand
        what = (f"a HEIF or AVIF image, brand {start[8:12].decode('ascii', 'replace')!r}: convert it to JPEG or PNG"
                if start[4:8] == b"ftyp" and start[8:11] in (b"hei", b"hev", b"mif", b"msf", b"avi", b"avc")
                else f"its first bytes: {start[:8]!r}")
        raise BadInput(f"{name}: not a PNG, JPEG, BMP, GIF, WebP or TIFF image ({what})")
    file.seek(0)
    size = declared_size(file)
    if size and size[0] * size[1] > MAX_PIXELS:
        raise BadInput(f"{name}: {size[0]}x{size[1]} pixels, over the {MAX_PIXELS / 1e6:.1f} megapixels (4096x4096) "
                       f"the server decodes: save it smaller")


def declared_size(file: BinaryIO) -> tuple[int, int] | None:
    """(width, height) as the header of the image in `file` (at its start) declares them, as Pillow reads its size
    before decoding (of an animated or multi-page image, the first frame's canvas); None where the header is cut short
    or not understood: the server decodes the file, and refuses it if it must. Read by hand: the client needs no
    Pillow."""
    head = file.read(30)
    try:
        if head.startswith(b"\x89PNG"):
            return struct.unpack(">II", head[16:24]) if head[12:16] == b"IHDR" else None
        if head.startswith(b"GIF"):
            return gif_size(head, file)
        if head.startswith(b"BM"):
            if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2's BITMAPCOREHEADER
                return struct.unpack("<HH", head[18:22])
            width, height = struct.unpack("<ii", head[18:26])  # a negative height: rows stored top down
            return abs(width), abs(height)
        if head.startswith(b"RIFF"):
            return webp_size(head)
        if head.startswith(b"\xff\xd8"):
            return jpeg_size(file)
        return tiff_size(head, file)
    except (struct.error, IndexError, ValueError, OSError):  # cut short: fewer bytes than the header needs
        return None


def gif_size(head: bytes, file: BinaryIO) -> tuple[int, int]:
    """A GIF's logical screen, widened to its first frame's extent where that reaches beyond it (as Pillow does)."""
    width, height, flags = struct.unpack("<HHB", head[6:11])
    file.seek(13 + (3 << (flags & 7) + 1 if flags & 0x80 else 0))  # past the global colour table
    while (block := file.read(1)) == b"!":  # extensions: a label, then sub-blocks up to an empty one
        file.read(1)
        while length := file.read(1)[0]:
            file.seek(length, os.SEEK_CUR)
    if block == b",":
        left, top, frame_width, frame_height = struct.unpack("<HHHH", file.read(8))
        width, height = max(width, left + frame_width), max(height, top + frame_height)
    return width, height


def webp_size(head: bytes) -> tuple[int, int] | None:
    """The canvas a WebP's first chunk declares (Pillow's `WebPImagePlugin._get_size`)."""
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8X":
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, (bits >> 14 & 0x3FFF) + 1
    return None


def jpeg_size(file: BinaryIO) -> tuple[int, int] | None:
    """A JPEG's size from its frame header (SOF0-15), the segments before it (EXIF, its thumbnail) skipped."""
    file.seek(2)
    while file.read(1) == b"\xff":
        marker = file.read(1)
        while marker == b"\xff":  # fill bytes
            marker = file.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # the end, or a scan before any frame header
            return None
        if marker[0] == 0x01 or 0xD0 <= marker[0] <= 0xD8:  # markers without a segment
            continue
        length = struct.unpack(">H", file.read(2))[0]
        if length < 2:  # no JPEG: the seek below would go back
            return None
        if 0xC0 <= marker[0] <= 0xCF and marker[0] not in (0xC4, 0xC8, 0xCC):  # not DHT, JPG, DAC
            height, width = struct.unpack(">xHH", file.read(5))
            return width, height
        file.seek(length - 2, os.SEEK_CUR)
    return None


def tiff_size(head: bytes, file: BinaryIO) -> tuple[int, int] | None:
    """A TIFF's (or BigTIFF's) first page's ImageWidth and ImageLength tags."""
    order = "<" if head[:2] == b"II" else ">"
    big = struct.unpack(order + "H", head[2:4])[0] == 43
    count, entry, offset = ("Q", 20, struct.unpack(order + "Q", head[8:16])[0]) if big else (
        "H", 12, struct.unpack(order + "I", head[4:8])[0])
    file.seek(offset)
    entries = min(struct.unpack(order + count, file.read(struct.calcsize(count)))[0], 4096)
    table = file.read(entries * entry)
    tags = {}
    for at in range(0, len(table) - entry + 1, entry):
        tag, kind = struct.unpack(order + "HH", table[at:at + 4])
        value = table[at + entry - (8 if big else 4):at + entry]
        if tag in (256, 257) and kind in (3, 4, 16):  # SHORT, LONG, LONG8
            tags[tag] = struct.unpack(order + {3: "H", 4: "I", 16: "Q"}[kind], value[:{3: 2, 4: 4, 16: 8}[kind]])[0]
    return (tags[256], tags[257]) if len(tags) == 2 else None


def images_in(folder: Path, recursive: bool) -> list[Path]:
    """The image files in `folder`, by their suffix (IMAGE_SUFFIXES, in any case), sorted by path, and those of its
    subfolders where `recursive` (a folder reached twice through links is read once). Hidden files and folders (a name
    starting with '.': .DS_Store, macOS's ._cat.jpg) and files of other suffixes are left out, and so are subfolders
    without `recursive`: one line on stderr counts them, naming the first. BadInput where no image file is found.
    Each file found is then checked as a file named on the command line is (`check_files`)."""
    found: list[Path] = []
    other, hidden, folders = [], [], []  # names in `folder`, as said
    pending, seen = [folder], set()
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError as exc:
            raise BadInput(f"{shown(current)}: cannot read ({exc.strerror or exc})") from None
        for entry in entries:
            path = current / entry.name
            name = shown(path.relative_to(folder))
            try:
                is_folder = entry.is_dir()  # a link to a folder too
            except OSError:
                is_folder = False
            if entry.name.startswith("."):
                hidden.append(name + "/" * is_folder)
            elif is_folder and recursive:
                try:
                    if (key := identity(path)) in seen or key == identity(folder):
                        continue
                    seen.add(key)
                except OSError:  # unreadable: named as it is read
                    pass
                pending.append(path)
            elif is_folder:
                folders.append(name + "/")
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                found.append(path)
            else:
                other.append(name)
    suffixes = " ".join(IMAGE_SUFFIXES)
    said = [f"{count(len(names), what)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}){why}"
            for what, names, why in (("file", other, f" of no image suffix ({suffixes})"), ("hidden file", hidden, ""),
                                     ("subfolder", folders, ": --recursive reads those")) if names]
    if not found:
        raise BadInput(f"{shown(folder)}: a folder holding no image file (of the suffixes {suffixes})"
                       f"{'; it holds ' + ', '.join(said) if said else ''}")
    if said:
        print(f"note: {shown(folder)}: {count(len(found), 'image file')} taken; left out: {', '.join(said)}",
              file=sys.stderr, flush=True)
    return sorted(found)


def identity(path: Path) -> tuple[int, int]:
    """The device and inode of `path` (a link's target's): the same folder, however reached."""
    info = path.stat()
    return info.st_dev, info.st_ino


def read_stdin() -> bytes:
    """The one image on standard input (`-`: `curl -s <url> | python -m pipeline.predict -`), checked as a file is
    (`check_image`)."""
    if sys.stdin is None or sys.stdin.closed:
        raise BadInput("-: standard input is closed: pipe an image into it")
    if sys.stdin.isatty():  # the read would wait for an image typed in
        raise BadInput("-: standard input is a terminal: pipe an image into it (`python -m pipeline.predict - < "
                       "cat.png`)")
    try:
        start = sys.stdin.buffer.read(16)
        if not start:
            raise BadInput("-: standard input is empty, not an image")
        check_image("-", io.BytesIO(start))  # its format: a video piped in by mistake is not read whole first
        raw = start + sys.stdin.buffer.read()
    except OSError as exc:
        raise BadInput(f"-: cannot read standard input ({exc.strerror or exc})") from None
    check_image("-", io.BytesIO(raw))
    return raw


def named(image: Image) -> str:
    """An image as printed: a file's name (`shown`), or `-` for standard input's."""
    return "-" if isinstance(image, bytes) else shown(image)


def encode_files(images: list[Image]) -> list[str]:
    """Image files (or standard input's bytes) -> their bytes as base64 strings, in order."""
    encoded = []
    for image in images:
        try:
            raw = image if isinstance(image, bytes) else image.read_bytes()
        except OSError as exc:
            raise PredictError(f"{shown(image)}: cannot read ({exc.strerror or exc})") from None
        encoded.append(base64.b64encode(raw).decode("ascii"))
    return encoded


def server_message(body: bytes) -> str:
    """The reason in an MLflow error body, without the echo of the request MLflow puts before it."""
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):  # not MLflow's answer (a proxy's or another server's HTML page): one line
        message = " ".join(re.sub(r"<[^>]*>", " ", body.decode("utf-8", "replace")).split())[:300]
    # one line: a model's error may run over several
    return " ".join(message.rsplit("\nError: ", 1)[-1].split()) or "(no message)"


def error_body(exc: urllib.error.HTTPError) -> bytes:
    """The body of an error answer, or what came of it before the connection failed."""
    try:
        return exc.read()
    except http.client.IncompleteRead as cut:
        return cut.partial
    except (OSError, http.client.HTTPException):
        return b""


def incomplete(exc: http.client.IncompleteRead) -> str:
    """'<n> bytes read[, <m> more expected]' of a cut-short answer."""
    return f"{len(exc.partial)} bytes read" + (f", {exc.expected} more expected" if exc.expected else "")


def printable(exc: Exception) -> str:
    """`exc` as one line of printable text: a non-HTTP service's first line may hold control bytes (a TLS alert)."""
    text = re.sub(r"[^\x20-\x7e]", "?", " ".join(str(exc).split()))[:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_url(url: str) -> None:
    """PredictError naming --url unless `url` is http(s)://host[:port][/path]: urllib raises ValueError for
    some others, and would read a `file:` URL or report a missing scheme as a failed connection."""
    try:
        parts = urllib.parse.urlsplit(url)
        valid = parts.scheme in ("http", "https") and parts.hostname and parts.port != 0  # port: ValueError if bad
    except ValueError as exc:
        shown = without_password(url)
        # With a password, the port urllib could not read may be the password's start, cut at a '/', '?' or '#'
        reason = exc if shown == url else ("a bad host or port, or a '/', '?' or '#' in the password not written "
                                           "%2F, %3F, %23")
        raise BadInput(f"--url: not a valid URL: {shown!r} ({reason})") from None
    host = urllib.parse.unquote(parts.netloc.rpartition("@")[2])  # urllib decodes the host's %XX, connecting
    if re.search(r"[\x00-\x20\x7f]", parts.netloc + host):  # http.client refuses it only as it connects
        raise BadInput(f"--url: not a valid URL: {without_password(url)!r} (a space or control character in "
                           f"its host)")
    if not valid:
        hint = (f" (a model URI: serve it first, `mlflow models serve -m {url} --env-manager local -p 5001`, then give "
                f"--url http://127.0.0.1:5001)" if parts.scheme in ("models", "runs") else "")
        raise BadInput(f"--url: expected http://host:port, got {without_password(url)!r}{hint}")
    if parts.username is None and parts.port is not None and "@" in parts.path + parts.query + parts.fragment:
        # http://ann:12/s3cret@host: urllib reads host ann, port 12, and a path holding the password it would send there
        raise BadInput(f"--url: not a valid URL: {without_password(url)!r} (an '@' after its host and port: a "
                           f"'/', '?' or '#' in the password not written %2F, %3F, %23, or an '@' in the path or "
                           f"query not written %40)")
    try:
        parts.hostname.encode("idna")  # as the socket encodes it, connecting: refused there as an "unexpected answer"
    except UnicodeError:
        raise BadInput(f"--url: not a valid URL: {without_password(url)!r} (an empty label or one of over 63 "
                           f"characters in its host)") from None


def split_credentials(url: str) -> tuple[str, str | None]:
    """`url` without its user part, and the HTTP Basic `Authorization` header that part gives (None without one): a
    model server behind a proxy that asks for a password is reached as http://user:password@host, which urllib reads
    as a host name ("Name or service not known")."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None:
        return url, None
    credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, "Basic " + base64.b64encode(credentials.encode()).decode("ascii")


def without_password(url: str) -> str:
    """`url` with the password of its user part as `***`: an error line must not print it. A password holding a '/'
    (not written %2F) is masked up to the last '@' too, even where its start reads as a port (http://ann:12/ab@host,
    which `check_url` refuses)."""
    masked = re.sub(r"^([a-z][a-z0-9+.-]*://[^/@:]*):[^/]*@", r"\1:***@", url, flags=re.IGNORECASE)
    if masked != url:
        return masked
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^/@:]*):.*@", r"\1:***@", url, flags=re.IGNORECASE)


def name_images(message: str, names: list[str]) -> str:
    """The server's `image <i>:` (the index in one request) in `message` -> `<names[i]>:`."""
    return re.sub(r"\bimage (\d+):", lambda m: f"{names[int(m[1])]}:" if int(m[1]) < len(names) else m[0], message)


def request_body(images: list[str]) -> bytes:
    """The JSON body for base64 `images`: a `dataframe_split` column `image`. MLflow's server reads `{"inputs": [...]}`
    into one numpy array of fixed-width strings, each as long as the longest: a 3.5 MB photo among 63 thumbnails
    took 1.2 GB of its memory (a frame keeps each string its own length, and its error messages short)."""
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}).encode()


def predictions_in(body: bytes) -> list[dict] | None:
    """The rows of a model server's answer `body`, one per image, each a label and a probability in [0, 1]; None if it
    holds none such (another service's page, another model's rows: a text classifier takes strings too)."""
    try:
        predictions = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(predictions, list) and all(
            isinstance(row, dict) and isinstance(row.get("label"), str)
            and type(row.get("probability")) in (int, float) and 0 <= row["probability"] <= 1  # NaN too is refused
            for row in predictions):
        return predictions
    return None


def answer_shown(body: bytes) -> str:
    """The start of an answer `body` on one line: its predictions where it has some, else the whole of it."""
    try:
        text = json.dumps(json.loads(body)["predictions"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace")
    return printable_text(text)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed, but said: urllib turns a POST redirected by 301 or 302 into a GET without the images
    (the model server answers 405), and does not follow a 307 or 308 of a POST."""

    def redirect_request(self, *args, **kwargs) -> None:
        return None


def printable_text(text: str) -> str:
    """`text` on one line of printable characters, 200 at most."""
    return "".join(c if c.isprintable() else "?" for c in " ".join(text.split()))[:200]


def proxy_note(endpoint: str) -> str:
    """' through the proxy <address> (<variable>; ...)' where urllib sends `endpoint` through a proxy the environment
    names (http_proxy, https_proxy; even to 127.0.0.1, without a no_proxy naming it), else ''."""
    parts = urllib.parse.urlsplit(endpoint)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname):
        return ""
    variable = next((name for name in (f"{parts.scheme}_proxy", f"{parts.scheme.upper()}_PROXY")
                     if os.environ.get(name)), f"{parts.scheme}_proxy")
    return f" through the proxy {without_password(proxy)} ({variable}; add {parts.hostname} to no_proxy to go direct)"


def request_predictions(url: str, images: list[str], timeout: float, names: list[str] | None = None) -> list[dict]:
    """POST base64 images to `<url>/invocations`; return the server's predictions, one dict per image.
    `names` (one per image: file names) replace the server's `image <i>` in its error message."""
    check_url(url)
    bare, authorization = split_credentials(url)
    url = without_password(url)  # as the messages below show it
    parts = urllib.parse.urlsplit(bare)  # a query (a gateway's ?key=...) stays after the path: it was posted to `/`
    endpoint = urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/invocations", fragment=""))
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    request = urllib.request.Request(endpoint, data=request_body(images), headers=headers, method="POST")
    via = proxy_note(endpoint)
    sent = f"a request of {count(len(images), 'image')}"  # as the messages below name it
    try:
        # an opener of its own, not urlopen's, built once a process: the proxies of proxy_note, the environment's now
        with urllib.request.build_opener(NoRedirect).open(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        said = server_message(error_body(exc))
        message = name_images(said, names or [])
        if 300 <= exc.code < 400:
            raise PredictError(f"{url} redirects to {printable_text(exc.headers.get('Location', '(nowhere)'))} "
                               f"(HTTP {exc.code}); give --url the address it moved to{via}") from None
        if exc.code == 404:  # a tracking server (`mlflow server` also defaults to port 5000), or --url .../invocations
            raise PredictError(f"HTTP 404 for {endpoint}: no model server at --url {url}; it takes the base URL of "
                               f"`mlflow models serve` (http://host:port), not a tracking server's{via}") from None
        if exc.code == 413:  # a proxy's limit on a request's size (nginx: 1 MB by default); the model server has none
            cure = ("lower --batch-size" if len(images) > 1 else
                    f"{names[0] if names else 'the image'} alone is over its limit (nginx: client_max_body_size)")
            raise PredictError(f"{url} refused {sent}, {len(request.data):,} bytes, as too "
                               f"large (HTTP 413: {message}): {cure}") from None
        if exc.code == 504:  # the server's own time limit ran out (or a proxy's): a longer --timeout cannot help
            raise PredictError(f"{url} ran out of time on {sent} (HTTP 504: {message}): "
                               f"lower --batch-size, or raise the server's limit "
                               f"(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT where `mlflow models serve` starts, 60 s by "
                               f"default){via}") from None
        refused = BadInput if exc.code == 400 and message != said else PredictError  # it named files it refused
        what = "failed on" if exc.code >= 500 else "refused"  # a 5xx is the server's fault, not the images'
        raise refused(f"server {what} the request (HTTP {exc.code}): {message}"
                      f"{via if refused is PredictError else ''}") from None
    except TimeoutError:  # connected, then no answer in time (a timeout connecting is a URLError: cannot reach)
        raise PredictError(f"no answer from {url} within --timeout {timeout:g} s (a large batch or a slow model?): "
                           f"raise --timeout or lower --batch-size") from None
    except OSError as exc:  # URLError (refused, unknown host, a timeout connecting), a connection reset, TLS
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (ConnectionResetError, BrokenPipeError)):  # reached: it took the request, or part of it
            raise PredictError(f"{url} closed the connection without an answer to {sent} "
                               f"({reason}): the server stopped, or its time limit ran out first "
                               f"(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s by default, counting the upload); lower "
                               f"--batch-size{via}") from None
        if isinstance(reason, ssl.SSLError) and reason.reason in PLAIN_HTTP_ANSWERS:
            raise PredictError(f"{url} answers no TLS ({reason}): `mlflow models serve` speaks plain HTTP, "
                               f"--url http{url[len('https'):]}") from None
        if isinstance(reason, ConnectionRefusedError) and not via:
            port = urllib.parse.urlsplit(endpoint).port or (443 if endpoint.startswith("https") else 80)
            raise PredictError(f"cannot reach {url} ({reason}): no server listens there; start one (`mlflow models "
                               f"serve -m <model uri> --env-manager local -p {port}`) or give --url the port one "
                               f"serves on") from None
        raise PredictError(f"cannot reach {url} ({reason}){via}") from None
    except http.client.InvalidURL as exc:  # a ValueError too: e.g. a space in the host name
        raise BadInput(f"--url: not a valid URL: {url!r} ({exc})") from None
    except http.client.IncompleteRead as exc:  # the server closed before the end of its answer (a worker killed)
        raise PredictError(f"the answer from {url} was cut short ({incomplete(exc)}): did the server stop?") from None
    except http.client.HTTPException as exc:  # no HTTP at all: another service on that port (SSH, PostgreSQL, TLS)
        raise PredictError(f"no HTTP answer from {url} ({printable(exc)}); --url takes the address of "
                           f"`mlflow models serve` (http://host:port){via}") from None
    except ValueError as exc:
        raise PredictError(f"unexpected answer from {url} ({exc!r})") from None
    predictions = predictions_in(body)
    if predictions is None:
        raise PredictError(f"unexpected answer from {url}: {answer_shown(body)} holds no label and probability per "
                           f"image; is it serving this project's model?")
    if len(predictions) != len(images):
        raise PredictError(f"server answered {len(predictions)} predictions for {len(images)} images")
    return predictions


def shown(path: Path) -> str:
    """`path` as printed, on stdout and in error lines: the bytes of its name that the file system's encoding does
    not decode (a Latin-1 name on a UTF-8 system) as \\xNN escapes; print raised UnicodeEncodeError on them. Control
    characters as \\t, \\n, \\xNN: a tab or a newline in a name broke the line of three tab-separated fields, or
    an error's one line."""
    name = os.fsencode(path).decode(sys.getfilesystemencoding(), "backslashreplace")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: m[0].encode("unicode_escape").decode("ascii"), name)


def batches(images: list[Image], batch_size: int) -> Iterator[list[Image]]:
    """`images` in order, in lists of `batch_size` files and MAX_REQUEST_BYTES at most (a larger file alone)."""
    batch, held = [], 0
    for image in images:
        try:
            size = len(image) if isinstance(image, bytes) else image.stat().st_size
        except OSError:  # gone since check_files: encode_files names it
            size = 0
        if batch and (len(batch) == batch_size or held + size > MAX_REQUEST_BYTES):
            yield batch
            batch, held = [], 0
        batch.append(image)
        held += size
    if batch:
        yield batch


def predict_files(images: list[Image], url: str, batch_size: int, timeout: float) -> list[str]:
    """Image files (or standard input's bytes) -> lines `file<TAB>label<TAB>probability`, in the order of `images`,
    sending `batch_size` images a request at most, and MAX_REQUEST_BYTES of files at most."""
    lines = []
    for batch in batches(images, batch_size):
        try:
            predictions = request_predictions(url, encode_files(batch), timeout, [named(image) for image in batch])
        except KeyboardInterrupt:
            raise Stopped(f"stopped (Ctrl-C) at {named(batch[0])}, after {len(lines)} of {len(images)} images; none "
                          f"printed") from None
        for image, row in zip(batch, predictions, strict=True):
            lines.append(f"{named(image)}\t{row['label']}\t{row['probability']:.4f}")
    return lines


def images_given(names: list[str], recursive: bool) -> list[Image]:
    """The command's image arguments -> the images to send, in order: files as named, every image file in a folder
    (`images_in`), standard input's image for `-`; each checked before any request (`check_files`, `read_stdin`)."""
    empty = [i for i, name in enumerate(names, start=1) if not name]
    if empty:  # Path("") is the current folder
        raise BadInput(f"file name {empty[0]} of {len(names)} is empty (an unset shell variable?)")
    if names.count("-") > 1:
        raise BadInput("- given twice: standard input holds one image (name a file ./- as that)")
    images: list[Image | None] = []  # None: standard input's, read once the files are checked
    for name in names:
        if name == "-":
            images.append(None)
        elif os.path.isdir(name):  # False, not an OSError, for a name too long
            images.extend(images_in(Path(name), recursive))
        else:
            images.append(Path(name))
    check_files([image for image in images if isinstance(image, Path)])
    # read last: a bad file is refused without waiting on the pipe
    return [read_stdin() if image is None else image for image in images]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+",
                        help="PNG, JPEG, BMP, GIF, WebP or TIFF files, up to 16.8 megapixels (4096x4096, as the server "
                             "decodes; a larger one is refused before any is sent); a folder: every image file in it, "
                             "by suffix, sorted by name, hidden files left out; -: one image read from standard input")
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="send the images in a folder's subfolders too")
    parser.add_argument("--url", default="http://127.0.0.1:5000",
                        help="the model server (default: %(default)s); http://user:password@host:port for one behind a "
                             "proxy that asks for a password (HTTP Basic)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per request, at most (default: %(default)s; fewer where they hold over "
                             f"{MAX_REQUEST_BYTES // 2**20} MiB)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if not (math.isfinite(args.timeout) and args.timeout > 0):  # 0 makes the socket non-blocking, inf overflows it
        parser.error(f"--timeout must be a number of seconds > 0, got {args.timeout:g}")
    try:
        check_url(args.url)  # a usage error, like the two above: exit 2, before any file is read
        try:
            images = images_given(args.images, args.recursive)  # each checked before any request
        except KeyboardInterrupt:  # many files on a slow network folder
            raise Stopped("stopped (Ctrl-C) before any request") from None
        lines = predict_files(images, args.url, args.batch_size, args.timeout)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, BadInput) else 130 if isinstance(exc, Stopped) else 1
    try:
        print("\n".join(lines), flush=True)
    except OSError as exc:
        # what stayed in stdout's buffer would fail again as Python flushes it at exit: a traceback after this line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not isinstance(exc, BrokenPipeError):  # a closed pipe (`| head -1`) is the reader's choice: nothing to say
            print(f"error: cannot write the predictions ({exc.strerror or exc})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
