"""Run configuration: small typed dataclasses, filled from YAML and ``--set key=value`` overrides.

YAML stays at the edge (launchers, configs/); modules receive these dataclasses. Every choice is a
string enum and every dataclass checks its own values in ``__post_init__`` (``fields.py``), so a
config that exists is valid; :class:`RunConfig` adds the checks that span sections.
"""

import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from .data.synthetic import SyntheticConfig
from .errors import ConfigError, MissingFileError
from .fields import Choice, choose, fill, plain, require, typed_fields
from .modules.recommender import ContextConfig, EncoderKind, ModelConfig

DATA_DIR_ENV = "RECBLR_DATA_DIR"


DataFormat = Choice(
    "DataFormat", {"AUTO": "auto", "SEQ": "seq", "INTER": "inter", "RATINGS": "ratings", "SYNTHETIC": "synthetic"}
)


TieOrder = Choice("TieOrder", {"FILE": "file", "ITEM": "item", "SHUFFLED_RUNS": "shuffled_runs"})


@dataclass
class DataConfig:
    """Where the interactions come from and how they are turned into sequences.

    Args:
        path: dataset file, relative to the data directory (``--data-dir`` or $RECBLR_DATA_DIR)
            unless absolute, e.g. ``ml-1m/ml-1m_stable.txt.gz``.
        format: ``auto`` (from the file name), ``seq`` (line per user), ``inter`` (RecBole
            atomic), ``ratings`` (MovieLens ``::``-separated ratings.dat) or ``synthetic``
            (generated from ``synthetic``, no file: the large-catalog workload).
        min_user_interactions / min_item_interactions: iterative k-core thresholds.
        max_len: T, the most recent items a sequence keeps.
        cache_dir: where CSR arrays are cached as .npy (default ~/.cache/recblr-torchrec).
        max_users: keep only the first users (after filtering) for quick runs; 0 keeps all.
        tie_order: interactions with the same timestamp keep the ``file`` order (RecBole) or are
            sorted by ``item`` id (LRURec's ML-1M); SEQ files carry no timestamps (no ties).
            ``shuffled_runs``: the ``item`` order, then each run of ascending item ids shuffled
            (seeded), emulating RecBole's same-second order on a copy that sorted such groups by
            item id (``data.sequences.shuffle_ascending_runs``).
    """

    path: str = "ml-1m/ml-1m_stable.txt.gz"
    format: DataFormat = DataFormat.AUTO
    min_user_interactions: int = 5
    min_item_interactions: int = 5
    max_len: int = 200
    cache_dir: str = ""
    max_users: int = 0
    tie_order: TieOrder = TieOrder.FILE
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        typed_fields(self, "data")
        require(self.max_len >= 1, f"data.max_len={self.max_len} must be >= 1")
        require(self.max_users >= 0, f"data.max_users={self.max_users} must be >= 0 (0 keeps every user)")
        require(
            self.min_user_interactions >= 3,
            f"data.min_user_interactions={self.min_user_interactions} must be >= 3: leave-one-out needs a "
            "training item, a validation target and a test target per user",
        )
        require(
            self.min_item_interactions >= 1, f"data.min_item_interactions={self.min_item_interactions} must be >= 1"
        )


Protocol = Choice("Protocol", {"ALL_POSITIONS": "all_positions", "PREFIXES": "prefixes"})


Optimizer = Choice("Optimizer", {"ADAM": "adam", "ADAMW": "adamw", "ADAGRAD": "adagrad", "SGD": "sgd"})


Loss = Choice("Loss", {"FULL": "full", "SAMPLED": "sampled"})


NegativeSampler = Choice("NegativeSampler", {"UNIFORM": "uniform", "POPULARITY": "popularity"})


Precision = Choice("Precision", {"AUTO": "auto", "FP32": "fp32", "TF32": "tf32", "BF16": "bf16"})


Switch = Choice("Switch", {"AUTO": "auto", "ON": "on", "OFF": "off"})


LRSchedule = Choice("LRSchedule", {"CONSTANT": "constant", "COSINE": "cosine"})


