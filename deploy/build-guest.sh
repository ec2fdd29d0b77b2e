#!/usr/bin/env bash
# Build replicator's tiny test guest: an uncompressed Debian kernel (booted through QEMU's PVH
# entry, `-kernel vmlinux`) and a busybox initramfs whose /init runs deploy/guest/guestload.c
# (serial "COUNTER <n>" every 0.5 s, plus optional memory fill and dirtying, disk check and
# disk writes). The initramfs carries the kernel package's virtio-blk modules, so a disk that
# QEMU attaches as virtio-blk-pci shows up as /dev/vda.
#
#   deploy/build-guest.sh [OUTDIR]        (default: <repo>/build/guest)
#
# Outputs OUTDIR/vmlinux and OUTDIR/initramfs.cpio.gz (and, in between, OUTDIR/modules).
# Idempotent: a step is skipped when its output exists and is newer than its inputs. See
# deploy/guest/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
out=${1:-$repo/build/guest}
src=$here/guest/guestload.c
self=$here/build-guest.sh

die() { echo "build-guest: $*" >&2; exit 1; }
need() {
    local t
    for t in "$@"; do
        command -v "$t" >/dev/null 2>&1 || die "missing tool '$t' (run deploy/install-deps.sh)"
    done
}
# newer OUT IN... : OUT exists and is newer than every IN
newer() {
    local o=$1 i
    shift
    [ -e "$o" ] || return 1
    for i in "$@"; do [ "$o" -nt "$i" ] || return 1; done
}

need apt-cache apt-get dpkg od dd readelf gcc cpio gzip find sort tr sed
[ -f "$src" ] || die "missing $src"

mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# ---------------------------------------------------------------- kernel
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
    sed -nE 's/^[[:space:]]*Depends:[[:space:]]*(linux-image-[0-9][^[:space:]]*-amd64)[[:space:]]*$/\1/p' | head -n1)
[ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 with apt-cache depends (apt-get update?)"
kver=$(apt-cache show --no-all-versions "$kpkg" 2>/dev/null | sed -n 's/^Version: //p' | head -n1)
kstamp="$kpkg $kver"

le32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
hex_at() { od -An -tx1 -j "$2" -N"$3" "$1" | tr -d ' \n'; }

# extract_vmlinux BZIMAGE OUT: decompress the bzImage payload (offsets from the boot header).
extract_vmlinux() {
    local bz=$1 dst=$2 ss po pl off magic cmd
    [ "$(hex_at "$bz" $((0x202)) 4)" = 48647253 ] || { echo "not a bzImage (no HdrS)" >&2; return 1; }
    ss=$(u8 "$bz" $((0x1f1)))
    [ "$ss" -eq 0 ] && ss=4
    po=$(le32 "$bz" $((0x248)))
    pl=$(le32 "$bz" $((0x24c)))
    off=$(((ss + 1) * 512 + po))
    magic=$(hex_at "$bz" "$off" 6)
    case $magic in
        fd377a585a00) cmd="xz -dc" ;;
        28b52ffd*) cmd="zstd -dcq" ;;
        1f8b*) cmd="gzip -dc" ;;
        425a68*) cmd="bzip2 -dc" ;;
        5d0000*) cmd="xz -dc --format=lzma" ;;
        02214c18*) cmd="lz4 -dc" ;;
        *) echo "unknown payload magic $magic" >&2; return 1 ;;
    esac
    need "${cmd%% *}"
    echo "build-guest: payload at $off, $pl bytes, ${cmd%% *}" >&2
    # The last 4 bytes of the payload are the appended uncompressed size, not compressed data.
    dd if="$bz" bs=1M iflag=skip_bytes,count_bytes skip="$off" count=$((pl - 4)) status=none | $cmd >"$dst" || { echo "$cmd failed" >&2; return 1; }
    [ "$(hex_at "$dst" 0 4)" = 7f454c46 ] || { echo "decompressed payload is not ELF" >&2; return 1; }
}

# Modules that give the guest /dev/vda (virtio-blk-pci) in Debian's kernel, where they are
# modules (=m); their dependencies are found from each module's own "depends=".
guest_modules="virtio_pci virtio_blk"

# collect_modules ROOT DST: copy guest_modules and their dependencies from the unpacked package
# ROOT into DST as plain .ko (busybox insmod can't read compressed ones; a compressed module is
# signed before compression, so the plain one keeps its signature) and list them in load order,
# dependencies first, in DST/load. A module built into the kernel is left out.
collect_modules() {
    local root=$1 dst=$2 mdir m
    local -A seen=()
    mdir=$(find "$root/lib/modules" "$root/usr/lib/modules" -mindepth 1 -maxdepth 1 -type d \
        2>/dev/null | head -n1)
    [ -n "$mdir" ] || { echo "no lib/modules/<version> in the package" >&2; return 1; }
    mkdir -p "$dst"
    : >"$dst/load"
    add_module() {
        local m=$1 f d
        [ -z "${seen[$m]+x}" ] || return 0
        seen[$m]=1
        f=$(find "$mdir" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) | head -n1)
        if [ -z "$f" ]; then
            grep -Eq "/(${m}|${m//_/-})\.ko\$" "$mdir/modules.builtin" 2>/dev/null && return 0
            echo "module $m: neither a .ko nor built in" >&2
            return 1
        fi
        case $f in
            *.ko) cp "$f" "$dst/$m.ko" ;;
            *.ko.xz) xz -dc "$f" >"$dst/$m.ko" ;;
            *.ko.zst) zstd -dcq "$f" >"$dst/$m.ko" ;;
            *.ko.gz) gzip -dc "$f" >"$dst/$m.ko" ;;
            *) echo "module $m: unknown compression ($f)" >&2; return 1 ;;
        esac || { echo "module $m: cannot decompress $f" >&2; return 1; }
        for d in $(tr '\0' '\n' <"$dst/$m.ko" | sed -n 's/^depends=//p' | head -n1 | tr , ' '); do
            add_module "$d" || return 1
        done
        echo "$m" >>"$dst/load"
    }
    for m in $guest_modules; do add_module "$m" || return 1; done
}

