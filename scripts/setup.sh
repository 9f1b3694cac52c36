#!/usr/bin/env bash
# Install what tokenforge needs to run offline: the Debian packages that carry the built-in datasets
# (see shared DATA.md), then the project itself in editable mode with its dev tools.
# Safe to run again: installed packages are skipped, pip install -e is idempotent.
set -euo pipefail

DEBIAN_PACKAGES=(dataset-fashion-mnist fonts-noto-color-emoji espeak-ng fluidsynth fluid-soundfont-gm)

cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
if command -v dpkg >/dev/null 2>&1; then
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        if ! dpkg -s "$pkg" >/dev/null 2>&1; then
            missing+=("$pkg")
        fi
    done
else
    echo "setup.sh: dpkg not found (not a Debian-like system); install the equivalents of" \
         "${DEBIAN_PACKAGES[*]} yourself, or point each dataset's data.params.root at your copy." >&2
fi

if ((${#missing[@]})); then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "setup.sh: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
        echo "setup.sh: the built-in datasets need Debian packages that are not installed. Run:"
        echo "    sudo apt-get install -y ${missing[*]}"
        echo "setup.sh: continuing without them (those datasets will say what is missing when used)."
    fi
else
    echo "setup.sh: Debian packages present: ${DEBIAN_PACKAGES[*]}"
fi

python -m pip install -e ".[dev]"