@dataclass
class TrainConfig:
    """Optimisation and the training protocol.

    protocol: ``all_positions`` (causal loss at every position of each training sequence) or
    ``prefixes`` (the paper's RecBole protocol: one target per prefix, last T items kept).
    ``window_context``: ``all_positions`` only: C < ``data.max_len``; a history longer than T is
    cut into chunks of T - C targets, each read with up to C items before it as context (no loss
    on them), so no target predicts from fewer items than the history holds, up to C
    (``recblr_torchrec.data.samples.training_samples``); 0 = disjoint windows of T.
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
    ``max_steps_per_epoch``: end each epoch after that many steps (0 = all); for throughput
    measurements.
    ``batch_size`` is the global batch: in distributed runs each rank takes its slice of it.
    ``lr_schedule``: ``constant`` (the paper's) or ``cosine`` (from ``lr`` down to 0 at the end
    of the run's last epoch); ``warmup_steps``: the learning rate rises linearly from ``lr /
    warmup_steps`` to ``lr`` over the first steps (0 = none). Both scale every optimizer's rate,
    the tables' fused optimizer included; a run continued with another ``max_epochs`` or
    ``max_steps`` follows the cosine of its new length from its step on (its rate jumps to that curve's).
    ``max_steps``: the run's length in optimizer steps, rounded up to whole epochs (0 = none):
    training ends with the epoch in which the step count reaches it (or at ``max_epochs``, if
    sooner), so one setting gives datasets of any size the same number of updates and the same
    cosine.
    ``precision``: ``auto`` (``bf16`` on a CUDA device that supports it, else ``fp32``), ``fp32``;
    ``tf32`` (float32 tensors, the float32 matmuls of forward and backward on TF32 tensor cores:
    ``torch.set_float32_matmul_precision("high")`` for the process); or ``bf16`` (the forward and
    backward under bfloat16 autocast: matmuls and the fused recurrence read bfloat16, the recurrent
    state, LayerNorm, softmax sums and the parameters stay float32). bf16 was measured level with
    fp32 in quality (docs/results.md).
    ``compile``: ``off`` (also ``false``), or a ``torch.compile`` backend (``inductor``, also
    ``true``; on the GPU) for the encoder: its LayerNorms, FFN, dropout, gates and conv become a
    few generated kernels around the fused recurrence, which stays one opaque op; the TorchRec
    lookups and the loss stay eager. The first steps pay the compilation (about a minute), and a
    recompilation when batch shapes start to vary.
    ``cuda_graphs``: ``on`` (also ``true``): replay the whole training step (forward, backward,
    Adam) from CUDA graphs (``recblr_torchrec.training.graphs``): one launch instead of ~1,200 host
    operators, for steps bound by the host; ``off`` (also ``false``); ``auto``: on where the run
    supports it (the conditions below), else off.
    Training batches get filler sequences that round their positions up to a multiple of
    ``graph_quantum`` (same loss and gradients), so a few shapes repeat and each is captured once
    after two eager steps. All-positions batches take the loss at every position of the padded
    batch, fillers' ignored, so their target count varies inside a fixed shape. The quantum trades
    shapes for padding: 8,192 suits the paper's ML-1M prefix batches (~243k positions: 3 shapes,
    1.7% padding), 1,024 all-positions batches of 128 ML-1M windows (~14.5k positions: 6 shapes,
    3.6%). A sampled candidate set is padded to a multiple of the quantum too. GPU only: one
    process (RecBLR, or the SASRec-style encoder, whose padding is then fixed at
    ``data.max_len``), or, with ``on`` only (``auto`` keeps them eager), a sharded run's pipelined
    steps, whose dense part (everything after the lookups) is captured
    (``recblr_torchrec/distributed/dense_step.py``); no micro-batches,
    and ``optimizer: adam``/``adamw`` (built capturable: the learning rate is a tensor on the
    device, so setting it between steps reaches the replays) or ``sgd`` (its learning rate is
    frozen into the graphs).
    A run may resume with it switched on or off.
    ``ema_decay``: evaluate, keep and serve an exponential moving average of the weights, updated
    after every optimizer step with this decay (0 = off, the paper's; e.g. 0.999 averages over about
    the last thousand updates): ``recblr_torchrec/training/averaging.py``. One-process runs only.
    ``time_budget_s``: stop after the epoch at which the run's training time (evaluation not
    counted) reaches this many seconds; 0 = no budget. Early stopping, ``max_epochs`` and ``max_steps``
    still apply.
    ``device``: ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``.
    """

    protocol: Protocol = Protocol.ALL_POSITIONS
    window_context: int = 0
    batch_size: int = 2048
    micro_batch_size: int = 0
    lr: float = 1e-3
    lr_schedule: LRSchedule = LRSchedule.CONSTANT
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_epochs: int = 300
    max_steps: int = 0
    patience: int = 10
    seed: int = 2024
    device: str = "auto"
    num_workers: int = 2
    log_every: int = 10
    optimizer: Optimizer = Optimizer.ADAM
    loss: Loss = Loss.FULL
    num_negatives: int = 1024
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    negative_sampler: NegativeSampler = NegativeSampler.UNIFORM
    checkpoint_every: int = 0
    max_steps_per_epoch: int = 0
    precision: Precision = Precision.AUTO
    time_budget_s: float = 0.0
    compile: str = field(default="off", metadata={"booleans": {False: "off", True: "inductor"}})
    cuda_graphs: Switch = field(default=Switch.AUTO, metadata={"booleans": {False: "off", True: "on"}})
    graph_quantum: int = 8192

    def __post_init__(self) -> None:
        typed_fields(self, "train")
        for name in ("batch_size", "max_epochs", "patience", "log_every"):
            require(getattr(self, name) >= 1, f"train.{name}={getattr(self, name)} must be >= 1")
        for name in (
            "micro_batch_size",
            "num_workers",
            "checkpoint_every",
            "max_steps_per_epoch",
            "warmup_steps",
            "max_steps",
            "window_context",
        ):
            require(getattr(self, name) >= 0, f"train.{name}={getattr(self, name)} must be >= 0 (0 = off)")
        require(math.isfinite(self.lr) and self.lr > 0, f"train.lr={self.lr} must be a finite number > 0")
        require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"train.weight_decay={self.weight_decay} must be >= 0 (0 = none, the paper's)",
        )
        require(
            self.device == "auto" or self.device == "cpu" or _is_cuda_name(self.device),
            f"train.device={self.device!r}; choose auto, cpu, cuda or cuda:N",
        )
        if self.compile != "off":
            import torch._dynamo

            backends = torch._dynamo.list_backends(exclude_tags=())
            require(
                self.compile in backends,
                f"train.compile={self.compile!r}; choose off or a torch.compile backend: {', '.join(backends)}",
            )
        blockers = self.graph_blockers() if self.cuda_graphs == "on" else []
        if blockers:
            raise ConfigError(
                f"train.cuda_graphs=on cannot capture a step with {blockers[0]}, or set train.cuda_graphs=auto or off"
            )
        if self.cuda_graphs != "off":
            require(
                self.graph_quantum >= 1,
                f"train.graph_quantum={self.graph_quantum} must be >= 1 (positions a graphed batch rounds up to)",
            )
        require(self.time_budget_s >= 0, f"train.time_budget_s={self.time_budget_s} must be >= 0 (0 = no budget)")
        require(
            0.0 <= self.label_smoothing < 1.0,
            f"train.label_smoothing={self.label_smoothing} must be in [0, 1) (0 = none, the paper's)",
        )
        require(
            0.0 <= self.ema_decay < 1.0,
            f"train.ema_decay={self.ema_decay} must be in [0, 1) (0 = no weight average, the paper's)",
        )
        if self.loss is Loss.SAMPLED:
            require(
                not self.label_smoothing,
                f"train.label_smoothing={self.label_smoothing} needs train.loss=full; "
                "set train.label_smoothing=0 with sampled",
            )
            require(
                self.num_negatives >= 1,
                f"train.num_negatives={self.num_negatives} must be >= 1 with train.loss=sampled",
            )

    def epochs(self, steps_per_epoch: int) -> int:
        """The run's length in epochs: ``max_epochs``, or fewer where ``max_steps`` ends it sooner."""
        if not self.max_steps:
            return self.max_epochs
        return min(self.max_epochs, -(-self.max_steps // max(steps_per_epoch, 1)))

    def graph_blockers(self) -> List[str]:
        """Why these settings cannot capture a training step in CUDA graphs (empty: they can)."""
        reasons = {
            f"train.micro_batch_size={self.micro_batch_size} (use 0)": self.micro_batch_size != 0,
            f"train.optimizer={self.optimizer} (use adam, adamw or sgd)": self.optimizer is Optimizer.ADAGRAD,
            "train.optimizer=sgd and a learning-rate schedule (its rate is frozen into the graphs; use adam)": (
                self.optimizer is Optimizer.SGD and (self.lr_schedule != "constant" or self.warmup_steps > 0)
            ),
        }
        return [reason for reason, blocks in reasons.items() if blocks]


def _is_cuda_name(device: str) -> bool:
    kind, _, index = device.partition(":")
    return kind == "cuda" and (index == "" or index.isdigit())


METRIC_NAMES = ("HR", "NDCG", "MRR")


@dataclass
class EvalConfig:
    """Full-ranking evaluation (docs/training.md); ``max_users`` > 0 evaluates the first users only
    (for catalogs too large to rank for every user on a CPU). ``every``: validate after every that
    many epochs (and after the last); ``train.patience`` counts validations. ``test``: false
    leaves the test split out of the final evaluation too, for hyper-parameter searches
    (``scripts/tune.py``), which must select on validation alone."""

    ks: List[int] = field(default_factory=lambda: [10, 20])
    every: int = 1
    max_users: int = 0
    batch_size: int = 1024
    item_chunk_size: int = 65536
    valid_metric: str = "NDCG@10"
    test: bool = True

    def __post_init__(self) -> None:
        typed_fields(self, "eval")
        require(len(self.ks) > 0 and min(self.ks) >= 1, f"eval.ks={self.ks} must list cut-offs >= 1, e.g. [10, 20]")
        for name in ("every", "batch_size", "item_chunk_size"):
            require(getattr(self, name) >= 1, f"eval.{name}={getattr(self, name)} must be >= 1")
        require(self.max_users >= 0, f"eval.max_users={self.max_users} must be >= 0 (0 evaluates every user)")
        valid_names = [f"{n}@{k}" for n in METRIC_NAMES for k in self.ks]
        require(
            self.valid_metric in valid_names,
            f"eval.valid_metric={self.valid_metric!r} is not computed; choose one of {', '.join(sorted(valid_names))}",
        )


SparseOptimizer = Choice(
    "SparseOptimizer",
    {"AUTO": "auto", "SGD": "sgd", "ADAGRAD": "adagrad", "ROWWISE_ADAGRAD": "rowwise_adagrad", "ADAM": "adam"},
)


CollectiveBackend = Choice("CollectiveBackend", {"AUTO": "auto", "GLOO": "gloo", "NCCL": "nccl"})


Pipeline = Choice("Pipeline", {"AUTO": "auto", "SPARSE_DIST": "sparse_dist", "NONE": "none"})


TABLES = ("item", "context_user")
SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise", "table_column_wise")
COMPUTE_KERNELS = ("dense", "fused", "fused_uvm", "fused_uvm_caching")


@dataclass
class DistributedConfig:
    """Sharding and the fused sparse optimizer, used when the run is launched by torchrun/TorchX.

    Args:
        sharding_types: table name -> allowed TorchRec sharding type (``table_wise``,
            ``row_wise``, ``column_wise``, ``table_row_wise``, ...); unnamed tables are left to
            the planner. Tables: ``item`` (the item table) and ``context_user``.
        compute_kernels: table name -> compute kernel (``fused`` by default, the kernel whose
            optimizer is applied in the backward pass).
        sparse_optimizer: how the tables are trained. ``auto`` (the default): as in a one-process
            run, by the fused optimizer that updates a row as ``train.optimizer`` would (FBGEMM's
            fused Adam for adam/adamw on GPU; the exact fused SGD or Adagrad) at ``train.lr``, or,
            where FBGEMM has none (Adam on CPU, a weight decay its kernel cannot apply alike), with
            the tables replicated on every rank and trained by the dense optimizer itself. Or a
            fused optimizer for sharded tables: ``sgd``, ``adagrad``, ``rowwise_adagrad`` (CPU and
            GPU) or ``adam`` (GPU only) (``distributed.sharding``).
        sparse_lr: the named fused optimizer's learning rate (0 = train.lr); required when it
            updates the tables differently from ``train.optimizer`` (e.g. rowwise_adagrad beside adam).
        backend: ``auto`` (gloo on CPU, NCCL on GPU), ``gloo`` or ``nccl``.
        timeout_s: process-group timeout; a failure on one rank frees the others after it.
        pipeline: ``auto`` (TrainPipelineSparseDist on GPU, plain steps on CPU), ``sparse_dist``
            or ``none``.
    """

    sharding_types: Dict[str, str] = field(default_factory=dict)
    compute_kernels: Dict[str, str] = field(default_factory=dict)
    sparse_optimizer: SparseOptimizer = SparseOptimizer.AUTO
    sparse_lr: float = 0.0
    backend: CollectiveBackend = CollectiveBackend.AUTO
    timeout_s: int = 600
    pipeline: Pipeline = Pipeline.AUTO

    def __post_init__(self) -> None:
        typed_fields(self, "distributed")
        for name, allowed in (("sharding_types", SHARDING_TYPES), ("compute_kernels", COMPUTE_KERNELS)):
            for table, value in getattr(self, name).items():
                require(table in TABLES, f"distributed.{name}.{table}: no table {table!r}; {choose(TABLES)}")
                require(value in allowed, f"distributed.{name}.{table}={value!r}; {choose(allowed)}")
        require(self.sparse_lr >= 0, f"distributed.sparse_lr={self.sparse_lr} must be >= 0 (0 = train.lr)")
        require(self.timeout_s >= 1, f"distributed.timeout_s={self.timeout_s} must be >= 1")


@dataclass
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    context: ContextConfig = field(default_factory=ContextConfig)

    def __post_init__(self) -> None:
        typed_fields(self, "")
        m, d, t = self.model, self.data, self.train
        if t.window_context:
            require(
                t.protocol is Protocol.ALL_POSITIONS,
                f"train.window_context={t.window_context} applies to train.protocol=all_positions; set it to 0 "
                "with prefixes (each prefix already keeps its last data.max_len items)",
            )
            require(
                t.window_context < d.max_len,
                f"train.window_context={t.window_context} must be < data.max_len={d.max_len} (a window of T "
                "inputs keeps T - C targets); lower it, e.g. to data.max_len / 2",
            )
        if m.encoder is EncoderKind.SASREC:
            require(
                m.sasrec.max_positions >= d.max_len,
                f"model.sasrec.max_positions={m.sasrec.max_positions} must be >= data.max_len={d.max_len}",
            )

    def to_dict(self) -> Dict[str, Any]:
        """The config as plain Python (choices as strings): what checkpoints and metrics.json hold."""
        return plain(self)


# Keys that change how a run executes, not what it learns or measures: they never block rerunning
# a run folder (bf16, CUDA graphs and the kernels were measured equal in quality to fp32 eager).
EXECUTION_KEYS = frozenset(
    {
        "name",
        "data.cache_dir",
        "train.device",
        "train.num_workers",
        "train.log_every",
        "train.checkpoint_every",
        "train.precision",
        "train.compile",
        "train.cuda_graphs",
        "train.graph_quantum",
        "eval.batch_size",
        "eval.item_chunk_size",
        "eval.test",
        "distributed.backend",
        "distributed.timeout_s",
        "distributed.pipeline",
        "model.recblr.kernels",
        "model.recblr.fused_norms",
        "model.recblr.recompute_mix",
        "model.recblr.recompute_recurrence",
    }
)
# Keys that say how long a run goes on: raising them continues a finished run.
CONTINUATION_KEYS = frozenset({"train.max_epochs", "train.max_steps", "train.patience", "train.time_budget_s"})


def learned_settings(config: RunConfig) -> Dict[str, Any]:
    """What a run learns and measures, as dotted keys: every setting but the execution and
    continuation keys, and but the unused encoder's section."""
    unused = "sasrec" if config.model.encoder == "recblr" else "recblr"
    flat = dotted(config.to_dict())
    return {
        key: value
        for key, value in flat.items()
        if key not in EXECUTION_KEYS and key not in CONTINUATION_KEYS and not key.startswith(f"model.{unused}.")
    }


def settings_hash(config: RunConfig) -> str:
    """A short hash of :func:`learned_settings`: checkpoints carry it."""
    text = json.dumps(learned_settings(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dotted(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config dict as ``{"train.lr": ..., ...}``."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def set_dotted(tree: Dict[str, Any], keys: List[str], value: Any, where: str) -> None:
    """Sets ``tree[keys[0]][keys[1]]... = value``, making the sections that are missing; ``where``
    names the setting in the error when a key on the way is not a section."""
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {key} is not a section")
    node[keys[-1]] = value


def differing_settings(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``key=saved (now current)`` for every dotted key whose value differs."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}={saved.get(key)!r} (now {current.get(key)!r})" for key in keys if saved.get(key) != current.get(key)
    ]


def add_overrides_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE [KEY=VALUE ...]`` into ``args.overrides``: several after one ``--set``
    (TorchX refuses a repeated argument), or repeated."""
    parser.add_argument(
        "--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help=help
    )


def parse_override(item: str) -> tuple:
    """``'train.lr=3e-4'`` -> (['train', 'lr'], 0.0003); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
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
        raise MissingFileError(f"config file {path} does not exist; see configs/ for examples")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"config {path} includes itself through base:")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ConfigError(f"config {path} is not valid YAML ({' '.join(str(error).split())})") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty; give it the sections to change (see configs/tiny.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = os.path.join(os.path.dirname(path), base)
    return _merge(read_yaml_with_base(parent, _seen + (os.path.abspath(path),)), raw)


# Keys of the model section before each encoder had its own section: (old key, new place(s)).
_RECBLR_KEYS = ("expand", "conv_width", "recompute_mix", "recompute_recurrence", "fused_norms")
_SHARED_KEYS = ("embedding_dim", "num_layers", "dropout", "layer_norm_eps")
_MOVED = {
    "architecture": "model.encoder",
    "scan_backend": "model.recblr.kernels",
    "num_heads": "model.sasrec.num_heads",
    "max_positions": "model.sasrec.max_positions",
    **{key: f"model.recblr.{key}" for key in _RECBLR_KEYS},
    **{key: f"model.recblr.{key} (model.sasrec.{key} for the SASRec-style encoder)" for key in _SHARED_KEYS},
}


def moved_model_keys(model: Dict[str, Any]) -> List[str]:
    """``old -> new`` for each key of a model section written in the flat layout (one section
    for both encoders, ``scan_backend`` for the kernels)."""
    return [f"model.{key} is now {_MOVED[key]}" for key in model if key in _MOVED]


def upgrade_config_dict(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A saved config (a checkpoint's or metrics.json's) in the current layout: a flat model
    section becomes the encoder's own section, ``scan_backend`` becomes ``kernels``; a current
    config comes back unchanged."""
    model = dict(raw.get("model", {}))
    if not moved_model_keys(model):
        return raw
    encoder = model.pop("architecture", "recblr")
    shared = {key: model.pop(key) for key in _SHARED_KEYS if key in model}  # the encoder's that was used
    recblr = {key: model.pop(key) for key in _RECBLR_KEYS if key in model}
    if "scan_backend" in model:
        recblr["kernels"] = model.pop("scan_backend")
    sasrec = {key: model.pop(key) for key in ("num_heads", "max_positions") if key in model}
    (recblr if encoder == "recblr" else sasrec).update(shared)
    return {**raw, "model": {"encoder": encoder, "recblr": recblr, "sasrec": sasrec, **model}}


def config_from_dict(raw: Dict[str, Any]) -> RunConfig:
    """A RunConfig from plain Python (``RunConfig.to_dict()``, or an older saved layout)."""
    return fill(RunConfig, upgrade_config_dict(raw), "")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """Reads a YAML config (or the defaults) and applies ``section.key=value`` overrides."""
    raw = read_yaml_with_base(path) if path is not None else {}
    for item in overrides or []:
        keys, value = parse_override(item)
        set_dotted(raw, keys, value, f"override {item!r}")
    moved = moved_model_keys(raw["model"]) if isinstance(raw.get("model"), dict) else []
    if moved:
        raise ConfigError(f"{'; '.join(moved)}: each encoder has its own section under model; update {path or '--set'}")
    return fill(RunConfig, raw, "")


def resolve_data_dir(flag: Optional[str]) -> Optional[str]:
    """The data directory: ``--data-dir``, else $RECBLR_DATA_DIR, else None (paths must be absolute)."""
    return flag or os.environ.get(DATA_DIR_ENV) or None
