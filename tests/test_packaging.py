"""The top-level kernels/ folder imports as recblr_torchrec.kernels through the package install alone
(editable or wheel), and a checkout that is not installed says how to install it."""

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "import os, recblr_torchrec, recblr_torchrec.kernels as k; "
    "from recblr_torchrec import linear_scan, KernelBackend; "
    "print(os.path.dirname(recblr_torchrec.__file__)); print(os.path.dirname(k.__file__))"
)


def run_probe(cwd, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


def test_a_checkout_on_pythonpath_without_the_install_says_to_install_it(tmp_path):
    # A fresh interpreter without this environment's install (-S: no site-packages, hence no
    # editable finder), the checkout on its path: the package imports, its kernels do not.
    env = {"PYTHONPATH": ROOT, "PATH": os.environ.get("PATH", "")}
    probe = "import recblr_torchrec"
    result = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "only the package install maps: run `bash scripts/setup_venv.sh`" in result.stderr
    assert "offline: `python -m pip install --no-deps --no-build-isolation -e .`" in result.stderr


def test_the_editable_install_maps_the_checkouts_kernels_folder(tmp_path):
    package, kernels = run_probe(tmp_path, ROOT)
    assert package == os.path.join(ROOT, "recblr_torchrec") and kernels == os.path.join(ROOT, "kernels")


def test_installed_package_maps_kernels(tmp_path):
    # From a folder outside the checkout, without PYTHONPATH: the install in this interpreter
    # (editable in .venv) must resolve the subpackage to the kernels/ folder.
    package, kernels = run_probe(tmp_path)
    assert os.path.basename(kernels) == "kernels" and os.path.isfile(os.path.join(kernels, "backend.py"))


def test_wheel_contains_kernels_as_a_subpackage(tmp_path):
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), ROOT]
    result = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(tmp_path / "site")
    assert "recblr_torchrec/kernels/linear_scan/pytorch.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    for folder, prefix in (("recblr_torchrec", "recblr_torchrec"), ("kernels", "recblr_torchrec/kernels")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__init__.py" in files:  # every subpackage must be listed in pyproject's packages
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder)).replace(os.sep, "/")
                inner = prefix if rel == "." else f"{prefix}/{rel}"
                assert f"{inner}/__init__.py" in names, f"{inner} is missing from the wheel; list it in pyproject"
    package, kernels = run_probe(tmp_path, str(tmp_path / "site"))
    assert kernels == os.path.join(str(tmp_path / "site"), "recblr_torchrec", "kernels")
