#!/usr/bin/env bash
# The CPU base images, made from Debian packages with debootstrap and buildah, for clusters and CI machines
# that cannot pull the stock Python image (air-gapped registries, no Docker Hub):
#
#   <name>:bookworm-<snapshot>        Debian bookworm minbase + python3 (3.11) + a venv at /opt/venv on PATH
#                                     (Debian's python refuses `pip install` into the system: PEP 668)
#   <name>-torch:bookworm-<snapshot>-torch<version>
#                                     the same + CPU torch: the base of the judge and of the CPU train and
#                                     generate images, so that the three share one torch layer
#
# Usage (make images-base runs it): images/cpu-base.sh <name> <torch requirement> [buildah flags for pip...]
# Environment: DEBIAN_SNAPSHOT (a snapshot.debian.org date), DEBIAN_MIRROR (default: that snapshot),
# BASE_WORK (scratch directory). An image that exists already is kept (delete it to rebuild).
set -euo pipefail

name=$1
torch_req=$2
shift 2
pip_flags=("$@")  # -v mounts of the pip mirror / CA (images/build_mounts.py): read-only, never in a layer

snapshot=${DEBIAN_SNAPSHOT:-20250520T000000Z}
suite=bookworm
work=${BASE_WORK:-build/images/base}
base="$name:$suite-$snapshot"
torch_tag="$name-torch:$suite-$snapshot-${torch_req//==/}"

exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

if exists "$base"; then
    echo "cpu-base: $base exists (buildah rmi it to rebuild)"
else
    mirror=${DEBIAN_MIRROR:-http://snapshot.debian.org/archive/debian/$snapshot}
    if [ -z "${DEBIAN_MIRROR:-}" ] && ! curl -fsS -m 20 -o /dev/null "$mirror/dists/$suite/Release"; then
        # Pinned where the snapshot service is reachable; here (a proxy that allows only the live mirror)
        # the image says in its labels that it is not, and from which Release date it was made.
        mirror=http://deb.debian.org/debian
        echo "cpu-base: WARNING snapshot.debian.org unreachable: using $mirror (NOT pinned to $snapshot;" \
            "set DEBIAN_MIRROR to a snapshot or an internal mirror)" >&2
    fi
    rootfs="$work/rootfs"
    rm -rf "$rootfs"
    mkdir -p "$work"
    echo "cpu-base: debootstrap $suite from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$rootfs" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }
    release_date=$(sed -n 's/^Date: //p' "$rootfs"/var/lib/apt/lists/*_dists_${suite}_Release 2>/dev/null | head -1)
    # Nothing a running stage needs: package downloads, apt lists, docs, man pages.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*

    # Layer 1: the Debian root file system.
    ctr=$(buildah from scratch)
    trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
    tar -C "$rootfs" --numeric-owner -cf - . | tar -C "$(buildah mount "$ctr")" --numeric-owner -xpf -
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash \
        --label "org.opencontainers.image.base.name=debian:$suite" \
        --label "cmv.debian.snapshot=$snapshot" --label "cmv.debian.mirror=$mirror" \
        --label "cmv.debian.release-date=$release_date" "$ctr"
    buildah commit --quiet --rm "$ctr" "$base-rootfs" >/dev/null
    # Layer 2: the venv, first on PATH (pip and python3 of the Dockerfiles are the venv's).
    ctr=$(buildah from "$base-rootfs")
    buildah run --isolation chroot "$ctr" -- python3 -m venv /opt/venv
    buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env VIRTUAL_ENV=/opt/venv --cmd python3 "$ctr"
    buildah commit --quiet --rm "$ctr" "$base" >/dev/null
    buildah rmi "$base-rootfs" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    echo "cpu-base: $base"
fi

if exists "$torch_tag"; then
    echo "cpu-base: $torch_tag exists"
else
    # Layer 3: CPU torch, from the mirror that pip's mounted settings name (its CPU wheel), or PyPI's CPU index.
    ctr=$(buildah from "$base")
    trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
    # torch's own dependencies at the versions of images/constraints.txt, as every stage image pins them.
    buildah run --isolation chroot "${pip_flags[@]}" -v "$PWD/images/constraints.txt:/run/cmv-constraints.txt:ro" \
        "$ctr" -- sh -c "PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
         pip install -q '$torch_req' -c /run/cmv-constraints.txt \
         && python3 -c 'import torch; assert torch.version.cuda is None, torch.version.cuda; print(\"torch\", torch.__version__)'"
    buildah commit --quiet --rm "$ctr" "$torch_tag" >/dev/null
    trap - EXIT
    echo "cpu-base: $torch_tag"
fi
