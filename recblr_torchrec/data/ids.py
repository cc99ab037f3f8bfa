"""The map between the ids of the data file and the model's dense ids, as a run folder keeps it.

k-core filtering and ``data.max_users`` drop users and items, so dense ids are not the file's
ids. A run folder holds two tab-separated files, written when training starts:

- ``item_ids.tsv``: ``dense_id<TAB>item_id`` for dense ids 1..num_items (0 is padding);
- ``user_ids.tsv``: ``row<TAB>user_id`` for rows 0..num_users-1.

Export copies ``item_ids.tsv`` beside the serving files and builds ``ids.pt`` from it
(:mod:`recblr_torchrec.serving.ids`).
"""

import os
from typing import Iterable, List, Optional

from ..errors import DataError
from .sequences import SequenceData

ITEM_IDS = "item_ids.tsv"
USER_IDS = "user_ids.tsv"
ITEM_HEADER = "dense_id\titem_id"
USER_HEADER = "row\tuser_id"


def _write_rows(path: str, header: str, ids: Iterable[str], first: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(header + "\n")
        f.writelines(f"{dense}\t{token}\n" for dense, token in enumerate(ids, start=first))
    os.replace(tmp, path)


def write_id_maps(data: SequenceData, folder: str) -> None:
    """Writes ``item_ids.tsv`` and ``user_ids.tsv`` of ``data`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    _write_rows(os.path.join(folder, ITEM_IDS), ITEM_HEADER, (str(t) for t in data.item_tokens[1:]), 1)
    _write_rows(os.path.join(folder, USER_IDS), USER_HEADER, (str(t) for t in data.user_tokens), 0)


def read_item_ids(path: str) -> List[str]:
    """The file's item id of each dense id, index 0 (padding) ``""``; checks the header and that the
    dense ids run 1, 2, ... without gaps."""
    names = [""]
    with open(path) as f:
        header = f.readline().rstrip("\n")
        if header != ITEM_HEADER:
            raise DataError(f"{path}:1 is {header!r}, not the header {ITEM_HEADER!r}: it is not an item id map")
        for number, line in enumerate(f, start=2):
            dense, _, token = line.rstrip("\n").partition("\t")
            if dense != str(len(names)) or not token:
                raise DataError(
                    f"{path}:{number} is {line.strip()!r}; expected '{len(names)}<TAB>item id': export from "
                    "the run folder as training wrote it"
                )
            names.append(token)
    return names


def find_item_ids(checkpoint_path: str) -> Optional[str]:
    """The ``item_ids.tsv`` of the run folder a checkpoint belongs to: the checkpoint's folder or
    one of its three parents (a run folder, checkpoints/, a DCP root, one DCP checkpoint)."""
    folder = os.path.abspath(checkpoint_path)
    if os.path.isfile(folder):
        folder = os.path.dirname(folder)
    for _ in range(4):
        candidate = os.path.join(folder, ITEM_IDS)
        if os.path.isfile(candidate):
            return candidate
        folder = os.path.dirname(folder)
    return None
