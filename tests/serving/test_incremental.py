"""The encoder's incremental step and its TorchScript form, at the module level (float64, tight tolerances)."""

import pytest
import torch

from recblr_torchrec.modules import RecBLRConfig, RecBLREncoder

LENGTHS = [1, 2, 3, 7, 5, 0]


def make_encoder(conv_width: int, seed: int = 0) -> RecBLREncoder:
    torch.manual_seed(seed)
    encoder = RecBLREncoder(RecBLRConfig(embedding_dim=8, num_layers=2, dropout=0.0, conv_width=conv_width))
    encoder = encoder.double().eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return encoder


@pytest.mark.parametrize("conv_width", [1, 2, 4])
def test_step_by_step_equals_the_whole_sequence(conv_width):
    encoder = make_encoder(conv_width)
    batch, steps = len(LENGTHS), max(LENGTHS)
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(batch, steps, 8, dtype=torch.float64)
    hidden, final_state = encoder.forward_with_state(x, lengths)
    torch.testing.assert_close(hidden, encoder(x, lengths=lengths), rtol=0, atol=0)
    state = torch.zeros(batch, encoder.state_size(), dtype=torch.float64)
    for t in range(steps):
        out, new_state = encoder.step(x[:, t], state)
        real = t < lengths
        torch.testing.assert_close(out[real], hidden[real, t], rtol=0, atol=1e-10)
        state = torch.where(real.unsqueeze(1), new_state, state)
    torch.testing.assert_close(state, final_state, rtol=0, atol=1e-10)


def test_state_of_an_empty_history_is_zero():
    encoder = make_encoder(4)
    _, state = encoder.forward_with_state(torch.randn(2, 3, 8, dtype=torch.float64), torch.tensor([0, 0]))
    assert state.shape == (2, encoder.state_size()) and not state.any()


def test_scripted_encoder_equals_eager_on_padded_and_jagged_input():
    encoder = make_encoder(4)
    scripted = torch.jit.script(encoder)
    lengths = torch.tensor(LENGTHS)
    x = torch.randn(len(LENGTHS), max(LENGTHS), 8, dtype=torch.float64)
    assert torch.equal(scripted(x, lengths=lengths), encoder(x, lengths=lengths))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values = torch.randn(int(lengths.sum()), 8, dtype=torch.float64)
    assert torch.equal(scripted(values, offsets=offsets), encoder(values, offsets=offsets))
    for a, b in zip(scripted.forward_with_state(x, lengths), encoder.forward_with_state(x, lengths)):
        assert torch.equal(a, b)
    state = torch.randn(len(LENGTHS), encoder.state_size(), dtype=torch.float64)
    for a, b in zip(scripted.step(x[:, 0], state), encoder.step(x[:, 0], state)):
        assert torch.equal(a, b)
