"""The sequence recommender: the item table in an EmbeddingCollection, a sequence encoder (RecBLR, or
the SASRec-style baseline) on its output, scores against the same table."""

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from ..data.features import ITEM_CANDIDATES, ITEM_HISTORY, USER_BUCKET
from ..fields import Choice, require, typed_fields
from ..kernels import KernelBackend
from .recblr import RecBLRConfig, RecBLREncoder, kernels_in_use, set_kernels
from .sasrec import SASRecConfig, SASRecEncoder

ITEM_TABLE = "item"
LOOKUP_BAGS = 1024  # bags a plain id lookup (``lookup``) spreads its ids over
CONTEXT_USER_TABLE = "context_user"
MIN_TEMPERATURE = 0.01  # a learned temperature stays at or above it (the user vectors' length at most 100)


ContextJoin = Choice("ContextJoin", {"INPUT": "input", "OUTPUT": "output"})


@dataclass
class ContextConfig:
    """Pooled context features in an EmbeddingBagCollection, joined to the encoder.

    Args:
        user_buckets: rows of the ``context_user`` table, indexed by the user id hashed into
            buckets (feature ``user_bucket``); 0 = no context features (the paper's model).
        embedding_dim: that table's width (0 = the model's d); projected to d by a linear layer.
        join: ``input`` (added to every position's item embedding, before the encoder) or
            ``output`` (added to every position's hidden vector, after it).
    """

    user_buckets: int = 0
    embedding_dim: int = 0
    join: ContextJoin = ContextJoin.INPUT

    def __post_init__(self) -> None:
        typed_fields(self, "context")
        require(
            self.user_buckets >= 0 and self.embedding_dim >= 0,
            "context.user_buckets and context.embedding_dim must be >= 0 (0 = off / the model's d)",
        )


EncoderKind = Choice("EncoderKind", {"RECBLR": "recblr", "SASREC": "sasrec"})