if newer "$out/vmlinux" "$self" && newer "$out/modules/load" "$self" &&
    [ "$(cat "$out/vmlinux.pkg" 2>/dev/null)" = "$kstamp" ]; then
    echo "build-guest: vmlinux up to date ($kstamp)"
else
    echo "build-guest: fetching $kstamp"
    mkdir -p "$tmp/deb"
    chmod 711 "$tmp"
    # Let apt's unprivileged download user write here (avoids the sandbox warning as root).
    [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1 && chown _apt "$tmp/deb"
    (cd "$tmp/deb" && apt-get download -q "$kpkg") || die "apt-get download $kpkg failed"
    deb=$(echo "$tmp"/deb/*.deb)
    [ -f "$deb" ] || die "apt-get download produced no .deb"
    dpkg -x "$deb" "$tmp/root"
    bz=$(echo "$tmp"/root/boot/vmlinuz-*)
    [ -f "$bz" ] || die "no /boot/vmlinuz-* in $kpkg"
    if extract_vmlinux "$bz" "$tmp/vmlinux" &&
        readelf -n "$tmp/vmlinux" 2>/dev/null | grep -Eq 'Xen.*\(0x00000012\)'; then
        mv "$tmp/vmlinux" "$out/vmlinux"   # has XEN_ELFNOTE_PHYS32_ENTRY: PVH bootable
    else
        echo "build-guest: WARNING: no PVH-bootable ELF from $kpkg; installing the bzImage as" \
            "vmlinux (boots with -kernel, but slower)" >&2
        cp "$bz" "$out/vmlinux"
    fi
    cp "$tmp"/root/boot/config-* "$out/kernel.config" 2>/dev/null || true
    collect_modules "$tmp/root" "$tmp/modules" || die "cannot collect the guest's modules from $kpkg"
    rm -rf "$out/modules"
    mv "$tmp/modules" "$out/modules"
    echo "build-guest: modules: $(tr '\n' ' ' <"$out/modules/load")"
    echo "$kstamp" >"$out/vmlinux.pkg"
fi

# ---------------------------------------------------------------- guestload
if newer "$out/guestload" "$src" "$self"; then
    echo "build-guest: guestload up to date"
else
    gcc -O2 -static -Wall -o "$tmp/guestload" "$src" ||
        die "gcc -static failed (static libc comes from libc6-dev)"
    mv "$tmp/guestload" "$out/guestload"
fi

# ---------------------------------------------------------------- initramfs
bb=$(command -v busybox || true)
[ -n "$bb" ] || die "missing tool 'busybox' (package busybox-static)"
bb=$(readlink -f "$bb")
readelf -l "$bb" 2>/dev/null | grep -q INTERP && die "$bb is dynamically linked; install busybox-static"

initrd=$out/initramfs.cpio.gz
if newer "$initrd" "$out/guestload" "$self" "$bb" "$out/modules/load"; then
    echo "build-guest: initramfs up to date"
else
    r=$tmp/initramfs
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,lib/modules}
    cp "$bb" "$r/bin/busybox"
    cp "$out/modules/load" "$r/lib/modules/load"
    while read -r m; do cp "$out/modules/$m.ko" "$r/lib/modules/$m.ko"; done <"$out/modules/load"
    cp "$out/guestload" "$r/bin/guestload"
    "$bb" --list-full | while read -r a; do
        [ "$a" = bin/busybox ] || [ -e "$r/$a" ] || ln -s /bin/busybox "$r/$a"
    done
    # The kernel opens /dev/console for init before anything is mounted; needs root to create.
    # Without it /init still reopens the console from devtmpfs.
    [ "$(id -u)" = 0 ] && mknod -m 600 "$r/dev/console" c 5 1
    cat >"$r/init" <<'EOF'
#!/bin/sh
# replicator test guest: knobs come from the kernel command line (fill=<%> dirty=<MiB/s>;
# guestload reads the others from /proc/cmdline).
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# virtio-blk, for /dev/vda (listed dependencies first by build-guest.sh; a built-in one is not
# listed). Loaded in the background: it takes ~0.2-0.3 s under TCG, and only guestload's disk
# process needs it, which waits for /run/modules.done (the probe is synchronous, so a disk is
# there by then).
(
    for m in $(cat /lib/modules/load 2>/dev/null); do
        [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko"
    done
    : >/run/modules.done
) &
fill=0
dirty=0
for arg in $(cat /proc/cmdline); do
    case $arg in
        fill=*) fill=${arg#fill=} ;;
        dirty=*) dirty=${arg#dirty=} ;;
    esac
done
exec /bin/guestload "$fill" "$dirty"
EOF
    chmod 755 "$r/init"
    (cd "$r" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0) | gzip -9 -n >"$tmp/initramfs.cpio.gz"
    mv "$tmp/initramfs.cpio.gz" "$initrd"
fi

kind=$(readelf -h "$out/vmlinux" >/dev/null 2>&1 && echo "ELF/PVH" || echo "bzImage")
echo "build-guest: OK $out: vmlinux ($kind, $kpkg $kver, $(($(stat -c %s "$out/vmlinux") >> 20)) MiB)," \
    "initramfs.cpio.gz ($(($(stat -c %s "$initrd") >> 10)) KiB)"
