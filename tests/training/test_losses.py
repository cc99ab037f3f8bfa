import pytest
import torch
import torch.nn.functional as F

from recblr_torchrec.training.losses import full_softmax_loss, sampled_softmax_loss


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


def test_sampled_loss_over_the_whole_catalog_without_correction_is_the_full_loss():
    torch.manual_seed(0)
    hidden = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    table = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, 2, 7, 3, 3, 3, 5, 6, 1, 4])  # repeated targets: accidental hits
    ids = torch.arange(1, 8)
    sampled = sampled_softmax_loss(hidden, targets, ids, table[1:], torch.zeros(7, dtype=torch.float64))
    full = full_softmax_loss(hidden, targets, table)
    torch.testing.assert_close(sampled, full.to(sampled.dtype), rtol=0, atol=1e-6)
    got = torch.autograd.grad(sampled, (hidden, table))
    want = torch.autograd.grad(full_softmax_loss(hidden, targets, table), (hidden, table))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_log_q_correction_lowers_the_logits_of_frequently_sampled_candidates():
    hidden = torch.ones(1, 2)
    candidates = torch.ones(3, 2)  # equal raw logits
    ids, targets = torch.tensor([1, 2, 3]), torch.tensor([1])
    plain = sampled_softmax_loss(hidden, targets, ids, candidates, torch.zeros(3))
    # The target sampled often (log q high): its logit drops, so the loss rises.
    corrected = sampled_softmax_loss(hidden, targets, ids, candidates, torch.tensor([2.0, 0.0, 0.0]))
    assert plain == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=1e-6)
    assert corrected > plain


def test_a_target_outside_the_candidate_set_is_refused():
    with pytest.raises(ValueError, match="candidate set"):
        sampled_softmax_loss(
            torch.randn(1, 2), torch.tensor([4]), torch.tensor([1, 2]), torch.randn(2, 2), torch.zeros(2)
        )
