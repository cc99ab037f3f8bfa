"""A run's checkpoints: both layouts, which one is newest or best, whether it can be read, and the
fallback when it cannot. Training, distributed training and serving all go through here.

Layouts, under ``<run>/checkpoints/``:

- one process (:class:`LocalCheckpoints`): ``last.pt`` (the whole training state), ``previous.pt``
  (the one before it) and ``best.pt`` (the best model so far: weights, config, epoch), each a
  ``torch.save`` file written under a temporary name and renamed, so a crash never leaves half a
  file in place.
- sharded (:class:`ShardedCheckpoints`): ``dcp/step-<global step>/`` torch.distributed.checkpoint
  (DCP) folders, each rank writing its own shards, with ``dcp/LATEST`` naming the newest complete
  one (replaced by rank 0 only after every rank has written), and ``dcp-best/`` likewise for the
  best model.

A training checkpoint holds tensors (``model``, ``optimizer``) and picklable objects
(``progress``: epoch, step, early-stopping state, history, config; ``rank<r>``: that rank's RNG
states and loss sum). Both layouts keep the two newest: when the newest cannot be read, resuming
says so in one line and takes the one before; when none can, it stops with one line naming them
all (a run is never silently retrained from scratch). A checkpoint set aside as unreadable keeps its
data under another name (``last.pt.unreadable``, ``dcp/unreadable-step-<n>``). Each checkpoint
records its layout (``format``); one of a layout this version does not know is refused.
"""

import dataclasses
import io
import os
import pickle
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import MissingFileError, UserError

FORMAT = "recblr-torchrec/checkpoint/2"
CHECKPOINTS = "checkpoints"
LAST, PREVIOUS, BEST = "last.pt", "previous.pt", "best.pt"
DCP, DCP_BEST, LATEST = "dcp", "dcp-best", "LATEST"
DCP_METADATA = ".metadata"  # the file that marks a complete DCP folder
ITEM_TABLE_KEY = "item_embeddings.embeddings.item.weight"  # locates the model inside a wrapped state dict
KEEP = 2
Checker = Callable[[Dict[str, Any]], None]  # sees a checkpoint's objects; raises to refuse it


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names it and what to do."""


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"


# One process: torch.save files ----------------------------------------------------------------


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a truncated file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_file(path: str, required: Sequence[str] = ("model",)) -> Dict[str, Any]:
    """A checkpoint file of this project, checked: raises :class:`CheckpointError` when it cannot
    be read or lacks ``required`` keys."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, corrupt, not a torch file
        raise CheckpointError(f"checkpoint {path} cannot be read ({_reason(error)})") from error
    if not isinstance(payload, dict) or any(key not in payload for key in required):
        raise CheckpointError(f"{path} is not a recblr-torchrec checkpoint: it lacks {', '.join(required)}")
    check_format(payload.get("format"), path)
    return payload


def check_format(found: Optional[str], path: str) -> None:
    """Refuses a checkpoint of a layout this version does not read (None: written before layouts were recorded)."""
    if found is not None and found != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has the layout {found}; this version of recblr-torchrec reads {FORMAT}: "
            "install the version that wrote it, or train again in another --output-dir"
        )


def _current_layout(payload: Dict[str, Any]) -> Dict[str, Any]:
    """A training checkpoint file in the current layout; files written before ``progress`` and
    ``rank0`` existed kept those entries at the top level and checkpointed epoch ends only."""
    if "progress" in payload:
        return payload
    missing = [key for key in ("state", "history", "config", "rng") if key not in payload]
    if missing:
        raise CheckpointError(f"this checkpoint file lacks {', '.join(missing)}")
    state = {"step": 0, "batch": 0, "in_epoch": None, **payload["state"]}
    progress = {"state": state, "history": payload["history"], "config": payload["config"], "world_size": 1}
    progress["num_embeddings"] = payload.get("num_embeddings")
    return {**payload, "progress": progress, "rank0": {"rng": payload["rng"], "loss_sum": 0.0}}


