"""scorer.pt and step.pt against the training model: parity, the zero-length history, the manifest."""

import json
import os

import pytest
import torch

from recblr_torchrec.serving import serving_modules
from recblr_torchrec.serving.export import script

from .conftest import NUM_EMBEDDINGS, random_histories, random_model, write_checkpoint

# fp32 artifacts: the event-by-event path and the whole-history path round differently (the
# conv sees a k-wide window instead of the padded sequence); measured differences are <= 1e-6.
ATOL = 1e-5
LENGTHS = [1, 2, 3, 7, 23, 0]  # odd, unsorted, one longer than the trained max_len (20), one empty


def test_scripted_scorer_equals_eager_modules_and_training_model(model, scorer):
    ids, lengths = random_histories(5, 23, LENGTHS[:5])
    eager_scorer, _ = serving_modules(model)
    scores, items = scorer(ids, lengths, 7)
    eager_scores, eager_items = eager_scorer(ids, lengths, 7)
    assert torch.equal(scores, eager_scores) and torch.equal(items, eager_items)
    with torch.no_grad():
        reference = model.score(ids, lengths)[:, 1:]  # the training model, padding column dropped
        ref_scores, ref_index = reference.topk(7, dim=1)
        hidden = model.encode(ids, lengths)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=ATOL)
    assert torch.equal(items, ref_index + 1)
    vectors = scorer.user_vector(ids, lengths)
    torch.testing.assert_close(vectors, hidden[torch.arange(5), lengths - 1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("learned", [False, True])
def test_cosine_scores_are_served_as_the_training_model_scores_them(learned):
    model = random_model(score_temperature=0.1, learn_temperature=learned)
    assert (model.temperature() == 0.1) != learned  # a learned temperature moved with the other weights
    ids, lengths = random_histories(5, 23, LENGTHS[:5])
    scorer, step = (script(module) for module in serving_modules(model))
    scores, items = scorer(ids, lengths, 7)
    with torch.no_grad():
        ref_scores, ref_index = model.score(ids, lengths)[:, 1:].topk(7, dim=1)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=ATOL * 10)  # cosines over 0.1
    assert torch.equal(items, ref_index + 1)
    step_scores, step_items = step.top_k(scorer.user_vector(ids, lengths), 7)
    assert torch.equal(step_scores, scores) and torch.equal(step_items, items)


def test_scripted_step_equals_eager_step(model, step):
    _, eager_step = serving_modules(model)
    state = torch.randn(3, step.initial_state(3).shape[1])
    new_items = torch.tensor([1, 17, NUM_EMBEDDINGS - 1])
    for a, b in zip(step(state, new_items, 4), eager_step(state, new_items, 4)):
        assert torch.equal(a, b)


def feed_events(step, ids, lengths, state):
    """Runs each history through step.pt one event at a time; rows whose history ended keep their state."""
    vectors = torch.zeros(ids.shape[0], step.item_table.shape[1])
    for t in range(ids.shape[1]):
        real = t < lengths
        new_state, new_vectors = step.advance(state, torch.where(real, ids[:, t], torch.ones_like(ids[:, t])))
        state = torch.where(real.unsqueeze(1), new_state, state)
        vectors = torch.where(real.unsqueeze(1), new_vectors, vectors)
    return state, vectors


def test_event_by_event_equals_whole_history(scorer, step):
    ids, lengths = random_histories(len(LENGTHS), 23, LENGTHS)
    state, vectors = feed_events(step, ids, lengths, step.initial_state(len(LENGTHS)))
    torch.testing.assert_close(state, scorer.user_state(ids, lengths), rtol=0, atol=ATOL)
    torch.testing.assert_close(vectors, scorer.user_vector(ids, lengths), rtol=0, atol=ATOL)
    real = lengths > 0
    scores, items = scorer(ids, lengths, 10)
    step_scores, step_items = step.top_k(vectors, 10)
    assert torch.equal(step_items[real], items[real])
    torch.testing.assert_close(step_scores[real], scores[real], rtol=0, atol=ATOL)


def test_user_state_of_a_prefix_continues_in_step(scorer, step):
    ids, lengths = random_histories(3, 12, [12, 9, 5], seed=4)
    cut = torch.tensor([4, 9, 0])  # the scorer sees a prefix, step.pt the rest
    prefix = torch.where(torch.arange(12).unsqueeze(0) < cut.unsqueeze(1), ids, torch.zeros_like(ids))
    state = scorer.user_state(prefix, cut)
    for t in range(12):
        real = (t >= cut) & (t < lengths)
        new_state, _, _ = step(state, torch.where(real, ids[:, t], torch.ones_like(ids[:, t])), 3)
        state = torch.where(real.unsqueeze(1), new_state, state)
    torch.testing.assert_close(state, scorer.user_state(ids, lengths), rtol=0, atol=ATOL)


def test_zero_length_history_is_the_empty_state_with_a_defined_top_k(scorer, step):
    ids = torch.zeros(2, 4, dtype=torch.long)
    lengths = torch.zeros(2, dtype=torch.long)
    assert torch.equal(scorer.user_state(ids, lengths), step.initial_state(2))
    assert torch.equal(scorer.user_vector(ids, lengths), torch.zeros(2, 8))
    scores, items = scorer(ids, lengths, 3)
    assert torch.equal(scores, torch.zeros(2, 3)) and torch.equal(items, torch.tensor([[1, 2, 3]] * 2))


def test_padding_id_is_never_returned(scorer):
    ids, lengths = random_histories(4, 6, [6, 1, 3, 2])
    _, items = scorer(ids, lengths, NUM_EMBEDDINGS - 1)  # the whole catalog
    assert torch.equal(items.sort(dim=1).values, torch.arange(1, NUM_EMBEDDINGS).expand(4, -1))


def test_manifest_describes_the_artifacts(exported, model):
    out, manifest = exported
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == manifest
    assert manifest["num_embeddings"] == NUM_EMBEDDINGS and manifest["num_items"] == NUM_EMBEDDINGS - 1
    assert manifest["model"]["embedding_dim"] == 8 and manifest["checkpoint"]["epoch"] == 3
    assert manifest["score_temperature"] == 0.0  # dot-product scores
    assert len(manifest["checkpoint"]["sha256"]) == 64 and "torch" in manifest["versions"]
    layout = manifest["state"]
    channels, k = 16, model.config.recblr.conv_width
    assert layout["columns"] == 2 * k * channels
    spans = [span for layer in layout["layers"] for span in (layer["conv_tail"], layer["recurrent"])]
    assert spans[0]["columns"][0] == 0 and spans[-1]["columns"][1] == layout["columns"]
    assert all(a["columns"][1] == b["columns"][0] for a, b in zip(spans, spans[1:]))


def test_a_learned_temperature_is_exported_with_the_checkpoint(tmp_path):
    from recblr_torchrec.serving.export import export

    model = random_model(score_temperature=0.1, learn_temperature=True)
    write_checkpoint(model, str(tmp_path / "run" / "checkpoints" / "best.pt"))
    manifest = export(str(tmp_path / "run" / "checkpoints" / "best.pt"), str(tmp_path / "serving"))
    assert manifest["score_temperature"] == pytest.approx(model.temperature(), rel=1e-6)
    scorer = torch.jit.load(str(tmp_path / "serving" / "scorer.pt"))
    ids, lengths = random_histories(5, 23, LENGTHS[:5])
    scores, items = scorer(ids, lengths, 7)
    with torch.no_grad():
        ref_scores, ref_index = model.score(ids, lengths)[:, 1:].topk(7, dim=1)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=ATOL * 10)
    assert torch.equal(items, ref_index + 1)


@pytest.mark.parametrize("batch", [1, 3])
def test_initial_state_shape(step, batch):
    state = step.initial_state(batch)
    assert state.shape == (batch, 2 * 4 * 16) and state.dtype == torch.float32 and not state.any()
