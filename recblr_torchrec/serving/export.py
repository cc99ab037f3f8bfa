"""From a training checkpoint to the serving files: scorer.pt, step.pt and manifest.json."""

import copy
import dataclasses
import datetime
import hashlib
import json
import os
import platform
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
    kind: str  # "local" (torch.save file); "distributed" (DCP) is the next reader to add


def resolve_checkpoint(path: str) -> Tuple[str, str]:
    """(kind, location) of ``path``: a checkpoint file, or a run's --output-dir (its best checkpoint)."""
    if os.path.isfile(path):
        return "local", path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a .pt file or a training run's --output-dir")
    for candidate in (os.path.join(checkpoint_dir(path), BEST), os.path.join(path, BEST)):
        if os.path.isfile(candidate):
            return "local", candidate
    for candidate in (path, os.path.join(checkpoint_dir(path), "best"), os.path.join(path, "best")):
        if os.path.isfile(os.path.join(candidate, ".metadata")):  # torch.distributed.checkpoint's marker
            return "distributed", candidate
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected {os.path.join(checkpoint_dir(path), BEST)} (a local run) "
        "or a torch.distributed.checkpoint folder (with .metadata)"
    )


def read_checkpoint(path: str) -> ExportSource:
    kind, location = resolve_checkpoint(path)
    if kind == "distributed":
        raise NotImplementedError(
            f"{location} is a distributed (DCP) checkpoint, which the exporter cannot read yet; "
            "gather it into a local checkpoint first"
        )
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
    model = RecBLR(source.num_embeddings, RecBLRConfig(**source.run_config["model"]))
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
    if aoti_batch is not None:
        from .aot import compile_scorer

        compile_scorer(scorer, aoti_k, aoti_batch, os.path.join(output_dir, SCORER_AOTI))
        files["scorer_aoti"] = {
            "file": SCORER_AOTI,
            "batch": aoti_batch,
            "k": aoti_k,
            "load": "torch._inductor.aoti_load_package(path); set AOTI_RUNTIME_CHECK_INPUTS=1 to check shapes",
        }
    config = model.config
    manifest = {
        "format": FORMAT,
        "files": files,
        "load": "torch.jit.load(path); needs only `import torch` (no TorchRec or fbgemm op inside)",
        "model": dataclasses.asdict(config),
        "num_embeddings": source.num_embeddings,
        "num_items": source.num_embeddings - 1,
        "padding_id": 0,
        "trained_max_len": source.run_config.get("data", {}).get("max_len"),
        "state": state_layout(config),
        "checkpoint": {"path": source.path, "kind": source.kind, "epoch": source.epoch, "sha256": sha256(source.path)},
        "run_config": source.run_config,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(output_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