class LocalCheckpoints:
    """``last.pt`` / ``previous.pt`` / ``best.pt`` of a one-process run (module docstring)."""

    def __init__(self, output_dir: str):
        self.folder = checkpoint_dir(output_dir)

    def save(self, tensors: Dict[str, Any], objects: Dict[str, Any], best: bool = False, step: int = 0) -> str:
        """Writes a training checkpoint (the newest becomes ``previous.pt``) and, with ``best``,
        the best model's file: its weights (``average``'s where the run keeps a weight average),
        config, table size and epoch (from ``progress``)."""
        if best:
            progress = objects["progress"]
            weights = {**tensors["model"], **tensors.get("average", {})}  # averaged ones with train.ema_decay
            model = {"model": weights, "config": progress["config"], "epoch": progress["state"]["epoch"]}
            model.update(num_embeddings=progress["num_embeddings"], format=FORMAT)
            save_atomic(model, os.path.join(self.folder, BEST))
        last, previous = os.path.join(self.folder, LAST), os.path.join(self.folder, PREVIOUS)
        tmp = f"{last}.tmp-{os.getpid()}"
        os.makedirs(self.folder, exist_ok=True)
        torch.save({**tensors, **objects, "format": FORMAT}, tmp)
        if os.path.isfile(last):
            os.replace(last, previous)
        os.replace(tmp, last)
        return last

    def load(
        self, template: Callable[[], Dict[str, Any]], object_keys: Sequence[str], check: Optional[Checker] = None
    ) -> Optional[Dict[str, Any]]:
        """The newest readable training checkpoint as ``{"path", tensor keys, object keys}``, or
        None when the run has none (``template()``'s keys name the tensors to read). ``check``
        sees the objects before any tensor is used and raises to refuse the run."""
        paths = [p for p in (os.path.join(self.folder, name) for name in (LAST, PREVIOUS)) if os.path.isfile(p)]
        if not paths:
            return None
        tensors = template()

        def read(path: str) -> Dict[str, Any]:
            try:
                payload = _current_layout(read_file(path, ("model", "optimizer")))
            except CheckpointError as error:
                raise CheckpointError(f"{path}: {error}" if path not in str(error) else str(error)) from error
            missing = [key for key in list(tensors) + ["progress"] if key not in payload]
            if missing:
                raise CheckpointError(f"{path} lacks {', '.join(missing)}")
            objects = {key: payload[key] for key in object_keys if key in payload}
            if check is not None:
                check(objects)
            return {**{key: payload[key] for key in tensors}, **objects}

        return _newest_readable(paths, read, announce=True, set_aside=_set_aside_file)

    def load_best(self, tensors: Dict[str, Any]) -> Dict[str, Any]:
        """The best model's file as a dict (``model``, ``config``, ``epoch``, ...)."""
        path = os.path.join(self.folder, BEST)
        if not os.path.isfile(path):
            raise CheckpointError(f"no best checkpoint in {self.folder}; train at least one epoch")
        return {**read_file(path), "path": path}


def _set_aside_file(unreadable: List[str], kept: str) -> None:
    for path in unreadable:
        os.replace(path, f"{path}.unreadable")


def _newest_readable(
    candidates: List[str],
    read: Callable[[str], Dict[str, Any]],
    announce: bool,
    set_aside: Optional[Callable[[List[str], str], None]] = None,
) -> Optional[Dict[str, Any]]:
    """``read`` of the first candidate that can be read (newest first), saying in one line which
    were skipped and why, and setting those aside (``set_aside(skipped, kept)``) so that the next
    checkpoint does not take the kept one's place; None without candidates; a
    :class:`CheckpointError` when none can be read."""
    failures: List[str] = []
    for path in candidates:
        try:
            loaded = read(path)
        except CheckpointError as error:
            failures.append(str(error))
            continue
        if failures:
            if announce:
                _say(f"resuming from {path}: {'; '.join(failures)}")
            if set_aside is not None:
                set_aside(candidates[: candidates.index(path)], path)
        return {**loaded, "path": path}
    if failures:
        raise CheckpointError(
            f"no readable checkpoint: {'; '.join(failures)}; restore one, or move the run folder away to start over"
        )
    return None


# Sharded: torch.distributed.checkpoint folders ------------------------------------------------


def _dcp_exception() -> type:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    return CheckpointException


