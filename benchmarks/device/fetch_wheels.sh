#!/usr/bin/env bash
# Run on a machine with package-registry access: downloads tokamax and the dependencies a JAX/Flax image usually
# lacks into benchmarks/device/wheels/ (git-ignored), so an offline GPU machine can install them:
#   pip install --no-index --find-links benchmarks/device/wheels tokamax
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
python -m pip download --no-deps -d wheels tokamax qwix einshape immutabledict jaxtyping wadler-lindig \
    "typeguard==2.13.3" tensorboardx pydantic pydantic-core annotated-types typing-inspection
# pydantic-core is compiled: the wheel downloaded is for this machine's Python and platform; on another Python,
# add --python-version X.Y --platform manylinux2014_x86_64 --only-binary=:all: to the command above.
ls wheels
