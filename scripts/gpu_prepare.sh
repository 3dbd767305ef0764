#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before scripts/gpu_check.sh: gathers what the GPU machine lacks into
# paths that git ignores, for the device tool's `carry`: Multi30k into data/multi30k, and wheels of
# datasets and the packages it needs beyond that machine's image into .whl/.
# Then call the device tool with carry=["data/multi30k", ".whl"] and command "bash scripts/gpu_check.sh".
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p data/multi30k .whl
data_path=${MT_DATA_PATH:-../shared/data}
cp "${data_path%%:*}"/multi30k/* data/multi30k/  # the first folder of a MT_DATA_PATH list
rm -f .whl/*.whl  # two versions of one package would stop the install there
for pkg in datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
# The commit being checked, for the log: the GPU machine's copy of .git can lag behind the working tree.
{ git rev-parse HEAD; git status --short --untracked-files=no; } > .whl/COMMIT
ls -la data/multi30k .whl