def dcp_folders(root: str, announce: bool = False) -> List[str]:
    """The complete checkpoint folders under ``root``, newest first: the one ``LATEST`` names,
    then the older ``step-*`` folders (a newer one was not finished when ``LATEST`` was last
    written). When ``LATEST`` names a folder that is gone, the older ones remain, and it says so."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return []
    with open(pointer) as f:
        latest = f.read().strip()
    names = sorted((d for d in os.listdir(root) if d.startswith("step-") and d <= latest), reverse=True)
    if latest not in names and announce:
        _say(f"{pointer} names {latest}, which does not exist; looking at the older checkpoints")
    return [os.path.join(root, name) for name in names]


class ShardedCheckpoints:
    """``dcp/`` and ``dcp-best/`` of a sharded run (module docstring). Every rank calls every
    method: saving and loading are collectives."""

    def __init__(self, output_dir: str, rank: int):
        self.root = os.path.join(checkpoint_dir(output_dir), DCP)
        self.best_root = os.path.join(checkpoint_dir(output_dir), DCP_BEST)
        self.rank = rank

    def save(self, tensors: Dict[str, Any], objects: Dict[str, Any], best: bool = False, step: int = 0) -> str:
        """Writes training checkpoint ``step-<step>`` (``objects`` keyed ``rank<r>`` by their rank
        only) and, with ``best``, the model's weights as the best one's."""
        name = f"step-{step:09d}"
        if best:
            self._write({"model": tensors["model"]}, {}, self.best_root, name, keep=1)
        return self._write(tensors, objects, self.root, name, keep=KEEP)

    def _write(self, tensors: Dict[str, Any], objects: Dict[str, Any], root: str, name: str, keep: int) -> str:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        path = os.path.join(root, name)
        full = dict(tensors)
        full.update({key: pickle.dumps(value) for key, value in {**objects, "format": FORMAT}.items()})
        dcp.save(full, checkpoint_id=path)
        dist.barrier()
        if self.rank == 0:
            tmp = os.path.join(root, f"{LATEST}.tmp")
            with open(tmp, "w") as f:
                f.write(name)
            os.replace(tmp, os.path.join(root, LATEST))
            old = sorted(d for d in os.listdir(root) if d.startswith("step-") and d != name)
            for stale in old[: max(0, len(old) - (keep - 1))]:  # a 10M-row table is gigabytes per copy
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        dist.barrier()
        return path

    def _read(
        self, tensors: Dict[str, Any], object_keys: Sequence[str], path: str, check: Optional[Checker] = None
    ) -> Dict[str, Any]:
        """The objects the checkpoint ``path`` holds (a rank that did not exist when it was written
        finds no objects of its own), passed to ``check``, then its tensors loaded into ``tensors``
        in place."""
        import torch.distributed.checkpoint as dcp

        def load(state: Dict[str, Any]) -> None:
            try:
                dcp.load(state, checkpoint_id=path)
            except (Exception, _dcp_exception()) as error:
                raise CheckpointError(f"checkpoint {path} cannot be read ({_reason(error)})") from error

        try:
            saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        except Exception as error:
            raise CheckpointError(f"checkpoint {path} cannot be read ({_reason(error)})") from error
        present = [key for key in (*object_keys, "format") if key in saved]
        raw = {key: b"" for key in present}
        if raw:
            load(raw)
        objects = {key: pickle.loads(raw[key]) for key in present}
        check_format(objects.pop("format", None), path)
        if check is not None:
            check(objects)
        full = dict(tensors)
        load(full)
        for key in tensors:
            tensors[key] = full[key]
        return {**tensors, **objects}

    def _set_aside(self, unreadable: List[str], kept: str) -> None:
        """Renames the unreadable folders (``unreadable-step-<n>``) and points ``LATEST`` at ``kept``."""
        import torch.distributed as dist

        if self.rank == 0:
            for path in unreadable:
                if os.path.isdir(path):
                    os.replace(path, os.path.join(os.path.dirname(path), f"unreadable-{os.path.basename(path)}"))
            root = os.path.dirname(kept)
            tmp = os.path.join(root, f"{LATEST}.tmp")
            with open(tmp, "w") as f:
                f.write(os.path.basename(kept))
            os.replace(tmp, os.path.join(root, LATEST))
        dist.barrier()

    def load(
        self, template: Callable[[], Dict[str, Any]], object_keys: Sequence[str], check: Optional[Checker] = None
    ) -> Optional[Dict[str, Any]]:
        """The newest readable training checkpoint loaded into ``template()`` (in place, built only
        when there is a checkpoint), with the objects named by ``object_keys`` it holds; None when
        the run has none. ``check`` sees the objects before any tensor is loaded and raises to
        refuse the run."""
        folders = dcp_folders(self.root, announce=self.rank == 0)
        if not folders:
            return None
        tensors = template()
        return _newest_readable(
            folders, lambda path: self._read(tensors, object_keys, path, check), self.rank == 0, self._set_aside
        )

    def load_best(self, tensors: Dict[str, Any]) -> Dict[str, Any]:
        best = _newest_readable(dcp_folders(self.best_root), lambda path: self._read(tensors, (), path), False)
        if best is None:
            raise CheckpointError(f"no best checkpoint in {self.best_root}; train at least one epoch")
        return best


# Serving: a trained model from any of these -----------------------------------------------------


@dataclasses.dataclass
class TrainedModel:
    """A trained model's weights and run config, whichever layout it came from."""

    state_dict: Dict[str, torch.Tensor]
    run_config: Dict[str, Any]
    num_embeddings: int
    epoch: int
    path: str
    kind: str  # "local" (a torch.save file) or "distributed" (a DCP folder)


