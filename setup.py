"""What pyproject.toml cannot say: the repository's top-level configs/ and docs/ ship inside the package, as
moegrok.configs and moegrok.docs, so that an installed wheel runs `moegrok run tiny` and its reports can carry the
method document, while the repository keeps its layout and each file exists once. Everything else is in
pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["moegrok", "moegrok.*"]) + ["moegrok.configs", "moegrok.docs"],
      package_dir={"moegrok.configs": "configs", "moegrok.docs": "docs"})
