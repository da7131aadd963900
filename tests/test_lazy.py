"""Lazy package exports: importing the packages does not load JAX, and every exported name resolves to the object
its module defines."""
import importlib
import subprocess
import sys

import pytest


def test_import_does_not_load_jax():
    code = "import sys, moegrok, moegrok.analysis, moegrok.theory; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("package", ["moegrok", "moegrok.analysis", "moegrok.theory"])
def test_exports_resolve(package):
    pkg = importlib.import_module(package)
    assert pkg.__all__ and pkg.__all__ == sorted(pkg._EXPORTS)
    for name, module in pkg._EXPORTS.items():
        assert getattr(pkg, name) is getattr(importlib.import_module(module), name)
        assert name in dir(pkg)
    with pytest.raises(AttributeError, match=rf"module '{package}' has no attribute 'no_such_name'"):
        getattr(pkg, "no_such_name")
