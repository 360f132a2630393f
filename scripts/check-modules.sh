#!/usr/bin/env bash
# The module dependency graph of src/ must have no cycle (ARCHITECTURE.md, "Dependencies").
#
# cargo-modules draws the graph of the library's modules (an edge for every `use` and every
# type in a signature or field, moved up to its module); graphviz's `acyclic` checks it, and
# on a cycle `sccmap` names every edge of it. cargo-modules' own `--acyclic` flag is not used:
# it checks the item graph, where a type and its own methods already form a cycle.
#
# Installs what it needs: graphviz from Debian, cargo-modules 0.27.0 from crates.io (pinned:
# 0.28 needs a newer rustc than this machine's; the first install takes 7 to 15 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v acyclic >/dev/null || ! command -v gvpr >/dev/null; then
  echo "check-modules: installing graphviz"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
fi
if ! cargo modules --version 2>/dev/null | grep -qx 'cargo-modules 0.27.0'; then
  echo "check-modules: installing cargo-modules 0.27.0 (once; several minutes)"
  cargo install --locked --quiet cargo-modules --version 0.27.0
fi

mkdir -p target
cargo modules dependencies --lib --no-externs --no-sysroot --no-fns --no-traits --no-types \
  --no-owns > target/modules.dot
if acyclic -n target/modules.dot; then
  echo "check-modules: the module graph of src/ has no cycle"
else
  echo "check-modules: module dependency cycle(s):" >&2
  sccmap target/modules.dot 2>/dev/null |
    gvpr 'BEG_G{if($G.name!="scc_map")print("cycle group:")} E{print("  ",$.tail.name," -> ",$.head.name)}' >&2
  exit 1
fi
