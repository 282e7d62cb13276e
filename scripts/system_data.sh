#!/usr/bin/env bash
# Fashion-MNIST (`--dataset fashion-mnist`, and the public data of `--model cnn-fmnist`) is a
# Debian/Ubuntu package, not a pip one: install it where this machine allows (root, or
# password-less sudo, and apt-get), else say why and what dpft uses instead. Never fails.
set -uo pipefail
dir="${DPFT_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
have() { [[ -f "$dir/train-images-idx3-ubyte.gz" && -f "$dir/t10k-labels-idx1-ubyte.gz" ]]; }
have && exit 0
why=""
if ! command -v apt-get >/dev/null 2>&1; then
    why="no apt-get on this system (not Debian/Ubuntu)"
elif [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    why="not root, and sudo needs a password"
fi
if [[ -z "$why" ]]; then
    echo "setup: installing Fashion-MNIST (apt-get install dataset-fashion-mnist, 31 MB)"
    export DEBIAN_FRONTEND=noninteractive
    if ! "${sudo[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
        "${sudo[@]}" apt-get update -q >/dev/null 2>&1
        "${sudo[@]}" apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || why="apt-get install failed"
    fi
fi
if have; then
    echo "setup: Fashion-MNIST installed under $dir"
else
    [[ -n "$why" ]] || why="the package does not put its files under $dir"
    echo "setup: Fashion-MNIST NOT installed ($why). --model cnn-fmnist will be pretrained on"
    echo "       scikit-learn's digits instead (said in each run); --dataset fashion-mnist needs"
    echo "       'apt-get install dataset-fashion-mnist' as root, or DPFT_FASHION_MNIST_DIR set to its four idx files."
fi
exit 0
