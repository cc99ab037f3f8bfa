import pytest
import torch
import torch.nn.functional as F

from recblr_torchrec.interop import load_public_recblr, public_key_to_local

ATOL = 1e-5


@pytest.fixture(scope="module")
def golden(golden_path):
    return torch.load(golden_path, weights_only=True)


def build(golden):
    c = golden["config"]
    return load_public_recblr(
        golden["state_dict"], c["n_items"], c["embedding_dim"], c["num_layers"], c["expand"], c["conv_width"]
    )


@pytest.mark.parametrize("case", ["T8", "T32"])
def test_matches_the_public_code_hidden_scores_loss_and_every_gradient(golden, case):
    model = build(golden)
    assert not model.training and model.dtype == torch.float64
    data = golden["cases"][case]
    hidden = model.encode(data["item_seq"], data["lengths"])
    real = torch.arange(hidden.shape[1])[None, :] < data["lengths"][:, None]
    torch.testing.assert_close(hidden[real], data["hidden"][real], rtol=0, atol=ATOL)
    scores = model.score(data["item_seq"], data["lengths"])
    assert scores.shape == (5, golden["config"]["n_items"])
    torch.testing.assert_close(scores, data["scores"], rtol=0, atol=ATOL)
    loss = F.cross_entropy(scores, data["target"])
    torch.testing.assert_close(loss, data["loss"], rtol=0, atol=ATOL)
    loss.backward()
    params = dict(model.named_parameters())
    assert len(data["grads"]) == len(params)
    for key, expected in data["grads"].items():
        grad = params[public_key_to_local(key)].grad
        torch.testing.assert_close(grad, expected, rtol=0, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")


def test_incomplete_or_foreign_state_dicts_are_refused(golden):
    state = dict(golden["state_dict"])
    state.pop("recurrent_layers.1.ffn.w_2.bias")
    with pytest.raises(KeyError, match="lacks parameters for: encoder.layers.1.ffn_out.bias"):
        load_public_recblr(state, 41, 16, 2, 2, 4)
    with pytest.raises(KeyError, match="'position_embedding.weight' is not a parameter"):
        load_public_recblr({**golden["state_dict"], "position_embedding.weight": torch.zeros(1)}, 41, 16, 2, 2, 4)
