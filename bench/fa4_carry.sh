#!/bin/bash
# flash-attn 4 (flash_attn.cute, pure Python on the CuTe DSL) on the lent device machine.
# Its nvidia-cutlass-dsl-libs-cu13 wheel (92 MB) is over the 64 MiB one device call carries, so it
# travels in two pieces over two consecutive calls; the machine keeps /root/fa4parts between calls
# only while it is warm (30 s after a call), so issue the second call right after the first.
#
#   here, once, from the repository root:       bash bench/fa4_carry.sh download
#   device call 1 (carry .fa4a):                 bash bench/fa4_carry.sh stage
#   device call 2 (carry .fa4b .whl), at once:   bash bench/fa4_carry.sh install &&
#       export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PWD
#
# `install` puts every wheel (these and the hydra/omegaconf ones in .whl) into /tmp/fa4site; the
# second PYTHONPATH entry does what nvidia_cutlass_dsl's .pth file would do in a site directory.
set -euo pipefail
BIG=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
WHEELS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
        nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
        quack-kernels==0.6.5)  # einops, cuda-bindings, protobuf, typing_extensions: on the image
PIECES=/root/fa4parts
SITE=/tmp/fa4site

pip_download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}

case "${1:-}" in
download)
    for folder in /.fa4a/ /.fa4b/; do
        grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude
    done
    rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
    pip_download .fa4b "${WHEELS[@]}" nvidia-cutlass-dsl-libs-cu13==4.8.1
    (cd .fa4b && sha256sum "$BIG" > cu13.sha256 && split -b 45M "$BIG" cu13part. && rm "$BIG")
    mv .fa4b/cu13part.aa .fa4a/
    du -sh .fa4a .fa4b
    ;;
stage)
    mkdir -p "$PIECES" && cp .fa4a/cu13part.aa "$PIECES/"
    ;;
install)
    if [ ! -f "$PIECES/cu13part.aa" ]; then
        echo "fa4_carry.sh install: $PIECES/cu13part.aa is missing (the machine went cold after" \
             "'stage'); run the 'stage' call again and this one right after it" >&2
        exit 3
    fi
    wheels=$(mktemp -d)
    cat "$PIECES/cu13part.aa" .fa4b/cu13part.ab > "$wheels/$BIG"
    (cd "$wheels" && sha256sum -c "$OLDPWD/.fa4b/cu13.sha256")
    cp .fa4b/*.whl .whl/*.whl "$wheels/"
    # a fresh target: pip --target skips (does not merge) folders that already exist there
    rm -rf "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$wheels"/*.whl
    ;;
*)
    echo "usage: bash bench/fa4_carry.sh download|stage|install (see the comment at its top)" >&2
    exit 2
    ;;
esac
