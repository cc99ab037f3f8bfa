"""Readers for interaction files: each returns raw (user, item, time) columns in file order.

Formats:
- ``seq``: one line per user, ``user item item ...``, oldest first (SASRec / S3-Rec layout);
  the position in the line is the timestamp.
- ``inter``: RecBole atomic file, tab-separated, header ``user_id:token item_id:token ...
  timestamp:float``.
- ``ratings``: MovieLens ``UserID::MovieID::Rating::Timestamp``.
Files may be gzip-compressed (``.gz``).
"""

import gzip
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, TextIO

import numpy as np

from ..errors import DataError, MissingFileError

FORMATS = ("seq", "inter", "ratings")


class DataFormatError(DataError):
    """A data file is not in the format it claims; the message names the file and line."""


@dataclass
class Interactions:
    """Raw interactions in file order: user and item tokens as strings, time as float64 [n]."""

    users: np.ndarray
    items: np.ndarray
    times: np.ndarray
    source: str


def detect_format(path: str) -> str:
    name = os.path.basename(path).lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".inter"):
        return "inter"
    if name.endswith(".dat"):
        return "ratings"
    if name.endswith(".txt"):
        return "seq"
    raise DataFormatError(
        f"cannot tell the format of {path} from its name; set data.format to one of {', '.join(FORMATS)}"
    )


def check_data_file(path: str) -> None:
    """Refuses a path that is not a file, naming what it is and the fix."""
    if os.path.isdir(path):
        inside = ", ".join(sorted(os.listdir(path))[:5])
        raise DataError(f"data.path {path} is a folder, not a file; name a file in it (it holds: {inside})")
    if not os.path.isfile(path):
        raise MissingFileError(
            f"data file {path} does not exist; point --data-dir or $RECBLR_DATA_DIR at the folder "
            "holding it (CI uses ../shared/data)"
        )


def _open_text(path: str) -> TextIO:
    check_data_file(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: str) -> Iterator[tuple]:
    """(line number, stripped line) of every non-empty line; a damaged file or a byte that is not
    UTF-8 is a :class:`DataFormatError` naming the file and where it broke."""
    number = 0
    check_data_file(path)  # before the try: a missing file is an OSError too
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if line:
                    yield number, line
    except UnicodeDecodeError:
        where, raw = _first_non_utf8_line(path)
        raise DataFormatError(
            f"line {where} of {path} holds bytes that are not UTF-8 ({raw!r}); the readers take UTF-8 text: "
            "re-encode the file"
        ) from None
    except (EOFError, OSError, zlib.error) as error:  # a truncated or corrupt gzip stream
        raise DataFormatError(
            f"{path} cannot be read past line {number} ({type(error).__name__}: {error}); the file is truncated or "
            "damaged: copy or download it again"
        ) from None


def _first_non_utf8_line(path: str) -> tuple:
    """(line number, the bytes that do not decode) of the first line that is not UTF-8 (text is
    decoded a block at a time, so the decoder cannot say which line it was on)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, line[error.start : error.end]
    return 0, b""


def _positive_id(token: str, what: str, number: int, path: str) -> str:
    if not token.isdigit():
        raise DataFormatError(f"{what} {token!r} in line {number} of {path} is not a non-negative integer")
    if int(token) == 0:
        raise DataFormatError(f"{what} 0 in line {number} of {path}: ids start at 1 (0 is the padding id)")
    return str(int(token))


def read_seq(path: str) -> Interactions:
    users: List[str] = []
    items: List[str] = []
    times: List[float] = []
    seen = set()
    for number, line in _lines(path):
        tokens = line.split()
        if len(tokens) < 2:
            raise DataFormatError(
                f"line {number} of {path} has {len(tokens)} field(s); expected 'user item [item ...]'"
            )
        user = _positive_id(tokens[0], "user id", number, path)
        if user in seen:
            raise DataFormatError(f"user {user} appears again in line {number} of {path}; one line per user")
        seen.add(user)
        for position, token in enumerate(tokens[1:]):
            items.append(_positive_id(token, "item id", number, path))
            users.append(user)
            times.append(float(position))
    return Interactions(np.array(users), np.array(items), np.array(times, dtype=np.float64), path)


def _read_delimited(
    path: str, split: Callable[[str], List[str]], columns: Dict[str, int], width: int, number_offset: int
) -> Interactions:
    users: List[str] = []
    items: List[str] = []
    times: List[float] = []
    for number, line in _lines(path):
        if number <= number_offset:
            continue
        fields = split(line)
        if len(fields) != width:
            raise DataFormatError(f"line {number} of {path} has {len(fields)} fields; expected {width}")
        try:
            time = float(fields[columns["time"]])
        except ValueError:
            raise DataFormatError(
                f"timestamp {fields[columns['time']]!r} in line {number} of {path} is not a number"
            ) from None
        users.append(fields[columns["user"]])
        items.append(fields[columns["item"]])
        times.append(time)
    return Interactions(np.array(users), np.array(items), np.array(times, dtype=np.float64), path)


def read_inter(path: str) -> Interactions:
    header = next(_lines(path), (0, ""))[1].split("\t")
    names = [h.split(":")[0] for h in header]
    columns = {}
    for key, name in (("user", "user_id"), ("item", "item_id"), ("time", "timestamp")):
        if name not in names:
            raise DataFormatError(
                f"{path} header {header} has no {name} column; RecBole atomic files need "
                "user_id:token, item_id:token and timestamp:float"
            )
        columns[key] = names.index(name)
    return _read_delimited(path, lambda s: s.rstrip("\n").split("\t"), columns, len(names), 1)


def read_ratings(path: str) -> Interactions:
    return _read_delimited(path, lambda s: s.split("::"), {"user": 0, "item": 1, "time": 3}, 4, 0)


def read_interactions(path: str, fmt: str = "auto") -> Interactions:
    """Reads any supported file; ``fmt='auto'`` picks the format from the file name."""
    if fmt == "auto":
        fmt = detect_format(path)
    readers = {"seq": read_seq, "inter": read_inter, "ratings": read_ratings}
    if fmt not in readers:
        raise DataFormatError(f"unknown data format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    interactions = readers[fmt](path)
    if interactions.users.size == 0:
        raise DataFormatError(f"{path} holds no interactions")
    return interactions
