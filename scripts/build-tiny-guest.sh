#!/usr/bin/env bash
# Builds the tiny real guest of the edge demo and test (issue 11): a Debian kernel and an initramfs of
# busybox-static, the few modules it needs and mosquitto_pub with its libraries, all taken from Debian
# packages (apt-get download + dpkg-deb -x; nothing else is downloaded). Cached under .run/guest/;
# the two files a VM boots from are installed where libvirt's QEMU user can read them:
#   /var/lib/libvirt/images/reconciler-guest/{vmlinux,vmlinuz,initrd.img}   (override: GUEST_DIR=...)
# vmlinux is the same kernel uncompressed, booted through its PVH entry (much faster under TCG).
# A checkout under a 0700 home directory cannot serve them to libvirt-qemu, hence the copy.
#
# The guest's /init: load modules, mount the cidata seed (ISO 9660 CD-ROM), bring up the user-mode NIC
# with udhcpc, run user-data when it starts with "#!", then stay up (a guest declared running must not
# power off). The ACPI power button powers it off, so a graceful shutdown (virsh shutdown) works.
#
# Usage: scripts/build-tiny-guest.sh        prints the kernel (vmlinux) and initrd paths on its last two lines.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=$ROOT/.run/guest
GUEST_DIR=${GUEST_DIR:-/var/lib/libvirt/images/reconciler-guest}
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

# Modules the guest loads, each after what it needs (resolved from modules.dep below): the SATA/IDE
# CD-ROM and its file system, the virtio NIC, and the ACPI power button (graceful shutdown).
WANT_MODULES="ahci ata_piix sr_mod isofs virtio_pci virtio_net button evdev"

mkdir -p "$CACHE/debs"
cd "$CACHE/debs"

# The kernel package behind the linux-image-amd64 metapackage (its storage and NIC drivers are modules;
# linux-image-cloud-amd64 lacks AHCI, so a SATA CD-ROM would be invisible to it).
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$KPKG" ]; then
  $SUDO apt-get update -qq
  KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
