#!/usr/bin/env bash
# The whole test suite: the Rust workspace, then the Flower app against the `fedhubert` Python
# extension (crates/py) on real Flower processes on loopback.
#
# Creates (or reuses) the virtual environment .venv with the pinned Flower, maturin and pytest;
# builds the extension with the dev profile into the same target dir as `cargo test`, so the
# compiled burn dependencies are shared instead of built a second time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${FEDHUBERT_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# pip only downloads when a pin changed; a reused venv costs a second here.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r flower/requirements.txt

cargo test --workspace

# The native runner the parity tests compare against: `cargo test` built it for the cli tests
# (a separate `cargo build -p fedhubert-cli` would resolve features differently and rebuild burn).
export FEDHUBERT_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/fedhubert

VIRTUAL_ENV=$VENV "$VENV/bin/maturin" develop --quiet --manifest-path crates/py/Cargo.toml
"$VENV/bin/python" -m pytest flower/tests -v -s
