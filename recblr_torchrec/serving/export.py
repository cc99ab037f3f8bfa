"""From a training checkpoint to the serving files: scorer.pt, step.pt and manifest.json."""

import copy
import dataclasses
import datetime
import hashlib
import io
import json
import os
import pickle
import platform
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from .. import __version__
from ..kernels import ScanBackend
from ..modules.encoder import RecBLRConfig, set_scan_backend
from ..modules.recblr import RecBLR
from ..training.checkpoint import BEST, checkpoint_dir, load_checkpoint
from .artifacts import RecBLRScorer, RecBLRStep

SCORER = "scorer.pt"
STEP = "step.pt"
MANIFEST = "manifest.json"
SCORER_AOTI = "scorer_aoti.pt2"
FORMAT = "recblr-torchrec-serving/1"


@dataclass
class ExportSource:
    """A trained model as the exporter needs it, whichever checkpoint format it came from."""

    state_dict: Dict[str, torch.Tensor]
    run_config: Dict[str, Any]
    num_embeddings: int
    epoch: int
    path: str
    kind: str  # "local" (a torch.save file) or "distributed" (a torch.distributed.checkpoint folder)


DCP_METADATA = ".metadata"  # the file that marks a torch.distributed.checkpoint folder
DCP_LATEST = "LATEST"  # names the newest complete DCP checkpoint of a folder (distributed/checkpoint.py)
ITEM_TABLE_KEY = "item_embeddings.embeddings.item.weight"


def _latest_dcp(root: str) -> Optional[str]:
    pointer = os.path.join(root, DCP_LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(root, f.read().strip())


def resolve_checkpoint(path: str) -> Tuple[str, str]:
    """(kind, location) of ``path``: a checkpoint file or DCP folder, or a run's --output-dir (its best checkpoint)."""
    if os.path.isfile(path):
        return "local", path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .pt file or a training run's --output-dir")
    for candidate in (os.path.join(checkpoint_dir(path), BEST), os.path.join(path, BEST)):
        if os.path.isfile(candidate):
            return "local", candidate
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        return "distributed", path
    for root in (os.path.join(checkpoint_dir(path), "dcp-best"), path):  # a distributed run's best checkpoints
        latest = _latest_dcp(root)
        if latest is not None and os.path.isfile(os.path.join(latest, DCP_METADATA)):
            return "distributed", latest
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected {os.path.join(checkpoint_dir(path), BEST)} (a local run), "
        f"{os.path.join(checkpoint_dir(path), 'dcp-best', DCP_LATEST)} (a distributed run) "
        f"or a torch.distributed.checkpoint folder (with {DCP_METADATA})"
    )