@dataclass
class ModelConfig:
    """Which sequence encoder the recommender runs, and each encoder's own section.

    ``encoder``: ``recblr`` (the paper's model; section ``recblr``) or ``sasrec`` (the SASRec-style
    Transformer baseline; section ``sasrec``), on the same table, data path, loss and evaluation.
    The table's width is the chosen encoder's ``embedding_dim``; the other section is unused.

    ``item_dropout``: in training, the probability that a history position's item is hidden from
    the encoder: its embedding is replaced by one learned vector (``masked_item``), as a masked
    token; the position's target and the scores are untouched. 0 = off (the paper's).

    ``score_temperature``: 0 scores an item by the dot product of the user vector and the item's
    embedding (the paper's); t > 0 by their cosine similarity over t (both vectors scaled to unit
    length), in the loss, the evaluation and the serving artifacts alike.

    ``learn_temperature``: with cosine scores, the temperature is a parameter of the model that
    training adjusts with the others, starting at ``score_temperature`` (held as the log of its
    inverse, ``score_scale``, kept at or above ``MIN_TEMPERATURE``); evaluation and the serving
    artifacts read its value at that time. False = fixed at ``score_temperature``.
    """

    encoder: EncoderKind = EncoderKind.RECBLR
    recblr: RecBLRConfig = field(default_factory=RecBLRConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    item_dropout: float = 0.0
    score_temperature: float = 0.0
    learn_temperature: bool = False

    def __post_init__(self) -> None:
        typed_fields(self, "model")
        require(
            0.0 <= self.item_dropout < 1.0,
            f"model.item_dropout={self.item_dropout} must be in [0, 1) (0 = off, the paper's)",
        )
        require(
            0.0 <= self.score_temperature < float("inf"),
            f"model.score_temperature={self.score_temperature} must be 0 (dot-product scores, the paper's) or a "
            "positive temperature for cosine scores, such as 0.1",
        )
        require(
            not self.learn_temperature or self.score_temperature >= MIN_TEMPERATURE,
            f"model.learn_temperature=true learns the temperature of cosine scores from model.score_temperature, "
            f"which is {self.score_temperature}: set model.score_temperature to a starting temperature of at least "
            f"{MIN_TEMPERATURE}, such as 0.1, or model.learn_temperature=false",
        )

    @property
    def encoder_config(self) -> Union[RecBLRConfig, SASRecConfig]:
        """The chosen encoder's section."""
        return self.recblr if self.encoder is EncoderKind.RECBLR else self.sasrec

    @property
    def embedding_dim(self) -> int:
        """d, the width of the item table and of the encoder."""
        return self.encoder_config.embedding_dim


def build_encoder(config: ModelConfig) -> nn.Module:
    """The sequence encoder ``config.encoder`` names: RecBLR, or the SASRec-style baseline."""
    if config.encoder is EncoderKind.RECBLR:
        return RecBLREncoder(config.recblr)
    return SASRecEncoder(config.sasrec)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """The initialisation of docs/model.md: Linear and Embedding N(0, std), biases 0, LayerNorm (1, 0).

    Convolutions keep PyTorch's default and Lambda its decay linspace.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class SequenceRecommender(nn.Module):
    """Next-item model: EmbeddingCollection (item table, V rows, row 0 padding) + a sequence
    encoder (RecBLR, or the SASRec-style baseline: ``config.encoder``).

    Scores are dot products with the same (tied) item table, as in the paper. Both encoders share
    the table, the data path, the loss and the evaluation.

    Args:
        num_embeddings: V, rows of the item table including the padding row 0.
        config: which encoder, and its hyper-parameters.
        device: where to build the item table; ``torch.device("meta")`` lets
            DistributedModelParallel materialise it sharded.
        candidate_feature: the item table also serves the feature ``item_candidates`` (the
            loss's candidate ids carried by a training batch), so ``embed`` looks up histories
            and candidates in one call; every input KJT must then carry both keys (``lookup``,
            ``encode`` and ``item_table`` add an empty one).
        context: pooled context features (an EmbeddingBagCollection, shardable like the item
            table) and how they join the encoder; None or ``user_buckets=0``: none.

    Example::

        >>> config = ModelConfig(recblr=RecBLRConfig(embedding_dim=8, num_layers=1))
        >>> model = SequenceRecommender(num_embeddings=11, config=config)
        >>> history = KeyedJaggedTensor(keys=["item_history"], values=torch.tensor([3, 1, 4, 1, 5]),
        ...                             lengths=torch.tensor([2, 3]))
        >>> model(history).shape                         # one hidden vector per position
        torch.Size([5, 8])
        >>> model.score_last(history).shape              # [B, V]
        torch.Size([2, 11])
    """

    def __init__(
        self,
        num_embeddings: int,
        config: ModelConfig,
        device: Optional[torch.device] = None,
        candidate_feature: bool = False,
        context: Optional[ContextConfig] = None,
    ):
        super().__init__()
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings={num_embeddings}: the table needs the padding row and one item")
        self.num_embeddings = num_embeddings
        self.config = config
        self.candidate_feature = candidate_feature
        self.feature_names = [ITEM_HISTORY, ITEM_CANDIDATES] if candidate_feature else [ITEM_HISTORY]
        self.item_embeddings = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=ITEM_TABLE,
                    embedding_dim=self.embedding_dim,
                    num_embeddings=num_embeddings,
                    feature_names=self.feature_names,
                    init_fn=partial(nn.init.normal_, mean=0.0, std=0.02),
                )
            ],
            device=device,
        )
        self.encoder = build_encoder(config)
        init_weights(self.encoder)
        self.score_scale: Optional[nn.Parameter] = None  # log(1 / temperature), when it is learned
        if config.learn_temperature:
            self.score_scale = nn.Parameter(torch.tensor(-math.log(config.score_temperature)))
        self.masked_item: Optional[nn.Parameter] = None
        if config.item_dropout > 0:
            self.masked_item = nn.Parameter(torch.empty(self.embedding_dim).normal_(std=0.02))
        self.context_embeddings: Optional[EmbeddingBagCollection] = None
        self.context_join = "input"
        if context is not None and context.user_buckets > 0:
            width = context.embedding_dim or self.embedding_dim
            self.context_embeddings = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=CONTEXT_USER_TABLE,
                        embedding_dim=width,
                        num_embeddings=context.user_buckets,
                        feature_names=[USER_BUCKET],
                        pooling=PoolingType.SUM,
                        init_fn=partial(nn.init.normal_, mean=0.0, std=0.02),
                    )
                ],
                device=device,
            )
            self.context_proj = nn.Linear(width, self.embedding_dim)
            self.context_join = context.join

    def pool_context(self, context: Optional[KeyedJaggedTensor]) -> Optional[KeyedTensor]:
        """The EmbeddingBagCollection's pooled output for ``context``; None for a model without context."""
        if self.context_embeddings is None:
            return None
        if context is None:
            raise ValueError("this model has context features: pass the batch's context (batch.context)")
        return self.context_embeddings(context)

    def context_vectors(self, context: Optional[KeyedJaggedTensor]) -> Optional[Tensor]:
        """[B, d] the pooled context of each sequence, projected; None for a model without context."""
        pooled = self.pool_context(context)
        return self._project(None if pooled is None else pooled.values())

    def _project(self, pooled: Optional[Tensor]) -> Optional[Tensor]:
        return None if pooled is None else self.context_proj(pooled.to(self.dtype))

    def after_lookup(
        self, embedded: Dict[str, JaggedTensor], pooled: Optional[KeyedTensor] = None, rows: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The dense part on the lookups' outputs: ([N, d] hidden vectors, or [M, d] at packed
        ``rows``; [C, d] candidate embeddings, None when the features carry no candidates)."""
        return self.dense_forward(*self.lookup_tensors(embedded, pooled), rows)

    @staticmethod
    def lookup_tensors(
        embedded: Dict[str, JaggedTensor], pooled: Optional[KeyedTensor] = None
    ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """The lookups' outputs as :meth:`dense_forward` takes them: history rows, their offsets,
        candidate rows and pooled context (None where absent)."""
        history, candidates = embedded[ITEM_HISTORY], embedded.get(ITEM_CANDIDATES)
        return (
            history.values(),
            history.offsets(),
            None if candidates is None else candidates.values(),
            None if pooled is None else pooled.values(),
        )

    def dense_forward(
        self,
        history: Tensor,
        offsets: Tensor,
        candidates: Optional[Tensor] = None,
        pooled: Optional[Tensor] = None,
        rows: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """:meth:`after_lookup` on the lookups' tensors: [N, d] history rows and their [B+1]
        offsets, [C, d] candidate rows, [B, w] pooled context (what a CUDA graph of the sharded
        step's dense part reads, ``recblr_torchrec/distributed/dense_step.py``)."""
        hidden = self._encode_with(history.to(self.dtype), offsets, self._project(pooled), rows)
        return hidden, None if candidates is None else candidates.to(self.dtype)

    def _encode_with(
        self, values: Tensor, offsets: Tensor, vectors: Optional[Tensor], rows: Optional[Tensor] = None
    ) -> Tensor:
        if self.training and self.masked_item is not None:
            hidden = torch.rand(values.shape[0], 1, device=values.device) < self.config.item_dropout
            values = torch.where(hidden, self.masked_item.to(values.dtype), values)
        if vectors is None:
            return self.encoder(values, offsets=offsets, rows=rows)
        per_position = torch.repeat_interleave(vectors, offsets[1:] - offsets[:-1], dim=0, output_size=values.shape[0])
        if self.context_join == "input":
            return self.encoder(values + per_position, offsets=offsets, rows=rows)
        return self.encoder(values, offsets=offsets, rows=rows) + (per_position if rows is None else per_position[rows])

    def forward(
        self,
        item_history: KeyedJaggedTensor,
        context: Optional[KeyedJaggedTensor] = None,
        rows: Optional[Tensor] = None,
    ) -> Tensor:
        """[N, d] hidden vector at every position of the jagged histories, or [M, d] at the packed
        positions ``rows`` only (cheaper: the encoder's last layer runs on those rows). ``context``:
        the batch's pooled context features, for a model built with them."""
        jagged = self.item_embeddings(item_history)[ITEM_HISTORY]
        vectors = self.context_vectors(context)
        return self._encode_with(jagged.values().to(self.dtype), jagged.offsets(), vectors, rows)

    def embed(
        self, features: KeyedJaggedTensor, context: Optional[KeyedJaggedTensor] = None, rows: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """One lookup of histories and candidates: ([N, d] hidden vectors, or [M, d] at ``rows``;
        [C, d] candidate embeddings)."""
        return self.after_lookup(self.item_embeddings(features), self.pool_context(context), rows)

    def history_features(self, values: Tensor, lengths: Tensor) -> KeyedJaggedTensor:
        """The KJT of histories this model's table expects (an empty candidate bag added if needed).
        Its value count per key is given (``values.numel()``), so that TorchRec need not sum
        ``lengths`` on the host (a device synchronisation for CUDA tensors)."""
        count = values.numel()
        if not self.candidate_feature:
            return KeyedJaggedTensor(keys=[ITEM_HISTORY], values=values, lengths=lengths, length_per_key=[count])
        return KeyedJaggedTensor(
            keys=self.feature_names,
            values=values,
            lengths=torch.cat([lengths, torch.zeros_like(lengths)]),
            length_per_key=[count, 0],
        )

    def lookup(self, ids: Tensor) -> Tensor:
        """[M, d] embeddings of item ids [M], through the (possibly sharded) collection."""
        # the ids spread over up to LOOKUP_BAGS bags made on the device: TorchRec's bucketing and
        # FBGEMM's sequence lookup give each bag one thread group (one bag of a catalog runs serially)
        count, bags = ids.numel(), max(1, min(ids.numel(), LOOKUP_BAGS))
        lengths = torch.full((bags,), count // bags, dtype=torch.int64, device=ids.device)
        lengths[: count % bags] += 1
        return self.item_embeddings(self.history_features(ids, lengths))[ITEM_HISTORY].values().to(self.dtype)

    def set_kernels(self, backend: "KernelBackend | str", device: Optional[torch.device] = None) -> None:
        """The implementation of the encoder's sequence kernels (``model.recblr.kernels``), resolved
        for ``device`` when given (``auto``: Triton on CUDA); the SASRec-style encoder has none."""
        if isinstance(self.encoder, RecBLREncoder):
            set_kernels(self.encoder, backend if device is None else KernelBackend.parse(backend).resolve(device))

    def kernels_in_use(self) -> Dict[str, Dict[str, str]]:
        """{recording: {kernel: implementation}} on the encoder's device: ``kernels/backend.py``'s table."""
        return kernels_in_use(self.encoder, self.encoder.input_norm.weight.device)

    def compile_encoder(self, backend: str = "inductor") -> None:
        """``torch.compile`` the encoder in place (``train.compile``); parameters, ``state_dict``
        keys and the exports are unchanged, and the TorchRec modules stay eager."""
        self.encoder.compile(backend=backend)

    def static_padding(self, length: int) -> None:
        """Make the encoder's padding of jagged batches static: ``length`` (>= every history)
        positions, read from no tensor, so ``train.cuda_graphs`` can capture the step. Only the
        SASRec-style encoder pads (to its batch's longest history by default); RecBLR's scan runs
        on the jagged rows and has nothing to fix."""
        if isinstance(self.encoder, SASRecEncoder):
            self.encoder.static_padding(length)

    @property
    def embedding_dim(self) -> int:
        """d, the width of the item table and of the encoder's input and output."""
        return self.config.embedding_dim

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's dtype (TorchRec's lookups return float32 whatever the table holds)."""
        return self.encoder.input_norm.weight.dtype

    def item_table(self, start: int = 0, end: Optional[int] = None) -> Tensor:
        """[end - start, d] rows of the item table (all rows by default), padding row included."""
        end = self.num_embeddings if end is None else end
        device = self.encoder.input_norm.weight.device
        return self.lookup(torch.arange(start, end, device=device))

    def user_vectors(self, hidden: Tensor) -> Tensor:
        """The encoder's output [.., d] as the scores read it: unchanged for dot-product scores,
        scaled to unit length over the temperature for cosine scores (``score_temperature``, or
        the learned one: a differentiable scale)."""
        if self.score_scale is None:
            return scoring_users(hidden, self.config.score_temperature)
        scale = self.score_scale.clamp(max=-math.log(MIN_TEMPERATURE)).exp()
        return F.normalize(hidden, dim=-1) * scale.to(hidden.dtype)

    def temperature(self) -> float:
        """The temperature of the scores now: 0 for dot products, else ``score_temperature``, or
        the learned value (a host read) for ``learn_temperature``."""
        if self.score_scale is None:
            return self.config.score_temperature
        return max(math.exp(-float(self.score_scale.detach())), MIN_TEMPERATURE)

    def item_vectors(self, rows: Tensor) -> Tensor:
        """Item embeddings [.., d] as the scores read them: unchanged, or of unit length for cosine
        scores."""
        return scoring_items(rows, self.config.score_temperature)

    def scores(self, hidden: Tensor, rows: Tensor) -> Tensor:
        """[M, R] scores of item embeddings ``rows`` [R, d] for the encoder's outputs ``hidden`` [M, d]."""
        return self.user_vectors(hidden) @ self.item_vectors(rows).T

    def score_last(self, item_history: KeyedJaggedTensor, context: Optional[KeyedJaggedTensor] = None) -> Tensor:
        """[B, V] scores of every table row after each history's last item."""
        last = self(item_history, context, rows=item_history.offsets()[1:] - 1)
        return self.scores(last, self.item_table())

    def encode(self, item_seq: Tensor, lengths: Tensor, context: Optional[KeyedJaggedTensor] = None) -> Tensor:
        """Padded path: item_seq [B, T] right-padded with 0, lengths [B] -> hidden [B, T, d].

        Outputs at padded positions are zero.
        """
        check_padded(item_seq, lengths, self.num_embeddings)
        batch, steps = item_seq.shape
        kjt = self.history_features(
            item_seq.reshape(-1), torch.full((batch,), steps, dtype=torch.long, device=item_seq.device)
        )
        embedded = self.item_embeddings(kjt)[ITEM_HISTORY].values().to(self.dtype).reshape(batch, steps, -1)
        vectors = self.context_vectors(context)
        if vectors is None:
            return self.encoder(embedded, lengths=lengths)
        if self.context_join == "input":
            return self.encoder(embedded + vectors[:, None], lengths=lengths)
        mask = torch.arange(steps, device=lengths.device)[None, :] < lengths[:, None]
        return self.encoder(embedded, lengths=lengths) + vectors[:, None] * mask[..., None]

    def score(self, item_seq: Tensor, lengths: Tensor, context: Optional[KeyedJaggedTensor] = None) -> Tensor:
        """[B, V] scores of every table row (padding included) at position length-1."""
        hidden = self.encode(item_seq, lengths, context)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.scores(last, self.item_table())


def scoring_users(hidden: Tensor, temperature: float) -> Tensor:
    """User vectors for the scores: ``hidden`` itself (temperature 0, dot-product scores), else
    unit-length rows over ``temperature`` (cosine scores). TorchScript compiles it (serving)."""
    if temperature > 0:
        return F.normalize(hidden, dim=-1) / temperature
    return hidden


def scoring_items(rows: Tensor, temperature: float) -> Tensor:
    """Item embeddings for the scores: ``rows`` itself (temperature 0), else unit-length rows."""
    if temperature > 0:
        return F.normalize(rows, dim=-1)
    return rows


def last_positions(hidden: Tensor, offsets: Tensor) -> Tensor:
    """[B, d] the hidden vector at each sequence's last position (packed [N, d] input)."""
    return hidden[offsets[1:] - 1]


def check_padded(item_seq: Tensor, lengths: Tensor, num_embeddings: int) -> None:
    if item_seq.dim() != 2 or lengths.dim() != 1 or lengths.shape[0] != item_seq.shape[0]:
        raise ValueError(
            f"item_seq must be [B, T] and lengths [B]; got {tuple(item_seq.shape)} and {tuple(lengths.shape)}"
        )
    if bool((lengths < 1).any()) or bool((lengths > item_seq.shape[1]).any()):
        raise ValueError(f"lengths must be in [1, T={item_seq.shape[1]}], got {lengths.tolist()}")
    if bool((item_seq < 0).any()) or bool((item_seq >= num_embeddings).any()):
        bad = int(item_seq[(item_seq < 0) | (item_seq >= num_embeddings)][0])
        raise ValueError(f"item id {bad} is outside the table [0, {num_embeddings})")
