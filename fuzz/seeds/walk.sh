#!/usr/bin/env bash
# Seeds of the `walk` target (a guest disk image through `items::fuzz_walk`: volumes, swap scan,
# listing, reading every file): small real disk images, made here rather than committed (run.sh
# runs it on the target's first run, into fuzz/target/seeds/walk). `fuzz/seeds/walk.sh OUTDIR`
# writes
#   ext4      a bare ext4 (mke2fs -d: directories, files, a symlink), 64 KiB
#   fat       a bare FAT12 (mkfs.vfat + mtools: nested directories, a long name), 64 KiB
#   gpt       a GPT disk: the ext4, the FAT and a swap partition, 170 KiB
#   mbr       an MBR disk: the FAT as a primary partition and an extended partition holding the
#             ext4 and a swap as logical partitions (a chain of two EBRs), 138 KiB
# Needs mke2fs and debugfs (e2fsprogs), mkfs.vfat (dosfstools), mmd/mcopy (mtools) and python3.
# The images are the same on every run (fixed UUIDs, serials and times) where the tools allow it.
set -euo pipefail
out=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

tree=$work/tree
mkdir -p "$tree/etc" "$tree/home/user/docs" "$tree/var/empty"
echo "127.0.0.1 localhost" >"$tree/etc/hosts"
printf 'hello\n' >"$tree/home/user/notes.txt"
head -c 3000 /dev/zero | tr '\0' 'x' >"$tree/home/user/docs/three-kib"
ln -s ../../etc/hosts "$tree/home/user/hosts-link"
find "$tree" -exec touch -h -d @1700000000 {} +

export E2FSPROGS_FAKE_TIME=1700000000 SOURCE_DATE_EPOCH=1700000000
# The image file is sized first: mke2fs itself writes only up to its last used block.
truncate -s 64K "$work/ext4"
mke2fs -q -F -t ext4 -O ^has_journal,^resize_inode -b 1024 -N 32 -m 0 \
    -U 6b1f2a9e-1d2c-4f7a-9a51-0c3e1d2b4a10 -E hash_seed=0b7e3c1a-2f4d-4e5a-8b6c-7d8e9f0a1b2c \
    -d "$tree" "$work/ext4" >/dev/null
# mke2fs -d copies each file's ctime, which touch cannot set: debugfs fixes them.
(cd "$tree" && find . -mindepth 1 | sed 's|^\.||; s|.*|sif & ctime @1700000000|') >"$work/ctimes"
debugfs -w -f "$work/ctimes" "$work/ext4" >/dev/null 2>&1
cp "$work/ext4" "$out/ext4"

export MTOOLS_SKIP_CHECK=1
mkfs.vfat -C --invariant -i 12345678 -n BULWARK "$work/fat" 64 >/dev/null
mmd -i "$work/fat" ::/EFI ::/EFI/boot
mcopy -i "$work/fat" -m "$tree/etc/hosts" "::/A long file name.txt"
mcopy -i "$work/fat" -m "$tree/home/user/docs/three-kib" ::/EFI/boot/grub.cfg
cp "$work/fat" "$out/fat"

python3 - "$work" "$out" <<'PY'
import struct, sys, uuid, zlib
work, out = sys.argv[1], sys.argv[2]
ext4 = open(f"{work}/ext4", "rb").read()
fat = open(f"{work}/fat", "rb").read()
S = 512
# A swap partition: "SWAPSPACE2" at the end of its first 4 KiB page, then one more page.
swap = bytearray(8192)
swap[4086:4096] = b"SWAPSPACE2"
swap = bytes(swap)

def sectors(b):
    return len(b) // S

def mbr_entry(boot, kind, start, count):
    return struct.pack("<B3sB3sII", boot, b"\xfe\xff\xff", kind, b"\xfe\xff\xff", start, count)

def mbr(entries, disk_id=0x4255574B):
    b = bytearray(S)
    struct.pack_into("<I", b, 440, disk_id)
    for i, e in enumerate(entries):
        b[446 + 16 * i:462 + 16 * i] = e
    b[510:512] = b"\x55\xaa"
    return bytes(b)

# GPT: protective MBR, header, 128 entries, the partitions, backup entries and header.
parts = [
    (uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4"), "root", ext4),
    (uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"), "efi", fat),
    (uuid.UUID("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"), "swap", swap),
]
first_usable = 34
lba = first_usable
entries = bytearray(128 * 128)
body = b""
for i, (kind, name, data) in enumerate(parts):
    last = lba + sectors(data) - 1
    unique = uuid.UUID(int=0x1000 + i)
    entries[128 * i:128 * (i + 1)] = (kind.bytes_le + unique.bytes_le + struct.pack("<QQQ", lba, last, 0)
                                     + name.encode("utf-16-le").ljust(72, b"\0"))
    body += data
    lba = last + 1
last_usable = lba - 1
backup_entries = lba
backup_header = backup_entries + 32
total = backup_header + 1
entries = bytes(entries)

def gpt_header(current, backup, entries_at):
    h = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x00010000, 92, 0, 0, current, backup,
                              first_usable, last_usable, uuid.UUID(int=0xB0B).bytes_le, entries_at, 128, 128,
                              zlib.crc32(entries)))
    struct.pack_into("<I", h, 16, zlib.crc32(bytes(h)))
    return bytes(h).ljust(S, b"\0")

gpt = (mbr([mbr_entry(0, 0xEE, 1, total - 1)]) + gpt_header(1, backup_header, 2) + entries + body
       + entries + gpt_header(backup_header, 1, backup_entries))
assert len(gpt) == total * S
open(f"{out}/gpt", "wb").write(gpt)

# MBR: the FAT as partition 1, then an extended partition (0x05) whose first EBR describes the
# ext4 and links to a second EBR describing the swap. EBR starts are relative to the extended
# partition; a logical partition's start is relative to its own EBR.
fat_at = 1
ext_at = fat_at + sectors(fat)
ebr2_rel = 1 + sectors(ext4)
ext_len = ebr2_rel + 1 + sectors(swap)
ebr1 = mbr([mbr_entry(0, 0x83, 1, sectors(ext4)), mbr_entry(0, 0x05, ebr2_rel, 1 + sectors(swap))], 0)
ebr2 = mbr([mbr_entry(0, 0x82, 1, sectors(swap))], 0)
disk = (mbr([mbr_entry(0x80, 0x0C, fat_at, sectors(fat)), mbr_entry(0, 0x05, ext_at, ext_len)]) + fat
        + ebr1 + ext4 + ebr2 + swap)
open(f"{out}/mbr", "wb").write(disk)
PY
ls -l "$out"
