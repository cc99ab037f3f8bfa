"""Run configuration: small dataclasses, filled from YAML and ``--set key=value`` overrides.

YAML stays at the edge (launchers, configs/); modules receive these dataclasses.
"""

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from .data.sequences import TIE_ORDERS
from .data.synthetic import SyntheticConfig
from .modules.encoder import RecBLRConfig
from .modules.recblr import ContextConfig

DATA_DIR_ENV = "RECBLR_DATA_DIR"
OPTIMIZERS = ("adam", "adamw", "adagrad", "sgd")
PRECISIONS = ("fp32", "tf32", "bf16")
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")


@dataclass
class DataConfig:
    """Where the interactions come from and how they are turned into sequences.

    Args:
        path: dataset file, relative to the data directory (``--data-dir`` or $RECBLR_DATA_DIR)
            unless absolute, e.g. ``ml-1m/ml-1m.txt.gz``.
        format: ``auto`` (from the file name), ``seq`` (line per user), ``inter`` (RecBole
            atomic), ``ratings`` (MovieLens ``::``-separated ratings.dat) or ``synthetic``
            (generated from ``synthetic``, no file: the large-catalog workload).
        min_user_interactions / min_item_interactions: iterative k-core thresholds.
        max_len: T, the most recent items a sequence keeps.
        cache_dir: where CSR arrays are cached as .npy (default ~/.cache/recblr-torchrec).
        max_users: keep only the first users (after filtering) for quick runs; 0 keeps all.
        tie_order: interactions with the same timestamp keep the ``file`` order (RecBole) or are
            sorted by ``item`` id (LRURec's ML-1M); SEQ files carry no timestamps (no ties).
            ``shuffled_runs``: the ``item`` order, then each run of ascending item ids shuffled (seeded),
            emulating RecBole's same-second order on a copy that sorted such groups by item id
            (our ML-1M; README, "Results").
    """

    path: str = "ml-1m/ml-1m.txt.gz"
    format: str = "auto"
    min_user_interactions: int = 5
    min_item_interactions: int = 5
    max_len: int = 200
    cache_dir: str = ""
    max_users: int = 0
    tie_order: str = "file"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class TrainConfig:
    """Optimisation and the training protocol.

    protocol: ``all_positions`` (causal loss at every position of each training sequence) or
    ``prefixes`` (the paper's RecBole protocol: one target per prefix, last T items kept).
    ``micro_batch_size``: sequences per forward/backward when accumulating gradients over a
    batch (0 = the whole batch at once); the update equals the whole batch's, in less memory.
    ``optimizer``: the dense optimizer (and the local table's): ``adam``, ``adamw`` (decoupled
    ``weight_decay``), ``adagrad`` or ``sgd``; ``weight_decay``: 0 (the paper's) or the decay (in
    distributed runs also given to the tables' fused optimizer: see ``distributed.sharding``).
    ``loss``: ``full`` (softmax over the whole catalog, the paper's) or ``sampled`` (in-batch
    deduplicated targets plus ``num_negatives`` drawn by ``negative_sampler``, ``uniform`` or
    ``popularity``, with log-Q correction and accidental hits masked), for large catalogs.
    ``label_smoothing``: epsilon in [0, 1) of each target's probability spread uniformly over the
    real items (0 = none, the paper's; ``loss: full`` only).
    ``checkpoint_every``: also checkpoint every that many steps inside an epoch (0 = epoch ends).
    ``max_steps_per_epoch``: distributed runs end each epoch after that many steps (0 = all);
    for throughput measurements.
    ``batch_size`` is the global batch: in distributed runs each rank takes its slice of it.
    ``precision``: ``fp32``; ``tf32`` (float32 tensors, the float32 matmuls of forward and backward
    on TF32 tensor cores: ``torch.set_float32_matmul_precision("high")`` for the process); or
    ``bf16`` (the forward and backward under bfloat16 autocast: matmuls and the fused recurrence
    read bfloat16, the recurrent state, LayerNorm, softmax sums and the parameters stay float32).
    ``compile``: ``off`` (also ``false``), or a ``torch.compile`` backend (``inductor``, also
    ``true``; on the GPU) for the encoder: its LayerNorms, FFN, dropout, gates and conv become a
    few generated kernels around the fused recurrence, which stays one opaque op; the TorchRec
    lookups and the loss stay eager. The first steps pay the compilation (about a minute), and a
    recompilation when batch shapes start to vary.
    ``cuda_graphs``: replay the whole training step (forward, backward, Adam) from CUDA graphs
    (``recblr_torchrec.training.graphs``): one launch instead of ~1,200 host operators, for steps
    bound by the host.
    Training batches get filler sequences that round their positions up to a multiple of
    ``graph_quantum`` (same loss and gradients), so a few shapes repeat and each is captured once
    after two eager steps. All-positions batches take the loss at every position of the padded
    batch, fillers' ignored, so their target count varies inside a fixed shape. The quantum trades
    shapes for padding: 8,192 suits the paper's ML-1M prefix batches (~243k positions: 3 shapes,
    1.7% padding), 1,024 all-positions batches of 128 ML-1M windows (~14.5k positions: 6 shapes,
    3.6%). GPU only; single-process runs (RecBLR, or the SASRec-style encoder, whose padding is
    then fixed at ``data.max_len``) with ``loss: full``, no micro-batches, and ``optimizer:
    adam``/``adamw`` (built capturable) or ``sgd``; the learning rate is frozen into the graphs.
    A run may resume with it switched on or off.
    ``time_budget_s``: stop after the epoch at which the run's training time (evaluation not
    counted) reaches this many seconds; 0 = no budget. Early stopping and ``max_epochs`` still apply.
    """

    protocol: str = "all_positions"
    batch_size: int = 2048
    micro_batch_size: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 300
    patience: int = 10
    seed: int = 2024
    device: str = "auto"
    num_workers: int = 2
    log_every: int = 10
    optimizer: str = "adam"
    loss: str = "full"
    num_negatives: int = 1024
    label_smoothing: float = 0.0
    negative_sampler: str = "uniform"
    checkpoint_every: int = 0
    max_steps_per_epoch: int = 0
    precision: str = "fp32"
    time_budget_s: float = 0.0
    compile: str = field(default="off", metadata={"booleans": {False: "off", True: "inductor"}})
    cuda_graphs: bool = False
    graph_quantum: int = 8192