def find_model(path: str) -> Tuple[str, str]:
    """(kind, location) of the model ``path`` names: a checkpoint file, a DCP folder, or a run
    folder (its best model)."""
    if os.path.isfile(path):
        return "local", path
    if not os.path.isdir(path):
        raise MissingFileError(f"checkpoint {path} does not exist; pass a .pt file or a training run's --output-dir")
    for candidate in (os.path.join(checkpoint_dir(path), BEST), os.path.join(path, BEST)):
        if os.path.isfile(candidate):
            return "local", candidate
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        return "distributed", path
    for root in (os.path.join(checkpoint_dir(path), DCP_BEST), path):
        folders = dcp_folders(root)
        if folders and os.path.isfile(os.path.join(folders[0], DCP_METADATA)):
            return "distributed", folders[0]
    raise MissingFileError(
        f"no checkpoint in {path}: expected {os.path.join(checkpoint_dir(path), BEST)} (a local run), "
        f"{os.path.join(checkpoint_dir(path), DCP_BEST, LATEST)} (a distributed run) "
        f"or a torch.distributed.checkpoint folder (with {DCP_METADATA})"
    )


def read_model(path: str) -> TrainedModel:
    """The trained model ``path`` names (:func:`find_model`), read without a process group."""
    kind, location = find_model(path)
    if kind == "distributed":
        return _read_dcp_model(location)
    payload = read_file(location)
    if "progress" in payload or "state" in payload:  # a training checkpoint (last.pt, previous.pt)
        progress = _current_layout(payload)["progress"]
        config, num_embeddings, epoch = progress["config"], progress["num_embeddings"], progress["state"]["epoch"]
    elif "config" in payload:  # a best model's file
        config, num_embeddings, epoch = payload["config"], payload.get("num_embeddings"), payload.get("epoch")
    else:
        raise CheckpointError(f"{location} is not a recblr-torchrec checkpoint: it holds no run config")
    if epoch is None:
        raise CheckpointError(f"{location} does not record its epoch: export the run's checkpoints/last.pt instead")
    if num_embeddings is None:  # files of the oldest layout: the table's rows
        if ITEM_TABLE_KEY not in payload["model"]:
            raise CheckpointError(f"{location} records no item table size and holds no {ITEM_TABLE_KEY}")
        num_embeddings = payload["model"][ITEM_TABLE_KEY].shape[0]
    return TrainedModel(
        state_dict=payload["model"],
        run_config=config,
        num_embeddings=int(num_embeddings),
        epoch=int(epoch),
        path=os.path.abspath(location),
        kind=kind,
    )


def read_dcp(folder: str) -> Dict[str, Any]:
    """A whole DCP checkpoint as one state dict, sharded tables gathered into full tensors (no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        try:
            dcp_to_torch_save(folder, os.path.join(tmp, "full.pt"))
        except (Exception, _dcp_exception()) as error:
            raise CheckpointError(f"cannot read the distributed checkpoint {folder}: {_reason(error)}") from error
        return torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=False)


def _unpickle(value: Any) -> Any:
    return pickle.loads(value.getvalue() if isinstance(value, io.BytesIO) else value)


def _read_dcp_model(folder: str) -> TrainedModel:
    """A sharded run's model from ``folder`` (a best checkpoint, or a full training one); the run
    config from the training checkpoint beside it when ``folder`` holds weights only. Keys are the
    wrapped module's; the model's prefix is found from the item table's key."""
    full = read_dcp(folder)
    if "model" not in full:
        raise CheckpointError(f"{folder} holds no 'model' state; keys: {', '.join(sorted(full))}")
    model_state = full["model"]
    tables = [key for key in model_state if key.endswith(ITEM_TABLE_KEY)]
    if len(tables) != 1:
        raise CheckpointError(f"{folder}: expected one item table (a key ending in {ITEM_TABLE_KEY}), found {tables}")
    prefix = tables[0][: -len(ITEM_TABLE_KEY)]
    state = {key[len(prefix) :]: value for key, value in model_state.items() if key.startswith(prefix)}
    if "progress" in full:
        progress = _unpickle(full["progress"])
    else:  # a best checkpoint holds only the model: the run's training checkpoint holds the rest
        run_checkpoints = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
        training = dcp_folders(os.path.join(run_checkpoints, DCP))
        if not training:
            raise MissingFileError(
                f"{folder} holds only model weights and no run config was found beside it "
                f"(expected {os.path.join(run_checkpoints, DCP, LATEST)})"
            )
        progress = _unpickle(read_dcp(training[0])["progress"])
    return TrainedModel(
        state_dict=state,
        run_config=progress["config"],
        num_embeddings=int(state[ITEM_TABLE_KEY].shape[0]),
        epoch=int(progress["state"]["epoch" if "progress" in full else "best_epoch"]),  # training or best folder
        path=os.path.abspath(folder),
        kind="distributed",
    )
