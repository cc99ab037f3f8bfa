"""The scorer through torch.export and AOTInductor: same parity as scorer.pt for any T and up to the
compiled number of users, and its checks."""

import json
import os

import pytest
import torch

from recblr_torchrec.serving import export

from .conftest import NUM_EMBEDDINGS, random_histories, random_model, write_checkpoint

BATCH, K = 3, 5


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    run = tmp_path_factory.mktemp("aoti_run")
    write_checkpoint(random_model(5, num_layers=1), str(run / "best.pt"))  # one layer: a shorter compile
    out = tmp_path_factory.mktemp("aoti")
    manifest = export(str(run / "best.pt"), str(out), aoti_batch=BATCH, aoti_k=K)
    return str(out), manifest


@pytest.mark.skipif(
    torch.__version__ < (2, 13),  # a TorchVersion: compares with tuples
    reason="torch 2.11's AOTInductor fails to lower the scan loop (codegen_while_loop, measured on the H200 "
    "machine); export then raises the error test_a_failed_compile_keeps_the_torchscript_artifacts checks",
)
def test_aoti_scorer_equals_torchscript_scorer_at_any_length(packaged, monkeypatch):
    out, manifest = packaged
    assert manifest["files"]["scorer_aoti"] == {**manifest["files"]["scorer_aoti"], "batch": BATCH, "k": K}
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["files"] == manifest["files"]  # rewritten on disk after the compile
    monkeypatch.setenv("AOTI_RUNTIME_CHECK_INPUTS", "1")
    compiled = torch._inductor.aoti_load_package(os.path.join(out, "scorer_aoti.pt2"))
    scorer = torch.jit.load(os.path.join(out, "scorer.pt"))
    for steps, lengths in ((2, [2, 0, 1]), (9, [9, 4, 1]), (23, [23, 0, 17])):  # one compiled program, any T
        ids, lengths = random_histories(BATCH, steps, lengths, seed=steps)
        scores, items = compiled(ids, lengths)
        ref_scores, ref_items = scorer(ids, lengths, K)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
        assert torch.equal(items, ref_items)
    with pytest.raises(Exception, match="item_ids must be catalog items"):
        compiled(ids.masked_fill(ids == 0, NUM_EMBEDDINGS + 3), lengths)
    with pytest.raises(Exception, match="lengths must be in"):
        compiled(ids, lengths + 30)
    for users in (2, 1, 0):  # fewer users than compiled: exactly their rows
        scores, items = compiled(ids[:users], lengths[:users])
        ref_scores, ref_items = scorer(ids[:users], lengths[:users], K)
        assert scores.shape == (users, K) and torch.equal(items, ref_items)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-5)
    more, more_lengths = random_histories(BATCH + 1, 4, [4, 3, 2, 1], seed=4)
    with pytest.raises(Exception, match=f"compiled for at most {BATCH} users a call"):
        compiled(more, more_lengths)
    with pytest.raises(Exception, match="expected size 2==3"):  # AOTInductor's guards (AOTI_RUNTIME_CHECK_INPUTS)
        compiled(ids, lengths[:2])
    with pytest.raises(Exception, match="unmatched dtype"):
        compiled(ids.int(), lengths)


def test_a_failed_compile_keeps_the_torchscript_artifacts_and_says_what_to_do(tmp_path, monkeypatch):
    from recblr_torchrec.serving import aot

    def fail(*args, **kwargs):
        raise AssertionError("lowering failed")

    monkeypatch.setattr(aot, "export_scorer", lambda scorer, k, batch: None)  # the compile is what fails
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    write_checkpoint(random_model(5, num_layers=1), str(tmp_path / "best.pt"))
    out = tmp_path / "serving"
    with pytest.raises(RuntimeError, match="AOTInductor could not compile.*AssertionError: lowering failed.*scorer.pt"):
        export(str(tmp_path / "best.pt"), str(out), aoti_batch=BATCH, aoti_k=K)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) == {"scorer", "step"}  # written before the compile, without it
    assert torch.jit.load(str(out / "scorer.pt")) is not None and (out / "step.pt").is_file()