@dataclass
class EvalConfig:
    """Full-ranking evaluation (SPEC.md section 3); ``max_users`` > 0 evaluates the first users only
    (for catalogs too large to rank for every user on a CPU). ``every``: validate after every that
    many epochs (and after the last); ``train.patience`` counts validations."""

    ks: List[int] = field(default_factory=lambda: [10, 20])
    every: int = 1
    max_users: int = 0
    batch_size: int = 1024
    item_chunk_size: int = 65536
    valid_metric: str = "NDCG@10"


@dataclass
class DistributedConfig:
    """Sharding and the fused sparse optimizer, used when the run is launched by torchrun/TorchX.

    Args:
        sharding_types: table name -> allowed TorchRec sharding type (``table_wise``,
            ``row_wise``, ``column_wise``, ``table_row_wise``, ...); unnamed tables are left to
            the planner. Tables: ``item`` (the item table) and ``context_<feature>``.
        compute_kernels: table name -> compute kernel (``fused`` by default, the kernel whose
            optimizer is applied in the backward pass).
        sparse_optimizer: the fused optimizer of the tables: ``sgd``, ``adagrad``,
            ``rowwise_adagrad`` (CPU and GPU) or ``adam`` (GPU only).
        sparse_lr: its learning rate (0 = train.lr).
        backend: ``auto`` (gloo on CPU, NCCL on GPU), ``gloo`` or ``nccl``.
        timeout_s: process-group timeout; a failure on one rank frees the others after it.
        pipeline: ``auto`` (TrainPipelineSparseDist on GPU, plain steps on CPU), ``sparse_dist``
            or ``none``.
    """

    sharding_types: Dict[str, str] = field(default_factory=dict)
    compute_kernels: Dict[str, str] = field(default_factory=dict)
    sparse_optimizer: str = "rowwise_adagrad"
    sparse_lr: float = 0.0
    backend: str = "auto"
    timeout_s: int = 600
    pipeline: str = "auto"