KVER=${KPKG#linux-image-}
PKGS="$KPKG busybox-static mosquitto-clients libmosquitto1 libssl3 libc6"

fetch() {  # one package's .deb into the cache, once
  local p=$1
  ls "${p}"_*.deb >/dev/null 2>&1 && return 0
  # apt's sandbox user cannot write into a root-owned cache; the download itself is the same.
  apt-get download "$p" 2>&1 | grep -v "unsandboxed" >&2 || true
  ls "${p}"_*.deb >/dev/null 2>&1 || { echo "build-tiny-guest: apt-get download $p failed" >&2; exit 1; }
}
for p in $PKGS; do fetch "$p"; done

STAMP="$KPKG $(ls -- *.deb | sha256sum | cut -c1-16) v6"
OUT=$CACHE/out
if [ "$(cat "$OUT/stamp" 2>/dev/null)" != "$STAMP" ]; then
  rm -rf "$CACHE/x" "$OUT"
  mkdir -p "$CACHE/x" "$OUT"
  for d in ./*.deb; do dpkg-deb -x "$d" "$CACHE/x"; done
  X=$CACHE/x
  MODDIR=$X/lib/modules/$KVER
  [ -f "$MODDIR/modules.dep" ] || "$X/bin/busybox" depmod -b "$X" "$KVER"

  IR=$CACHE/initramfs
  rm -rf "$IR"
  mkdir -p "$IR"/{bin,sbin,etc,proc,sys,dev,tmp,seed,lib/modules,lib64,usr/bin,usr/share/udhcpc,run}
  cp "$X/bin/busybox" "$IR/bin/busybox"

  # Modules in load order: each one's dependencies first (modules.dep, resolved recursively).
  ORDER=$IR/lib/modules/order
  : >"$ORDER"
  declare -A SEEN=()
  add_module() {
    local rel dep
    rel=$(grep -E "(^|/)$1\.ko:" "$MODDIR/modules.dep" | head -1 | cut -d: -f1)
    [ -n "$rel" ] || { echo "build-tiny-guest: module $1 not in $KPKG" >&2; exit 1; }
    [ -n "${SEEN[$rel]:-}" ] && return 0
    SEEN[$rel]=1
    for dep in $(grep -E "^$rel:" "$MODDIR/modules.dep" | cut -d: -f2); do
      add_module "$(basename "$dep" .ko)"
    done
    cp "$MODDIR/$rel" "$IR/lib/modules/"
    basename "$rel" >>"$ORDER"
  }
  for m in $WANT_MODULES; do add_module "$m"; done

  # mosquitto_pub and the libraries it links, all from the unpacked packages.
  cp "$X/usr/bin/mosquitto_pub" "$IR/usr/bin/"
  for lib in $(LD_LIBRARY_PATH="$X/lib/x86_64-linux-gnu:$X/usr/lib/x86_64-linux-gnu" ldd "$X/usr/bin/mosquitto_pub" \
               | awk '/=>/ {print $1}'); do
    f=""
    for c in "$X/lib/x86_64-linux-gnu/$lib" "$X/usr/lib/x86_64-linux-gnu/$lib"; do [ -e "$c" ] && { f=$c; break; }; done
    [ -n "$f" ] || { echo "build-tiny-guest: $lib not found in the unpacked packages" >&2; exit 1; }
    mkdir -p "$IR/lib/x86_64-linux-gnu"
    cp -L "$f" "$IR/lib/x86_64-linux-gnu/"
  done
  cp -L "$X/lib64/ld-linux-x86-64.so.2" "$IR/lib64/" 2>/dev/null || \
    cp -L "$X/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$IR/lib64/"

  # udhcpc sets nothing without a script: this one sets the address, the route and DNS.
  cat >"$IR/usr/share/udhcpc/default.script" <<'EOF'
#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    ;;
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
esac
exit 0
EOF
  chmod 0755 "$IR/usr/share/udhcpc/default.script"

  # busybox acpid runs /etc/acpi/PWRF/00000080 on the power button: libvirt's graceful shutdown.
  mkdir -p "$IR/etc/acpi/PWRF"
  printf '#!/bin/sh\necho "guest: power button, powering off" >/dev/console\nsync\npoweroff -f\n' \
    >"$IR/etc/acpi/PWRF/00000080"
  chmod 0755 "$IR/etc/acpi/PWRF/00000080"

  cat >"$IR/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "guest: $*" >/dev/console; }
say "booted in $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" 2>/dev/null; done
# The power button: libvirt's graceful shutdown.
acpid -c /etc/acpi -l /tmp/acpid.log -p /tmp/acpid.pid || say "acpid did not start"
# The cidata seed: the CD-ROM labelled cidata (it may take a moment to appear).
seed=""
for _ in $(seq 1 100); do
  for dev in /dev/sr*; do
    [ -b "$dev" ] || continue
    if mount -t iso9660 -o ro "$dev" /seed 2>/dev/null; then
      if [ -f /seed/meta-data ] || [ -f /seed/user-data ]; then seed=$dev; break 2; fi
      umount /seed
    fi
  done
  sleep 0.1
done
[ -n "$seed" ] && say "seed mounted from $seed" || say "no cidata seed found"
ip link set lo up
for ifc in $(ls /sys/class/net); do
  [ "$ifc" = lo ] && continue
  ip link set "$ifc" up
  udhcpc -i "$ifc" -s /usr/share/udhcpc/default.script -q -n -t 20 -T 1 >/dev/null 2>&1 \
    && say "$ifc up: $(ip -4 -o addr show dev "$ifc" | awk '{print $4}')"
done
if [ -f /seed/user-data ] && [ "$(head -c 2 /seed/user-data)" = "#!" ]; then
  cp /seed/user-data /tmp/user-data
  chmod 0700 /tmp/user-data
  say "running user-data"
  /tmp/user-data >/dev/console 2>&1
  say "user-data exited with $? at $(cut -d' ' -f1 /proc/uptime)s"
fi
# A guest declared running stays up after its work.
while :; do sleep 3600; done
EOF
  chmod 0755 "$IR/init"
  (cd "$IR" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9n) >"$OUT/initrd.img"
  cp "$X/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
  # The uncompressed kernel (an ELF with a PVH entry note): QEMU loads it straight into the guest's
  # memory, which saves the xz decompression that takes 15-20 s under TCG on a busy 2-core host.
  off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$OUT/vmlinuz" | head -1 | cut -d: -f1)
  [ -n "$off" ] || { echo "build-tiny-guest: no xz payload in the kernel image" >&2; exit 1; }
  tail -c +$((off + 1)) "$OUT/vmlinuz" >"$CACHE/vmlinux.xz"   # (a pipe would end tail with SIGPIPE)
  xz -dc --single-stream "$CACHE/vmlinux.xz" >"$OUT/vmlinux"
  rm -f "$CACHE/vmlinux.xz"
  [ "$(head -c 4 "$OUT/vmlinux" | od -An -c | tr -d ' ')" = "177ELF" ] || \
    { echo "build-tiny-guest: the unpacked kernel is not an ELF file" >&2; exit 1; }
  echo "$STAMP" >"$OUT/stamp"
  rm -rf "$CACHE/x"
fi

# Install where libvirt-qemu can read them (only when the content differs).
$SUDO mkdir -p "$GUEST_DIR"
$SUDO chmod 0755 "$GUEST_DIR"
for f in vmlinuz vmlinux initrd.img; do
  cmp -s "$OUT/$f" "$GUEST_DIR/$f" || $SUDO install -m 0644 "$OUT/$f" "$GUEST_DIR/$f"
done
echo "$GUEST_DIR/vmlinux"
echo "$GUEST_DIR/initrd.img"
