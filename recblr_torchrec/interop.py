"""Loading checkpoints of the paper's public RecBLR code (a RecBole model) into this project.

Example::

    >>> golden = torch.load("recblr_public_golden.pt", weights_only=True)   # doctest: +SKIP
    >>> model = load_public_recblr(golden["state_dict"], num_items=41, embedding_dim=16,
    ...                            num_layers=2, expand=2, conv_width=4)   # doctest: +SKIP
    >>> model.score(item_seq, lengths)                    # [B, 41]    # doctest: +SKIP
"""

import re
from typing import Dict, Mapping

from torch import Tensor

from .modules import ModelConfig, RecBLRConfig, SequenceRecommender
from .modules.recommender import ITEM_TABLE

_LAYER_PARTS = {
    "behavior_modeling.input.weight": "recurrent.input_proj.weight",
    "behavior_modeling.conv1d.weight": "recurrent.conv.weight",
    "behavior_modeling.conv1d.bias": "recurrent.conv.bias",
    "behavior_modeling.gates.weight": "recurrent.gate_proj.weight",
    "behavior_modeling.gates.bias": "recurrent.gate_proj.bias",
    "behavior_modeling.Lambda": "recurrent.decay_param",
    "behavior_modeling.output.weight": "recurrent.output_proj.weight",
    "layer_norm.weight": "recurrent_norm.weight",
    "layer_norm.bias": "recurrent_norm.bias",
    "ffn.w_1.weight": "ffn_in.weight",
    "ffn.w_1.bias": "ffn_in.bias",
    "ffn.w_2.weight": "ffn_out.weight",
    "ffn.w_2.bias": "ffn_out.bias",
    "ffn.layer_norm.weight": "ffn_norm.weight",
    "ffn.layer_norm.bias": "ffn_norm.bias",
}
_TOP = {
    "item_embedding.weight": f"item_embeddings.embeddings.{ITEM_TABLE}.weight",
    "layer_norm.weight": "encoder.input_norm.weight",
    "layer_norm.bias": "encoder.input_norm.bias",
}
_LAYER_KEY = re.compile(r"recurrent_layers\.(\d+)\.(.+)")


def public_key_to_local(key: str) -> str:
    """The name in :class:`SequenceRecommender` of a public-code state_dict key."""
    if key in _TOP:
        return _TOP[key]
    match = _LAYER_KEY.fullmatch(key)
    if match and match.group(2) in _LAYER_PARTS:
        return f"encoder.layers.{match.group(1)}.{_LAYER_PARTS[match.group(2)]}"
    raise KeyError(f"{key!r} is not a parameter of the public RecBLR model")


def load_public_recblr(
    state_dict: Mapping[str, Tensor],
    num_items: int,
    embedding_dim: int,
    num_layers: int,
    expand: int,
    conv_width: int,
) -> SequenceRecommender:
    """Builds an eval-mode :class:`SequenceRecommender` (RecBLR encoder) holding the public code's weights.

    Args:
        state_dict: the public model's ``state_dict`` (keys as in the public code's model).
        num_items: rows of the item table, padding row included (the public ``n_items``).
        embedding_dim, num_layers, expand, conv_width: the public hyper-parameters.

    The model keeps the state_dict's dtype (float64 stays float64) and exposes
    ``encode(item_seq, lengths)`` and ``score(item_seq, lengths)``.
    """
    config = RecBLRConfig(
        embedding_dim=embedding_dim, num_layers=num_layers, expand=expand, conv_width=conv_width, dropout=0.0
    )
    model = SequenceRecommender(num_items, ModelConfig(recblr=config))
    converted: Dict[str, Tensor] = {}
    for key, value in state_dict.items():
        converted[public_key_to_local(key)] = value
    expected = set(model.state_dict())
    missing = sorted(expected - set(converted))
    if missing:
        raise KeyError(f"the public state_dict lacks parameters for: {', '.join(missing)}")
    dtype = next(iter(converted.values())).dtype
    model = model.to(dtype)
    model.load_state_dict(converted, strict=True)
    return model.eval()
