"""Bad input to the artifacts raises an error naming the problem, in the scripted files and in eager mode;
an empty batch is not bad input."""

import pytest
import torch

from recblr_torchrec.serving import serving_modules

from .conftest import NUM_EMBEDDINGS

IDS = torch.tensor([[3, 5, 0], [7, 0, 0]])
LENGTHS = torch.tensor([2, 1])


def with_value(tensor, index, value):
    out = tensor.clone()
    out[index] = value
    return out


SCORER_CASES = {
    "id above the catalog": (with_value(IDS, (0, 1), NUM_EMBEDDINGS), LENGTHS, 3, f"item id {NUM_EMBEDDINGS} at"),
    "negative id": (with_value(IDS, (1, 0), -4), LENGTHS, 3, r"item id -4 at item_ids\[1, 0\] is not a catalog item"),
    "padding id inside the history": (with_value(IDS, (0, 0), 0), LENGTHS, 3, r"item id 0 at item_ids\[0, 0\]"),
    "item after the length": (with_value(IDS, (1, 2), 9), LENGTHS, 3, "after the history's length"),
    "length above T": (IDS, torch.tensor([2, 4]), 3, r"lengths\[1\] = 4 is outside \[0, T=3\]"),
    "negative length": (IDS, torch.tensor([-1, 1]), 3, r"lengths\[0\] = -1 is outside"),
    "batch sizes disagree": (IDS, torch.tensor([2]), 3, "batch sizes disagree: item_ids has 2 rows but lengths has 1"),
    "1-D history": (IDS[0], LENGTHS, 3, "item_ids must be"),
    "float ids": (IDS.float(), LENGTHS, 3, "integer item ids"),
    "k = 0": (IDS, LENGTHS, 0, "k=0 must be in"),
    "k above the catalog": (IDS, LENGTHS, NUM_EMBEDDINGS, f"k={NUM_EMBEDDINGS} must be in"),
}


@pytest.mark.parametrize("scripted", [True, False], ids=["scripted", "eager"])
@pytest.mark.parametrize("case", SCORER_CASES, ids=list(SCORER_CASES))
def test_scorer_rejects_bad_input(case, scripted, scorer, model):
    module = scorer if scripted else serving_modules(model)[0]
    ids, lengths, k, message = SCORER_CASES[case]
    with pytest.raises(Exception, match=message):
        module(ids, lengths, k)
    if k != 3:
        return
    with pytest.raises(Exception, match=message):
        module.user_state(ids, lengths)


def step_cases(columns: int):
    state = torch.zeros(2, columns)
    items = torch.tensor([4, 9])
    return {
        "wrong state width": (state[:, :-1], items, f"state must be \\[B, {columns}\\]"),
        "3-D state": (state.unsqueeze(0), items, "state must be"),
        "float64 state": (state.double(), items, "state must be float32"),
        "NaN in the state": (with_value(state, (1, 5), float("nan")), items, "NaN or infinite"),
        "batch sizes disagree": (state, items[:1], "batch sizes disagree: state has 2 rows but new_items has 1"),
        "2-D new items": (state, items.unsqueeze(1), r"new_items must be \[B\]"),
        "padding id as an event": (state, torch.tensor([4, 0]), r"item id 0 at new_items\[1\]"),
        "id above the catalog": (state, torch.tensor([NUM_EMBEDDINGS, 1]), f"item id {NUM_EMBEDDINGS} at"),
        "negative id": (state, torch.tensor([1, -2]), "item id -2 at"),
    }


@pytest.mark.parametrize("scripted", [True, False], ids=["scripted", "eager"])
@pytest.mark.parametrize("case", list(step_cases(8)))
def test_step_rejects_bad_input(case, scripted, step, model):
    module = step if scripted else serving_modules(model)[1]
    state, items, message = step_cases(step.initial_state(1).shape[1])[case]
    with pytest.raises(Exception, match=message):
        module(state, items, 3)


def test_negative_initial_state_batch_is_refused(step):
    with pytest.raises(Exception, match="batch=-1 must be >= 0"):
        step.initial_state(-1)


@pytest.mark.parametrize("scripted", [True, False], ids=["scripted", "eager"])
def test_an_empty_batch_gives_empty_results(scripted, scorer, step, model):
    scorer_module, step_module = (scorer, step) if scripted else serving_modules(model)
    no_users, no_lengths = torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    scores, items = scorer_module(no_users, no_lengths, 3)
    assert scores.shape == (0, 3) and items.shape == (0, 3) and items.dtype == torch.long
    columns = step_module.initial_state(1).shape[1]
    assert scorer_module.user_state(no_users, no_lengths).shape == (0, columns)
    state, scores, items = step_module(step_module.initial_state(0), torch.zeros(0, dtype=torch.long), 3)
    assert state.shape == (0, columns) and scores.shape == (0, 3) and items.shape == (0, 3)
