import pytest
import torch
import torch.nn.functional as F

from recblr_torchrec.training.losses import full_softmax_loss


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_loss_and_gradients_equal_masked_cross_entropy(chunk):
    torch.manual_seed(chunk)
    hidden = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    catalog = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 9, (13,))
    loss = full_softmax_loss(hidden, targets, catalog, chunk=chunk)
    grads = torch.autograd.grad(loss, (hidden, catalog))
    logits = hidden @ catalog.T
    logits = torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], dim=1)
    expected = F.cross_entropy(logits, targets)
    expected_grads = torch.autograd.grad(expected, (hidden, catalog))
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_padding_target_is_refused():
    with pytest.raises(ValueError, match="targets must be item ids"):
        full_softmax_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(4, 3))
