#!/usr/bin/env bash
# Lists crates whose enabled features differ between `cargo test --workspace` and the build of
# crates/py alone (what `maturin develop` does). Any crate in burn's dependency tree listed here
# makes scripts/test.sh compile burn twice; add it to crates/py/Cargo.toml with the workspace's
# features. Exit 1 when something differs.
set -euo pipefail
cd "$(dirname "$0")/.."
tree() { cargo tree "$@" -f "{p} [{f}]" --prefix none | sed 's/ (\*)$//' | sort -u; }
diff <(tree -p fedhubert-py -e normal,build | grep -v '^fedhubert-') \
     <(tree --workspace -e normal,build,dev | grep -v '^fedhubert-' \
        | grep -F -f <(tree -p fedhubert-py -e normal,build | grep -v '^fedhubert-' | sed 's/ \[.*//; s/$/ [/'))
