#!/usr/bin/env bash
# Builds keras-seht's sdist and wheel and checks that the wheel works when
# installed: in a fresh virtual environment, from a folder outside the
# source tree, once per Keras backend, `scripts/wheel_smoke.py` imports
# it, checks its version and requirements, and trains one SEHT step.
#
#   BIN=.venv/bin BACKENDS="jax torch tensorflow" scripts/wheel_check.sh
#
# Offline and fast: the build uses BIN's setuptools (`--no-isolation`),
# the wheel is installed with `--no-deps --no-index`, and the third-party
# packages (Keras, the backends, NumPy) are BIN's environment's, made
# visible to the fresh one by a .pth line. A .pth line only adds that
# site-packages folder to sys.path, behind the fresh environment's own;
# the .pth files inside it (the editable install of keras-seht) are not
# run, so keras_seht can only come from the wheel, which the smoke test
# asserts.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${BIN:-$root/.venv/bin}" && pwd)
read -r -a backends <<< "${BACKENDS:-jax torch tensorflow}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# TensorFlow's start-up notices are noise here; its errors still show.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' \
    "$root/keras_seht/version.py")
[[ -n $version ]] || { echo "no __version__ in version.py" >&2; exit 1; }

# The sdist, then the wheel built from the unpacked sdist (as pip would
# from PyPI): a file missing from the sdist breaks the wheel.
if ! "$bin/python" -m build --no-isolation --outdir "$work/dist" "$root" \
        > "$work/build.log" 2>&1; then
    cat "$work/build.log"
    exit 1
fi
sdist=$work/dist/keras_seht-$version.tar.gz
wheel=$work/dist/keras_seht-$version-py3-none-any.whl
"$bin/python" - "$sdist" "$wheel" <<'EOF'
import sys, tarfile, zipfile

sdist, wheel = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
stray = [n for n in names if not n.startswith("keras_seht")]
assert not stray, f"files outside the package in the wheel: {stray}"
assert "keras_seht/experiments/demo.py" in names, "demo missing"
entry_points = next(n for n in names if n.endswith("entry_points.txt"))
text = zipfile.ZipFile(wheel).read(entry_points).decode()
assert "keras-seht = keras_seht.console:main" in text, text
members = {m.split("/", 1)[-1] for m in tarfile.open(sdist).getnames()}
missing = {"LICENSE", "README.md", "pyproject.toml"} - members
assert not missing, f"missing from the sdist: {missing}"
print(f"built {sdist.rsplit('/', 1)[-1]} and {wheel.rsplit('/', 1)[-1]}"
      f" ({len(names)} files)")
EOF

# A fresh environment with only the wheel installed; the dependencies
# come from BIN's environment through the .pth line, added after the
# install so that pip does not see the editable keras-seht there.
"$bin/python" -m venv --without-pip "$work/venv"
"$bin/python" -m pip --python "$work/venv/bin/python" install --quiet \
    --no-deps --no-index --disable-pip-version-check "$wheel"
purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
"$bin/python" -c "$purelib" \
    > "$("$work/venv/bin/python" -c "$purelib")/_keras_seht_deps.pth"

cp "$root/scripts/wheel_smoke.py" "$work/"
cd "$work"
for backend in "${backends[@]}"; do
    KERAS_BACKEND=$backend "$work/venv/bin/python" -I wheel_smoke.py \
        --version "$version"
done
# The console entry point of the wheel.
out=$(KERAS_BACKEND=${backends[0]} "$work/venv/bin/keras-seht" --version)
[[ $out == "keras-seht $version "* ]] || {
    echo "keras-seht --version printed: $out" >&2; exit 1; }
echo "$out"
echo "wheel check passed: ${backends[*]}"
