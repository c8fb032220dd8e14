"""Packaging: the light install, the extras' one-line errors, one version source, TOML on Python < 3.11.

The wheel test builds the wheel from a copy of the source and installs it with `pip --no-index` into a fresh
venv whose only other packages are torch and numpy (and what they need), exposed from this interpreter's
site-packages through a .pth file of symlinks: a real `pip install torch==2.13.0 numpy` into a new venv took
70 s here (measured 2026-12-01), too slow for every CI run; `--no-index` makes any dependency beyond
torch + numpy fail the install instead of being fetched.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIGHT = ("torch", "numpy")
HEAVY = ("monai", "nibabel", "scipy", "tqdm", "matplotlib")


def _sp(*args, **kw):
    kw.setdefault("timeout", 180)   # a hung subprocess fails the test instead of the whole run
    return subprocess.run(*args, **kw)


def _venv_run(cmd, **kw):
    """Run in the light venv without this checkout on PYTHONPATH (else its macl, and its benchmarks, would run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_CONSTRAINT")}
    return _sp(cmd, capture_output=True, text=True, env=env, **kw)


def _closure(names):
    """Distributions `names` need (recursively, extras-free markers that apply here), as metadata objects."""
    seen, todo = {}, list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[]", todo.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(req)
    return seen


def _expose(dists, target: Path) -> None:
    """Symlink every top-level entry (packages, modules, .dist-info) of `dists` into `target`."""
    target.mkdir(parents=True)
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            src = base / top
            if top not in ("..", "bin") and src.exists() and not (target / top).exists():
                (target / top).symlink_to(src)


@pytest.fixture(scope="module")
def light_env(tmp_path_factory):
    """(python, bin dir) of a fresh venv with this package's wheel installed beside torch and numpy only."""
    tmp = tmp_path_factory.mktemp("light")
    src = tmp / "src"
    for name in ("macl", "macl_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp / "wheels"
    built = None
    for isolation in (["--no-build-isolation"], []):   # this interpreter's setuptools (>= 77), else pip's own
        built = _sp([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(wheels),
                     str(src)], capture_output=True, text=True)
        if built.returncode == 0:
            break
    assert built.returncode == 0, built.stderr[-2000:]
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(_venv_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True).stdout.strip())
    _expose(_closure(LIGHT + ("pip",)), tmp / "light_site")
    (site / "light_deps.pth").write_text(str(tmp / "light_site") + "\n")
    wheel = next(wheels.glob("macl-*.whl"))
    out = _venv_run([str(py), "-m", "pip", "install", "--no-index", "-q", str(wheel)])
    assert out.returncode == 0, out.stderr[-2000:]
    return py, env_dir / "bin", wheel


def _run(py, code):
    return _venv_run([str(py), "-c", code], cwd=str(py.parent))


@pytest.mark.slow
def test_light_wheel_runs_every_loss_and_names_the_missing_extra(light_env):
    py, bindir, wheel = light_env
    heavy = _run(py, f"import importlib.util as u; print([m for m in {HEAVY!r} if u.find_spec(m)])")
    assert heavy.stdout.strip() == "[]", heavy.stdout + heavy.stderr   # nothing beyond torch + numpy
    where = _run(py, "import macl_kernels, os; print(macl_kernels.__file__)").stdout
    assert str(ROOT) not in where and "site-packages" in where, where  # the installed copy, not this checkout
    losses = _run(py, """
import torch, macl_kernels as K
from macl_kernels.compat import LightlyNTXentLoss, MonaiContrastiveLoss, PMLNTXentLoss, SupContrastLoss
torch.manual_seed(0)
z1, z2, f = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8), torch.randn(6, 2, 8, requires_grad=True)
lab, pos = torch.tensor([0, 1, 0, 1, 2, 2]), torch.rand(6)
fm = torch.randn(2, 8, 4, 4, requires_grad=True)
vals = [K.nt_xent(z1, z2), K.sup_con(f, lab), K.positional_sup_con(f, pos), K.info_nce(z1, z2),
        K.dense_info_nce(fm, fm.detach() + 0.1), K.grouped_info_nce(z1, z2).loss,
        LightlyNTXentLoss()(z1, z2), MonaiContrastiveLoss()(z1, z2), PMLNTXentLoss()(z1, lab),
        SupContrastLoss()(f, lab)]
for v in vals:
    v.backward(retain_graph=True)
assert all(torch.isfinite(v) for v in vals) and torch.isfinite(z1.grad).all()
print(len(vals), "losses ok")
""")
    assert losses.returncode == 0 and "10 losses ok" in losses.stdout, losses.stderr[-2000:]
    helped = _venv_run([str(bindir / "macl"), "pretrain", "--help"], cwd=str(bindir))
    assert helped.returncode == 0 and "--batch-size" in helped.stdout, helped.stderr  # the help needs no extra
    assert 'note: macl pretrain needs the medical extra' in helped.stdout and "monai" in helped.stdout
    ran = _venv_run([str(bindir / "macl"), "pretrain", "--data", "x", "--out", "y"], cwd=str(bindir))
    lines = ran.stderr.strip().splitlines()
    assert ran.returncode == 1 and len(lines) == 1 and 'pip install "macl[medical]"' in lines[0], ran.stderr
    imported = _run(py, "import macl.data")
    assert 'pip install "macl[medical]"' in imported.stderr.strip().splitlines()[-1], imported.stderr
    bench = _venv_run([str(bindir / "macl"), "bench"], cwd=str(bindir))
    assert bench.returncode == 1 and "source checkout" in bench.stderr, bench.stderr
    listed = _venv_run([str(bindir / "macl"), "--help"], cwd=str(bindir))
    assert "bench" not in listed.stdout and "pretrain" in listed.stdout


def test_wheel_metadata_light_requirements_and_one_version(light_env):
    import zipfile
    _, _, wheel = light_env
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    required = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    base = sorted(re.split(r"[ ;<>=]", r)[0] for r in required if "extra ==" not in r)
    assert base == ["numpy", "torch"], required
    for extra in ("medical", "demo", "tensorboard"):
        assert f"Provides-Extra: {extra}" in meta
    import macl
    assert f"Version: {macl.__version__}" in meta
    assert "License-Expression: Apache-2.0" in meta and "Classifier: Typing :: Typed" in meta
    assert "macl/py.typed" in names and "macl_kernels/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)


def test_one_version_source():
    import macl
    import macl_kernels
    assert macl_kernels.__version__ == macl.__version__
    from macl.settings.toml_compat import loads
    meta = loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and meta["project"]["dynamic"] == ["version"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "macl.__version__"}
    hits = [p for p in list((ROOT / "macl").rglob("*.py")) + list((ROOT / "macl_kernels").rglob("*.py"))
            if re.search(r"__version__\s*=\s*['\"]", p.read_text())]
    assert hits == [ROOT / "macl" / "__init__.py"], hits


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_missing_extra_error_names_the_extra(monkeypatch):
    from macl import extras
    monkeypatch.setitem(sys.modules, "nibabel", None)   # import nibabel -> ModuleNotFoundError
    with pytest.raises(extras.MissingExtraError, match=r'pip install "macl\[medical\]"'):
        extras.import_module("nibabel", "medical", "reading NIfTI")
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name: None if name == "monai" else object())
    assert extras.command_problem("pretrain") == ('macl pretrain needs the medical extra (missing: monai): '
                                                  'pip install "macl[medical]"')
    assert extras.command_problem("bench") is None