def _read_dcp(folder: str) -> Dict[str, Any]:
    """A whole DCP checkpoint as one state dict, sharded tables gathered into full tensors (no process group)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        try:
            dcp_to_torch_save(folder, os.path.join(tmp, "full.pt"))
        except (Exception, CheckpointException) as error:
            raise RuntimeError(f"cannot read the distributed checkpoint {folder}: {error}") from error
        return torch.load(os.path.join(tmp, "full.pt"), map_location="cpu", weights_only=False)


def _unpickle(value: Any) -> Any:
    return pickle.loads(value.getvalue() if isinstance(value, io.BytesIO) else value)


def read_distributed(folder: str) -> ExportSource:
    """A distributed run's checkpoint: the model from ``folder``, the run config from the run's training checkpoints.

    ``folder`` is a DCP checkpoint holding ``{"model": DistributedModelParallel.state_dict()}`` (the
    best ones) or the full training state; keys are those of the wrapped module, whose RecBLR sits
    under a prefix that is found from the item table's key.
    """
    full = _read_dcp(folder)
    if "model" not in full:
        raise ValueError(f"{folder} holds no 'model' state; keys: {', '.join(sorted(full))}")
    model_state = full["model"]
    tables = [key for key in model_state if key.endswith(ITEM_TABLE_KEY)]
    if len(tables) != 1:
        raise ValueError(f"{folder}: expected one item table (a key ending in {ITEM_TABLE_KEY}), found {tables}")
    prefix = tables[0][: -len(ITEM_TABLE_KEY)]
    state = {key[len(prefix) :]: value for key, value in model_state.items() if key.startswith(prefix)}
    progress = _unpickle(full["progress"]) if "progress" in full else None
    if progress is None:  # a best checkpoint holds only the model: the run's training checkpoint holds the rest
        run_checkpoints = os.path.dirname(os.path.dirname(os.path.abspath(folder)))
        latest = _latest_dcp(os.path.join(run_checkpoints, "dcp"))
        if latest is None:
            raise FileNotFoundError(
                f"{folder} holds only model weights and no run config was found beside it "
                f"(expected {os.path.join(run_checkpoints, 'dcp', DCP_LATEST)})"
            )
        progress = _unpickle(_read_dcp(latest)["progress"])
    return ExportSource(
        state_dict=state,
        run_config=progress["config"],
        num_embeddings=int(state[ITEM_TABLE_KEY].shape[0]),
        epoch=int(progress["state"].get("best_epoch", progress["state"].get("epoch", 0))),
        path=os.path.abspath(folder),
        kind="distributed",
    )


def read_checkpoint(path: str) -> ExportSource:
    kind, location = resolve_checkpoint(path)
    if kind == "distributed":
        return read_distributed(location)
    ckpt = load_checkpoint(location)
    missing = [key for key in ("model", "config", "num_embeddings") if key not in ckpt]
    if missing:
        raise ValueError(f"{location} is not a recblr-torchrec checkpoint: it lacks {', '.join(missing)}")
    return ExportSource(
        state_dict=ckpt["model"],
        run_config=ckpt["config"],
        num_embeddings=int(ckpt["num_embeddings"]),
        epoch=int(ckpt.get("epoch", 0)),
        path=os.path.abspath(location),
        kind=kind,
    )


def model_from_source(source: ExportSource) -> RecBLR:
    context = source.run_config.get("context", {})
    if context.get("user_buckets", 0):
        raise NotImplementedError(
            f"the run uses context features ({context}); the serving artifacts take item histories only, "
            "so they would score without them: export a run with context.user_buckets=0"
        )
    config = RecBLRConfig(**source.run_config["model"])
    if config.architecture != "recblr":
        raise NotImplementedError(
            f"the run trained model.architecture={config.architecture!r}; the serving artifacts carry "
            "RecBLR's recurrent state, so only architecture=recblr runs can be exported"
        )
    model = RecBLR(source.num_embeddings, config)
    model.load_state_dict(source.state_dict)
    return model.eval()


def serving_modules(model: RecBLR) -> Tuple[RecBLRScorer, RecBLRStep]:
    """The eager (unscripted) scorer and step of a trained model: its encoder with the PyTorch scan, its table."""
    encoder = set_scan_backend(copy.deepcopy(model.encoder).float().eval(), ScanBackend.PYTORCH)
    with torch.no_grad():
        table = model.item_table().detach().float().cpu()
    scorer = RecBLRScorer(encoder, table).eval()
    step = RecBLRStep(copy.deepcopy(encoder), table).eval()
    return scorer, step


def script(module: nn.Module) -> torch.jit.ScriptModule:
    for p in module.parameters():
        p.requires_grad_(False)
    return torch.jit.script(module)


def state_layout(config: RecBLRConfig) -> Dict[str, Any]:
    channels, k = config.expand * config.embedding_dim, config.conv_width
    layers = []
    for layer in range(config.num_layers):
        start = layer * k * channels
        layers.append(
            {
                "layer": layer,
                "conv_tail": {"columns": [start, start + (k - 1) * channels], "shape": [k - 1, channels]},
                "recurrent": {"columns": [start + (k - 1) * channels, start + k * channels], "shape": [channels]},
            }
        )
    return {
        "columns": config.num_layers * k * channels,
        "dtype": "float32",
        "empty_history": "zeros",
        "conv_tail": "the last k-1 conv inputs x of the layer, oldest first, row-major [k-1, D]",
        "layers": layers,
    }


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> Dict[str, str]:
    found = {"recblr_torchrec": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import torchrec

        found["torchrec"] = torchrec.__version__
    except ImportError:
        pass
    return found


def export(checkpoint: str, output_dir: str, aoti_batch: Optional[int] = None, aoti_k: int = 100) -> Dict[str, Any]:
    """Writes DIR/scorer.pt, DIR/step.pt and DIR/manifest.json from a checkpoint; returns the manifest.

    With ``aoti_batch``, also DIR/scorer_aoti.pt2: the scorer through torch.export and AOTInductor
    for that batch size and top-``aoti_k`` (see :mod:`recblr_torchrec.serving.aot`).
    """
    source = read_checkpoint(checkpoint)
    model = model_from_source(source)
    scorer, step = serving_modules(model)
    os.makedirs(output_dir, exist_ok=True)
    for module, name in ((scorer, SCORER), (step, STEP)):
        tmp = os.path.join(output_dir, f".{name}.tmp-{os.getpid()}")
        script(module).save(tmp)
        os.replace(tmp, os.path.join(output_dir, name))
    files: Dict[str, Any] = {"scorer": SCORER, "step": STEP}
    manifest = _manifest(model, source, files)
    _write_manifest(manifest, output_dir)
    if aoti_batch is not None:  # after the TorchScript files and their manifest: a failed compile keeps them
        from .aot import compile_scorer

        compile_scorer(scorer, aoti_k, aoti_batch, os.path.join(output_dir, SCORER_AOTI))
        files["scorer_aoti"] = {
            "file": SCORER_AOTI,
            "batch": aoti_batch,
            "k": aoti_k,
            "load": "torch._inductor.aoti_load_package(path); set AOTI_RUNTIME_CHECK_INPUTS=1 to check shapes",
        }
        _write_manifest(manifest, output_dir)
    return manifest


def _write_manifest(manifest: Dict[str, Any], output_dir: str) -> None:
    tmp = os.path.join(output_dir, f".{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, MANIFEST))


def _manifest(model, source, files: Dict[str, Any]) -> Dict[str, Any]:
    """manifest.json's content; ``files`` is referenced, not copied (export adds the AOTI entry)."""
    config = model.config
    return {
        "format": FORMAT,
        "files": files,
        "load": "torch.jit.load(path); needs only `import torch` (no TorchRec or fbgemm op inside)",
        "model": dataclasses.asdict(config),
        "num_embeddings": source.num_embeddings,
        "num_items": source.num_embeddings - 1,
        "padding_id": 0,
        "trained_max_len": source.run_config.get("data", {}).get("max_len"),
        "state": state_layout(config),
        "checkpoint": {
            "path": source.path,
            "kind": source.kind,
            "epoch": source.epoch,
            "sha256": sha256(source.path) if os.path.isfile(source.path) else None,
        },
        "run_config": source.run_config,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
