#!/usr/bin/env bash
# Install the Debian packages replicator's tests, demo and benchmarks need.
#
# QEMU 10 comes from bookworm-backports. When no backports source is configured we copy the
# machine's own Debian source entry and change only its suite, so a user's mirror is respected
# and no host name is hard-coded here.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "install-deps: must run as root (apt-get)" >&2
    exit 1
fi

. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}
backports="${codename}-backports"

have_backports() {
    grep -rqsE "(^|[[:space:]])${backports}([[:space:]]|$)" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

add_backports() {
    local deb822=/etc/apt/sources.list.d/debian.sources
    local out=/etc/apt/sources.list.d/replicator-backports
    if [ -f "$deb822" ]; then
        # First stanza whose Suites names the plain codename: copy it, keep only the suite changed.
        awk -v cn="$codename" -v bp="$backports" '
            BEGIN { RS=""; ORS="\n\n" }
            $0 ~ ("Suites:[^\n]*(^|[ \t])" cn "([ \t]|\n|$)") && !done {
                n = split($0, lines, "\n"); s = ""
                for (i = 1; i <= n; i++) {
                    if (lines[i] ~ /^Suites:/) lines[i] = "Suites: " bp
                    s = s lines[i] "\n"
                }
                printf "%s", s; done = 1
            }' "$deb822" > "$out.sources"
        [ -s "$out.sources" ] || { rm -f "$out.sources"; return 1; }
    elif [ -f /etc/apt/sources.list ]; then
        grep -E "^deb[[:space:]].*[[:space:]]${codename}[[:space:]]" /etc/apt/sources.list | head -n1 \
            | sed -E "s/[[:space:]]${codename}[[:space:]]/ ${backports} /" > "$out.list"
        [ -s "$out.list" ] || { rm -f "$out.list"; return 1; }
    else
        return 1
    fi
}

if ! have_backports; then
    echo "install-deps: enabling ${backports} (copied from this machine's Debian source)"
    add_backports || { echo "install-deps: cannot find a Debian source entry to copy" >&2; exit 1; }
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q

# QEMU 10 from backports; bookworm's 7.2 lacks what the switch needs. qemu-utils (qemu-img)
# of the same version makes the qcow2 disks of the tests. libvirt from backports too, in the
# same transaction: bookworm's libvirt 9.0 predates QEMU 10, backports' matches it.
# libvirt-dev (same version) is what the libvirt-python binding builds against.
apt-get install -y -q --no-install-recommends -t "$backports" qemu-system-x86 qemu-utils \
    libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev

# Everything else from the release itself.
apt-get install -y -q --no-install-recommends \
    busybox-static cpio gzip xz-utils zstd gcc libc6-dev binutils \
    pkg-config python3-dev \
    iproute2 procps \
    prometheus \
    chromium chromium-driver \
    systemd

echo "install-deps: done ($(qemu-system-x86_64 --version | head -n1); libvirt $(virsh --version))"