@dataclass
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: RecBLRConfig = field(default_factory=RecBLRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    context: ContextConfig = field(default_factory=ContextConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _fill(cls: type, values: Dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown config key {where}.{key}; known keys: {', '.join(sorted(fields))}")
        sub = fields[key].type
        if dataclasses.is_dataclass(sub):
            kwargs[key] = _fill(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _check_types(obj: Any, where: str) -> None:
    defaults = type(obj)()
    for f in dataclasses.fields(obj):
        value, default = getattr(obj, f.name), getattr(defaults, f.name)
        name = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            _check_types(value, name)
        elif isinstance(value, bool) and "booleans" in f.metadata:  # YAML reads off/no/false as False
            setattr(obj, f.name, f.metadata["booleans"][value])
        elif isinstance(default, bool) or isinstance(value, bool):
            if not isinstance(value, bool) or not isinstance(default, bool):
                raise ValueError(f"{name}={value!r} must be a {type(default).__name__}")
        elif isinstance(default, float) and isinstance(value, (int, str)):
            try:  # YAML reads 3e-4 (no dot) as a string
                setattr(obj, f.name, float(value))
            except ValueError:
                raise ValueError(f"{name}={value!r} must be a float") from None
        elif not isinstance(value, type(default)):
            raise ValueError(f"{name}={value!r} must be a {type(default).__name__}")


def parse_override(item: str) -> tuple:
    """``'train.lr=3e-4'`` -> (['train', 'lr'], 0.0003); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_with_base(path: str, _seen: tuple = ()) -> Dict[str, Any]:
    """Reads a YAML config; a ``base: other.yaml`` key (relative to the file) is merged under it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist; see configs/ for examples")
    if os.path.abspath(path) in _seen:
        raise ValueError(f"config {path} includes itself through base:")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = os.path.join(os.path.dirname(path), base)
    return _merge(read_yaml_with_base(parent, _seen + (os.path.abspath(path),)), raw)


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """Reads a YAML config (or the defaults) and applies ``section.key=value`` overrides."""
    raw = read_yaml_with_base(path) if path is not None else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    config = _fill(RunConfig, raw, "config")
    _check_types(config, "")
    validate_config(config)
    return config


def validate_config(config: RunConfig) -> None:
    """Rejects values that would fail later, naming the key and the fix."""
    t, m, d = config.train, config.model, config.data
    if t.protocol not in ("all_positions", "prefixes"):
        raise ValueError(f"train.protocol={t.protocol!r}; choose all_positions or prefixes")
    for name, value in (
        ("train.batch_size", t.batch_size),
        ("data.max_len", d.max_len),
        ("model.embedding_dim", m.embedding_dim),
        ("model.num_layers", m.num_layers),
        ("model.expand", m.expand),
        ("model.conv_width", m.conv_width),
        ("eval.batch_size", config.eval.batch_size),
        ("eval.item_chunk_size", config.eval.item_chunk_size),
        ("eval.every", config.eval.every),
    ):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    from .kernels import ScanBackend
    from .modules.recblr import ARCHITECTURES

    ScanBackend.parse(m.scan_backend)
    if m.architecture not in ARCHITECTURES:
        raise ValueError(f"model.architecture={m.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
    if m.architecture == "sasrec":
        if m.embedding_dim % m.num_heads:
            raise ValueError(
                f"model.embedding_dim={m.embedding_dim} must be divisible by model.num_heads={m.num_heads}"
            )
        if m.max_positions < d.max_len:
            raise ValueError(f"model.max_positions={m.max_positions} must be >= data.max_len={d.max_len} for sasrec")
    if t.micro_batch_size < 0:
        raise ValueError(f"train.micro_batch_size={t.micro_batch_size} must be >= 0 (0 = no accumulation)")
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"model.dropout={m.dropout} must be in [0, 1)")
    if t.lr <= 0:
        raise ValueError(f"train.lr={t.lr} must be > 0")
    if t.weight_decay < 0:
        raise ValueError(f"train.weight_decay={t.weight_decay} must be >= 0 (0 = none, the paper's)")
    if t.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer={t.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if d.tie_order not in TIE_ORDERS:
        raise ValueError(f"data.tie_order={d.tie_order!r}; choose one of {', '.join(TIE_ORDERS)}")
    if t.precision not in PRECISIONS:
        raise ValueError(f"train.precision={t.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if t.compile != "off":
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if t.compile not in backends:
            choices = ", ".join(backends)
            raise ValueError(f"train.compile={t.compile!r}; choose off or a torch.compile backend: {choices}")
    if t.cuda_graphs:
        reasons = {
            "train.loss=sampled (its candidate count varies; use full)": t.loss == "sampled",
            f"train.micro_batch_size={t.micro_batch_size} (use 0)": t.micro_batch_size != 0,
            f"train.optimizer={t.optimizer} (use adam, adamw or sgd)": t.optimizer not in ("adam", "adamw", "sgd"),
        }
        for reason, bad in reasons.items():
            if bad:
                raise ValueError(
                    f"train.cuda_graphs=true cannot capture a step with {reason}, or set train.cuda_graphs=false"
                )
        if t.graph_quantum < 1:
            raise ValueError(
                f"train.graph_quantum={t.graph_quantum} must be >= 1 (positions a graphed batch rounds up to)"
            )
    if t.time_budget_s < 0:
        raise ValueError(f"train.time_budget_s={t.time_budget_s} must be >= 0 (0 = no budget)")
    if t.loss not in ("full", "sampled"):
        raise ValueError(f"train.loss={t.loss!r}; choose full or sampled")
    if t.negative_sampler not in ("uniform", "popularity"):
        raise ValueError(f"train.negative_sampler={t.negative_sampler!r}; choose uniform or popularity")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise ValueError(f"train.label_smoothing={t.label_smoothing} must be in [0, 1) (0 = none, the paper's)")
    if t.loss == "sampled" and t.label_smoothing:
        raise ValueError(
            f"train.label_smoothing={t.label_smoothing} needs train.loss=full; set train.label_smoothing=0 with sampled"
        )
    if t.loss == "sampled" and t.num_negatives < 1:
        raise ValueError(f"train.num_negatives={t.num_negatives} must be >= 1 with train.loss=sampled")
    if config.context.join not in ("input", "output"):
        raise ValueError(f"context.join={config.context.join!r}; choose input or output")
    if config.context.user_buckets < 0 or config.context.embedding_dim < 0:
        raise ValueError("context.user_buckets and context.embedding_dim must be >= 0 (0 = off / the model's d)")
    dc = config.distributed
    if dc.sparse_optimizer not in SPARSE_OPTIMIZERS:
        raise ValueError(
            f"distributed.sparse_optimizer={dc.sparse_optimizer!r}; choose one of {', '.join(SPARSE_OPTIMIZERS)}"
        )
    if dc.backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"distributed.backend={dc.backend!r}; choose auto, gloo or nccl")
    if dc.pipeline not in ("auto", "sparse_dist", "none"):
        raise ValueError(f"distributed.pipeline={dc.pipeline!r}; choose auto, sparse_dist or none")
    valid_names = {f"{n}@{k}" for n in ("HR", "NDCG", "MRR") for k in config.eval.ks}
    if config.eval.valid_metric not in valid_names:
        raise ValueError(
            f"eval.valid_metric={config.eval.valid_metric!r} is not computed; choose one of "
            f"{', '.join(sorted(valid_names))}"
        )


def resolve_data_dir(flag: Optional[str]) -> Optional[str]:
    """The data directory: ``--data-dir``, else $RECBLR_DATA_DIR, else None (paths must be absolute)."""
    return flag or os.environ.get(DATA_DIR_ENV) or None
