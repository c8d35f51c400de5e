#!/usr/bin/env bash
# Builds target/debian/stoa_<version>_<arch>.deb with cargo-deb: the stoa binary, the
# systemd units (packaging/), bash/zsh/fish completions and the manual pages, both
# generated from the CLI's definitions.
# Usage: scripts/package-deb.sh [--profile release|dev]   (default: release)
# Needs cargo-deb (`cargo install cargo-deb --locked`).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
[ "${1:-}" = --profile ] && profile=${2:?--profile needs release or dev}
dir=$([ "$profile" = dev ] && echo debug || echo release)
command -v cargo-deb >/dev/null || { echo "package-deb: cargo-deb is not installed (cargo install cargo-deb --locked)" >&2; exit 1; }
echo "package-deb: building stoa ($profile)" >&2
cargo build -q -p stoa --bin stoa --profile "$profile"
bin=target/$dir/stoa
out=target/packaging
rm -rf "$out"; mkdir -p "$out/completions" "$out/man"
"$bin" completions bash > "$out/completions/stoa"
"$bin" completions zsh > "$out/completions/_stoa"
"$bin" completions fish > "$out/completions/stoa.fish"
"$bin" man "$out/man" 2>/dev/null
gzip -9n "$out"/man/*.1
# cargo-deb maps target/release in the assets to the profile's directory.
cargo deb -p stoa --no-build --profile "$profile" --strip
