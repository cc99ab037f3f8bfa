"""Every user error reaches the command line as one line naming the file, key or value and the fix,
with exit status 2 and no traceback (``--debug`` shows it)."""

import gzip
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launcher(name):
    spec = importlib.util.spec_from_file_location(f"launcher_{name}", os.path.join(ROOT, "launchers", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = launcher("train")


def one_line_error(capsys, argv, module=TRAIN):
    from recblr_torchrec.errors import run_command

    assert run_command(module.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("bad")
    with open(os.path.join(data_dir, "ml-100k", "ml-100k.inter.gz"), "rb") as f:
        whole = f.read()
    (folder / "truncated.inter.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "corrupt.txt.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"not a deflate stream" * 10)
    (folder / "latin1.txt").write_bytes(b"1 2 3 4 5\n2 7 8 \xe9 9\n")
    with gzip.open(folder / "short.txt.gz", "wt") as f:
        f.write("1 1 2 3\n2 2 3 4\n3 5 6 7\n")
    (folder / "empty.yaml").write_text("# nothing here\n")
    (folder / "adir").mkdir()
    (folder / "adir" / "inside.txt").write_text("1 1 2 3\n")
    return folder


@pytest.mark.parametrize(
    "settings, expected",
    [
        (["data.path={}/truncated.inter.gz"], "truncated.inter.gz cannot be read past line"),
        (["data.path={}/corrupt.txt.gz"], "corrupt.txt.gz cannot be read past line 0 (error: Error -3 while"),
        (["data.path={}/latin1.txt"], r"line 2 of {}/latin1.txt holds bytes that are not UTF-8 (b'\xe9')"),
        (["data.path={}/adir"], "data.path {}/adir is a folder, not a file; name a file in it (it holds: inside.txt)"),
        (["data.path={}/missing.txt"], "data file {}/missing.txt does not exist; point --data-dir"),
        (["data.path={}/short.txt.gz"], "is empty after 5-core users / 5-core items filtering (users / items / "),
        (["train.log_every=0"], "train.log_every=0 must be >= 1"),
        (["train.lr=nan"], "train.lr=nan must be a finite number > 0"),
        (["train.lr=.inf"], "train.lr=inf must be a finite number > 0"),
        (["train.device=tpu"], "train.device='tpu'; choose auto, cpu, cuda or cuda:N"),
        (["train.num_workers=-1"], "train.num_workers=-1 must be >= 0"),
        (["eval.ks=[]"], "eval.ks=[] must list cut-offs >= 1"),
        (["eval.ks=[0, 10]"], "eval.ks=[0, 10] must list cut-offs >= 1"),
        (["train.patience=0"], "train.patience=0 must be >= 1"),
        (["train.max_epochs=0"], "train.max_epochs=0 must be >= 1"),
        (["data.max_users=-5"], "data.max_users=-5 must be >= 0"),
        (["train.lrr=1"], "unknown config key train.lrr; known keys of train:"),
        (["model.embedding_dim=8"], "model.embedding_dim is now model.recblr.embedding_dim"),
    ],
)
def test_a_bad_setting_or_data_file_is_one_line_and_status_2(capsys, files, data_dir, tmp_path, settings, expected):
    argv = ["--data-dir", data_dir, "--output-dir", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path}"]
    argv += [item.replace("{}", str(files)) for item in settings]
    err = one_line_error(capsys, argv)
    assert expected.replace("{}", str(files)) in err, err


def test_an_empty_or_missing_config_file_is_refused(capsys, files):
    assert "is empty; give it the sections to change" in one_line_error(capsys, ["--config", str(files / "empty.yaml")])
    assert "config file nope.yaml does not exist" in one_line_error(capsys, ["--config", "nope.yaml"])


def test_unreadable_checkpoints_and_missing_artifacts_are_one_line(capsys, data_dir, tmp_path):
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    for name in ("last.pt", "previous.pt"):
        (run / name).write_bytes(b"not a checkpoint")
    argv = ["--data-dir", data_dir, "--output-dir", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path}"]
    assert "no readable checkpoint:" in one_line_error(capsys, argv)
    export = launcher("export")
    argv = ["--checkpoint", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "out")]
    assert "does not exist; pass a .pt file or a training run's --output-dir" in one_line_error(capsys, argv, export)


def test_the_process_exits_2_with_one_line_and_debug_shows_the_traceback(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "launchers", "train.py"), "--set", "train.lr=-1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: train.lr=-1.0 must be a finite number > 0 (--debug shows the traceback)"
    ]
    result = subprocess.run(command + ["--debug"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_a_rerun_with_other_settings_is_one_line_naming_them(capsys, data_dir, tmp_path):
    argv = ["--data-dir", data_dir, "--output-dir", str(tmp_path / "run"), "--set", f"data.cache_dir={tmp_path}"]
    argv += ["data.max_users=60", "train.max_epochs=1", "train.device=cpu"]
    assert TRAIN.main(argv) == 0
    capsys.readouterr()
    err = one_line_error(capsys, argv + ["train.seed=1", "train.batch_size=32"])
    assert f"{tmp_path / 'run'} holds a run with other settings: train.batch_size=256 (now 32), train.seed=2024 " in err
    assert "continue it anyway with --resume, start over with --overwrite, or use another --output-dir" in err