# ---------------------------------------------------------------------------------- TOML, Python < 3.11

CONFIG = '[net]\ndims = 3\nbase_width = 8\n[method]\nname = "pcl"\n'


def test_tomli_fallback_path_parses_a_config(monkeypatch, tmp_path):
    """Python < 3.11 takes `tomli` (patched version_info; tomli stood in for by tomllib, the same parser)."""
    import tomllib
    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)            # no tomllib before 3.11
    fake = type(sys)("tomli")
    fake.loads = tomllib.loads
    monkeypatch.setitem(sys.modules, "tomli", fake)
    import macl.settings.toml_compat as tc
    tc = importlib.reload(tc)
    try:
        assert tc._toml is fake
        from macl.settings.config import load_config
        (tmp_path / "c.toml").write_text(CONFIG)
        cfg = load_config(tmp_path / "c.toml")
        assert (cfg.net.dims, cfg.net.base_width, cfg.method.name) == (3, 8, "pcl")
        monkeypatch.setitem(sys.modules, "tomli", None)
        assert importlib.reload(tc)._toml is None
        with pytest.raises(ModuleNotFoundError, match="tomli"):
            tc.loads(CONFIG)
    finally:
        monkeypatch.undo()
        importlib.reload(tc)


@pytest.mark.parametrize("version", ["3.9", "3.10"])
def test_real_old_python_parses_a_config(version, tmp_path):
    """Under a real Python 3.9 / 3.10 (pyenv, where present) with tomli installed, macl.settings.config reads TOML."""
    candidates = [shutil.which(f"python{version}")] + sorted(
        str(p) for p in (Path.home() / ".pyenv" / "versions").glob(f"{version}.*/bin/python{version}"))
    exe = next((c for c in candidates if c and _sp([c, "-c", "pass"], capture_output=True).returncode == 0), None)
    if exe is None:
        pytest.skip(f"no working python{version} here (pyenv or PATH)")
    got = _sp([exe, "-m", "pip", "install", "-q", "--target", str(tmp_path / "lib"), "tomli"],
                         capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip(f"cannot install tomli for python{version}: {got.stderr.strip().splitlines()[-1:]}")
    (tmp_path / "c.toml").write_text(CONFIG)
    out = _sp([exe, "-c", "import sys; from macl.settings.config import load_config; "
                          f"c = load_config({str(tmp_path / 'c.toml')!r}); "
                          "print(sys.version_info[:2], c.net.dims, c.net.base_width, c.method.name)"],
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path / 'lib'}{os.pathsep}{ROOT}"})
    assert out.returncode == 0, out.stderr[-1500:]
    major, minor = version.split(".")
    assert out.stdout.strip() == f"({major}, {minor}) 3 8 pcl", out.stdout
