"""From a training checkpoint to the serving files: scorer.pt, step.pt and manifest.json."""

import copy
import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ..checkpoint import TrainedModel, read_model
from ..config import config_from_dict
from ..data.ids import ITEM_IDS, find_item_ids, read_item_ids
from ..errors import DataError, UnsupportedRunError
from ..fields import plain
from ..kernels import KernelBackend
from ..modules import EncoderKind, SequenceRecommender, set_kernels
from ..modules.recblr import RecBLRConfig
from ..results import versions
from .artifacts import RecBLRScorer, RecBLRStep
from .ids import ItemIds

SCORER = "scorer.pt"
STEP = "step.pt"
MANIFEST = "manifest.json"
SCORER_AOTI = "scorer_aoti.pt2"
IDS = "ids.pt"
FORMAT = "recblr-torchrec-serving/2"


def model_from_source(source: TrainedModel) -> SequenceRecommender:
    """The trained recommender (eval mode) of a checkpoint whose run can be served."""
    config = config_from_dict(source.run_config)
    if config.context.user_buckets:
        raise UnsupportedRunError(
            f"the run uses context features (context.user_buckets={config.context.user_buckets}); the serving "
            "artifacts take item histories only, so they would score without them: export a run with "
            "context.user_buckets=0"
        )
    if config.model.encoder is not EncoderKind.RECBLR:
        raise UnsupportedRunError(
            f"the run trained model.encoder={config.model.encoder}; the serving artifacts carry RecBLR's "
            "recurrent state, so only model.encoder=recblr runs can be exported"
        )
    model = SequenceRecommender(source.num_embeddings, config.model)
    model.load_state_dict(source.state_dict)
    return model.eval()


def serving_modules(model: SequenceRecommender) -> Tuple[RecBLRScorer, RecBLRStep]:
    """The eager (unscripted) scorer and step of a trained model: its encoder with the PyTorch scan, its table."""
    encoder = set_kernels(copy.deepcopy(model.encoder).float().eval(), KernelBackend.PYTORCH)
    with torch.no_grad():
        table = model.item_table().detach().float().cpu()
    temperature = model.temperature()
    scorer = RecBLRScorer(encoder, table, temperature).eval()
    step = RecBLRStep(copy.deepcopy(encoder), table, temperature).eval()
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


def export(checkpoint: str, output_dir: str, aoti_batch: Optional[int] = None, aoti_k: int = 100) -> Dict[str, Any]:
    """Writes DIR/scorer.pt, DIR/step.pt and DIR/manifest.json from a checkpoint; returns the manifest.
    Where the run folder keeps its item id map, also DIR/ids.pt (:class:`ItemIds`) and a copy of
    DIR/item_ids.tsv, so the artifacts are served in the data file's item ids.

    With ``aoti_batch``, also DIR/scorer_aoti.pt2: the scorer through torch.export and AOTInductor
    for that batch size and top-``aoti_k`` (see :mod:`recblr_torchrec.serving.aot`).
    """
    source = read_model(checkpoint)
    model = model_from_source(source)
    scorer, step = serving_modules(model)
    os.makedirs(output_dir, exist_ok=True)
    _save_scripted(scorer, output_dir, SCORER)
    _save_scripted(step, output_dir, STEP)
    files: Dict[str, Any] = {"scorer": SCORER, "step": STEP}
    id_map = find_item_ids(source.path)
    if id_map is not None:
        names = read_item_ids(id_map)
        if len(names) != source.num_embeddings:
            raise DataError(
                f"{id_map} maps {len(names) - 1} items but the model has {source.num_embeddings - 1}: it belongs "
                "to another run; export from the run folder that trained this checkpoint"
            )
        _save_scripted(ItemIds(names), output_dir, IDS)
        shutil.copyfile(id_map, os.path.join(output_dir, ITEM_IDS))
        files.update(ids=IDS, item_ids=ITEM_IDS)
    else:
        print(
            f"no {ITEM_IDS} in the run folder of {source.path}: the artifacts take and return the model's dense "
            "ids (runs trained by this version write the map)",
            flush=True,
        )
    manifest = _manifest(model, source, files)
    _write_manifest(manifest, output_dir)
    if aoti_batch is not None:  # after the TorchScript files and their manifest: a failed compile keeps them
        from .aot import compile_scorer

        compile_scorer(scorer, aoti_k, aoti_batch, os.path.join(output_dir, SCORER_AOTI))
        files["scorer_aoti"] = {
            "file": SCORER_AOTI,
            "batch": aoti_batch,
            "k": aoti_k,
            "load": "torch._inductor.aoti_load_package(path); up to `batch` users a call; set "
            "AOTI_RUNTIME_CHECK_INPUTS=1 to check shapes and dtypes",
        }
        _write_manifest(manifest, output_dir)
    return manifest


def _save_scripted(module: nn.Module, output_dir: str, name: str) -> None:
    """torch.jit.script's file of ``module`` under a temporary name, then renamed into place."""
    tmp = os.path.join(output_dir, f".{name}.tmp-{os.getpid()}")
    script(module).save(tmp)
    os.replace(tmp, os.path.join(output_dir, name))


def _write_manifest(manifest: Dict[str, Any], output_dir: str) -> None:
    tmp = os.path.join(output_dir, f".{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, MANIFEST))


def _manifest(model, source, files: Dict[str, Any]) -> Dict[str, Any]:
    """manifest.json's content; ``files`` is referenced, not copied (export adds the AOTI entry)."""
    config = model.config.recblr
    return {
        "format": FORMAT,
        "files": files,
        "load": "torch.jit.load(path); needs only `import torch` (no TorchRec or fbgemm op inside)",
        "model": plain(config),
        "score_temperature": model.temperature(),
        "num_embeddings": source.num_embeddings,
        "num_items": source.num_embeddings - 1,
        "padding_id": 0,
        "item_ids": (
            f"{files['ids']} maps the data file's item ids ({files['item_ids']}: dense_id, item_id) to and from "
            "the dense ids the artifacts take and return"
            if "ids" in files
            else "none: the artifacts take and return dense ids"
        ),
        "trained_max_len": source.run_config.get("data", {}).get("max_len"),
        "state": state_layout(config),
        "checkpoint": {
            "path": source.path,
            "kind": source.kind,
            "epoch": source.epoch,
            "sha256": sha256(source.path) if os.path.isfile(source.path) else None,
        },
        "run_config": config_from_dict(source.run_config).to_dict(),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
