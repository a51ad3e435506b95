// Package hostmods reads, from a running host, the kernel modules its new
// kernel's PID 1 needs before the guests can run again — those the
// initramfs' fixed list (initramfs/modules.txt: ext4, the memmap= PMEM
// driver, virtio disks and NIC, taps, bridge, vhost-net) does not know a
// real host has:
//
//   - the drivers under each mounted disk filesystem and PMEM device: the
//     storage controller and disk drivers (nvme; ahci and sd_mod; a RAID
//     HBA), the NVDIMM bus of real persistent memory (nfit), and the
//     filesystem's own module;
//   - the drivers under the host's NICs (the bridges' uplinks, the
//     management interface), and the modules of bonds and VLANs;
//   - KVM's vendor module, without which no guest started with KVM runs.
//
// It follows each device's sysfs path up to the root and keeps every
// driver on the way that is a module (a driver's "module" link), as
// dracut's host-only mode does. Built-in drivers need nothing. The
// initramfs builder adds what it finds to its list (`liveupdate
// host-modules`), and update's plan refuses an initramfs that lacks one.
package hostmods

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/u-root/u-root/pkg/cpio"
	"golang.org/x/sys/unix"
)

// Host is where the host's kernel state is read from: "" means the running
// kernel's /sys and /proc (tests give a tree of their own).
type Host struct {
	Sys  string // sysfs, default /sys
	Proc string // procfs, default /proc
}

func (h Host) sys(p ...string) string {
	return filepath.Join(append([]string{orDefault(h.Sys, "/sys")}, p...)...)
}

func (h Host) proc(p ...string) string {
	return filepath.Join(append([]string{orDefault(h.Proc, "/proc")}, p...)...)
}

func orDefault(s, d string) string {
	if s == "" {
		return d
	}
	return s
}

// Needs is what a host's restore needs, in load order within each part.
type Needs struct {
	// Disks: the modules under the mounted disk filesystems and PMEM, and
	// the filesystems' own; needed before PID 1 looks for a device.
	Disks []string
	// KVM: KVM's modules; needed before the first QEMU starts.
	KVM []string
	// NICs: the modules under the NICs, and of bonds and VLANs; needed to
	// attach the bridges' uplinks, which no QEMU waits for.
	NICs []string
	// Why says, for each module, what needs it ("/ on /dev/nvme0n1p2").
	Why map[string]string
	// Uplink: the modules of NICs that are a bridge's ports (or under
	// one: a bond's), which guests reach the world through.
	Uplink map[string]bool
}

// Required is what an initramfs must hold for the guests to come back as
// they run now: the disks' modules, KVM's, and the bridges' uplink NICs'.
// A NIC no guest's bridge uses can wait for the host's own init.
func (n Needs) Required() []string {
	out := slices.Concat(n.Disks, n.KVM)
	for _, m := range n.NICs {
		if n.Uplink[m] {
			out = append(out, m)
		}
	}
	return out
}

// Read finds every need of the running host (Host's trees): its mounted
// disk filesystems (/proc/self/mounts), its NICs, and KVM.
func (h Host) Read() (Needs, error) {
	n := Needs{Why: map[string]string{}, Uplink: map[string]bool{}}
	add := func(to *[]string, why string, mods ...string) {
		for _, m := range mods {
			if n.Why[m] == "" {
				*to = append(*to, m)
				n.Why[m] = why
			}
		}
	}
	mounts, err := h.blockMounts()
	if err != nil {
		return n, err
	}
	loaded, err := h.loaded()
	if err != nil {
		return n, err
	}
	for _, m := range mounts {
		mods, err := h.BlockDevice(m.majMin)
		if err != nil {
			return n, fmt.Errorf("the drivers under %s (%s): %w", m.dir, m.source, err)
		}
		why := m.dir + " on " + m.source
		add(&n.Disks, why, mods...)
		if loaded[m.fstype] {
			add(&n.Disks, why, m.fstype)
		}
		if m.fstype == "vfat" {
			// Its code page and character set (codepage=, iocharset=).
			for _, mod := range slices.Sorted(maps.Keys(loaded)) {
				if strings.HasPrefix(mod, "nls_") {
					add(&n.Disks, why, mod)
				}
			}
		}
	}
	nics, err := h.NICs()
	if err != nil {
		return n, err
	}
	for _, nic := range nics {
		mods, err := h.NIC(nic)
		if err != nil {
			return n, fmt.Errorf("the drivers under NIC %s: %w", nic, err)
		}
		why := "NIC " + nic
		if br := h.bridgeAbove(nic); br != "" {
			why += ", a port of bridge " + br
			for _, m := range mods {
				if !n.Uplink[m] && strings.HasPrefix(n.Why[m], "NIC ") {
					n.Why[m] = why // said first of a NIC on no bridge
				}
				n.Uplink[m] = true
			}
		}
		add(&n.NICs, why, mods...)
	}
	add(&n.KVM, "KVM", kvmModules(loaded)...)
	return n, nil
}

// BlockDevice is the modules under the block device MAJ:MIN, outermost
// (the bus, the controller) first.
func (h Host) BlockDevice(majMin string) ([]string, error) {
	p, err := filepath.EvalSymlinks(h.sys("dev", "block", majMin))
	if err != nil {
		return nil, err
	}
	return h.driversUp(p), nil
}

// NIC is the modules under the network interface name, outermost first: its
// device's drivers, or, for a bond, a VLAN or a team, the kind's module and
// its lower interfaces' drivers.
func (h Host) NIC(name string) ([]string, error) {
	return h.nic(name, 0)
}

// kindModule is the module of a virtual interface's kind (uevent DEVTYPE).
var kindModule = map[string]string{"bond": "bonding", "vlan": "8021q", "macvlan": "macvlan", "team": "team"}

func (h Host) nic(name string, depth int) ([]string, error) {
	if depth > 8 {
		return nil, fmt.Errorf("%s: lower interfaces nested too deep", name)
	}
	dir := h.sys("class", "net", name)
	p, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, err
	}
	// Its lower interfaces' modules first (a bond's NICs), then its own.
	var mods []string
	lowers, _ := filepath.Glob(filepath.Join(dir, "lower_*"))
	for _, l := range lowers {
		lm, err := h.nic(strings.TrimPrefix(filepath.Base(l), "lower_"), depth+1)
		if err != nil {
			return nil, err
		}
		mods = appendNew(mods, lm...)
	}
	mods = appendNew(mods, h.driversUp(p)...)
	if mod := kindModule[ueventValue(filepath.Join(dir, "uevent"), "DEVTYPE")]; mod != "" {
		mods = appendNew(mods, mod)
	}
	return mods, nil
}

// appendNew appends the names list does not have yet.
func appendNew(list []string, names ...string) []string {
	for _, n := range names {
		if !slices.Contains(list, n) {
			list = append(list, n)
		}
	}
	return list
}

// NICs is the host's network interfaces that are a device's (a NIC, not a
// bridge, tap or loopback), and the bonds, VLANs and teams over them.
func (h Host) NICs() ([]string, error) {
	ents, err := os.ReadDir(h.sys("class", "net"))
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		dir := h.sys("class", "net", e.Name())
		_, devErr := os.Stat(filepath.Join(dir, "device"))
		if devErr == nil || kindModule[ueventValue(filepath.Join(dir, "uevent"), "DEVTYPE")] != "" {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// bridgeAbove is the bridge a NIC is a port of, directly or through the
// bonds and VLANs above it (sysfs' upper_* links) ("" if none).
func (h Host) bridgeAbove(nic string) string {
	seen := map[string]bool{}
	next := []string{nic}
	for len(next) > 0 && len(seen) < 64 {
		name := next[0]
		next = next[1:]
		if seen[name] {
			continue
		}
		seen[name] = true
		dir := h.sys("class", "net", name)
		if name != nic && ueventValue(filepath.Join(dir, "uevent"), "DEVTYPE") == "bridge" {
			return name
		}
		uppers, _ := filepath.Glob(filepath.Join(dir, "upper_*"))
		for _, u := range uppers {
			next = append(next, strings.TrimPrefix(filepath.Base(u), "upper_"))
		}
	}
	return ""
}

// kvmModules is KVM's modules when they are loaded: the vendor module (kvm_intel,
// kvm_amd) with kvm before it. None when KVM is built in or absent.
func kvmModules(loaded map[string]bool) []string {
	var out []string
	for _, m := range []string{"kvm", "kvm_intel", "kvm_amd"} {
		if loaded[m] {
			out = append(out, m)
		}
	}
	return out
}

// driversUp walks from a sysfs device directory up to /sys/devices and
// returns the module of every driver bound on the way, outermost first.
func (h Host) driversUp(p string) []string {
	top := h.sys("devices")
	var mods []string
	for dir := p; strings.HasPrefix(dir, top+"/"); dir = filepath.Dir(dir) {
		mod, err := filepath.EvalSymlinks(filepath.Join(dir, "driver", "module"))
		if err != nil {
			continue // no driver, or a built-in one
		}
		if name := filepath.Base(mod); !slices.Contains(mods, name) {
			mods = append([]string{name}, mods...)
		}
	}
	return mods
}

// ueventValue is one KEY=value of a sysfs uevent file ("" if none).
func ueventValue(path, key string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, key+"="); ok {
			return v
		}
	}
	return ""
}

// loaded is the modules /proc/modules lists (none on a kernel without
// module support).
func (h Host) loaded() (map[string]bool, error) {
	f, err := os.Open(h.proc("modules"))
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]bool{}, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if name, _, ok := strings.Cut(sc.Text(), " "); ok {
			m[name] = true
		}
	}
	return m, sc.Err()
}

type blockMount struct{ source, dir, fstype, majMin string }

// blockMounts is the mounted filesystems on block devices, once per device.
func (h Host) blockMounts() ([]blockMount, error) {
	f, err := os.Open(h.proc("self", "mounts"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []blockMount
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 || !strings.HasPrefix(fields[0], "/dev/") {
			continue
		}
		dir := unescapeMount(fields[1])
		majMin, err := h.majMin(fields[0], dir)
		if err != nil || seen[majMin] {
			continue // not a block device (a FUSE source, a loop file gone)
		}
		seen[majMin] = true
		out = append(out, blockMount{source: fields[0], dir: dir, fstype: fields[2], majMin: majMin})
	}
	return out, sc.Err()
}

// majMin is the MAJ:MIN of a mounted filesystem's block device: of its
// source's node, else (a "/dev/root" with no node) of the mount point's
// device number. Tests (Host.Sys set) read it from sysfs' dev file for
// /dev/NAME.
func (h Host) majMin(source, dir string) (string, error) {
	if h.Sys != "" {
		b, err := os.ReadFile(h.sys("class", "block", filepath.Base(source), "dev"))
		return strings.TrimSpace(string(b)), err
	}
	var st unix.Stat_t
	if err := unix.Stat(source, &st); err == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
		return fmt.Sprintf("%d:%d", unix.Major(st.Rdev), unix.Minor(st.Rdev)), nil
	}
	if err := unix.Stat(dir, &st); err != nil {
		return "", err
	}
	mm := fmt.Sprintf("%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev))
	if _, err := os.Stat(h.sys("dev", "block", mm)); err != nil {
		return "", fmt.Errorf("%s: no block device %s", dir, mm) // btrfs, overlay: an anonymous device
	}
	return mm, nil
}

// unescapeMount undoes /proc/mounts' octal escapes (\040 for a space).
func unescapeMount(s string) string {
	r := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	return r.Replace(s)
}

// List writes the needs in initramfs/modules.txt's form: the disks' group
// (needed first), KVM's tagged @restore and the NICs' tagged @uplinks (the
// PID 1 phases that first need them); each name after what needs it.
func (n Needs) List() string {
	var b strings.Builder
	b.WriteString("# this host's own modules (liveupdate host-modules)\n")
	group := func(tag, what string, mods []string) {
		if len(mods) == 0 {
			return
		}
		b.WriteString("\n")
		if tag != "" {
			b.WriteString(tag + "\n")
		}
		fmt.Fprintf(&b, "# %s\n", what)
		for _, m := range mods {
			fmt.Fprintf(&b, "# %s:\n%s\n", n.Why[m], m)
		}
	}
	group("", "under its disk filesystems and PMEM, and theirs", n.Disks)
	group("@restore", "KVM's, for the guests' QEMUs", n.KVM)
	group("@uplinks", "under its NICs, for the bridges' uplinks", n.NICs)
	return b.String()
}

// InitramfsModules reads an initramfs made of gzip'd newc archives one
// after the other, as initramfs/build.sh makes it, and returns the names of
// the modules it holds for its kernel: each module file's, and those its
// modules.builtin lists (built into that kernel: nothing to load).
func InitramfsModules(file string) (map[string]bool, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	br := bufio.NewReader(f)
	zr, err := gzip.NewReader(br)
	if err != nil {
		return nil, fmt.Errorf("%s: not gzip'd newc archives (initramfs/build.sh's kind): %w", file, err)
	}
	mods := map[string]bool{}
	for {
		zr.Multistream(false)
		b, err := io.ReadAll(zr)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", file, err)
		}
		err = cpio.ForEachRecord(cpio.Newc.Reader(bytes.NewReader(b)), func(r cpio.Record) error {
			if !strings.HasPrefix(r.Name, "lib/modules/") {
				return nil
			}
			if path.Base(r.Name) != "modules.builtin" {
				if m, ok := moduleName(path.Base(r.Name)); ok {
					mods[m] = true
				}
				return nil
			}
			sc := bufio.NewScanner(io.NewSectionReader(r, 0, int64(r.FileSize)))
			for sc.Scan() {
				if m, ok := moduleName(path.Base(strings.TrimSpace(sc.Text()))); ok {
					mods[m] = true
				}
			}
			return sc.Err()
		})
		if err != nil {
			return nil, fmt.Errorf("%s: reading its archive: %w", file, err)
		}
		if err := zr.Reset(br); errors.Is(err, io.EOF) {
			return mods, nil
		} else if err != nil {
			return nil, fmt.Errorf("%s: after an archive: %w", file, err)
		}
	}
}

// moduleName is the module a file name holds ("kvm-intel.ko.xz" →
// kvm_intel), and whether it is a module's at all.
func moduleName(file string) (string, bool) {
	for _, z := range []string{".xz", ".zst", ".gz"} {
		file = strings.TrimSuffix(file, z)
	}
	name, ok := strings.CutSuffix(file, ".ko")
	if !ok || name == "" {
		return "", false
	}
	return strings.ReplaceAll(name, "-", "_"), true
}

// Missing is what of the required modules the initramfs' modules (from
// InitramfsModules) lack, each said with what needs it.
func (n Needs) Missing(have map[string]bool) []string {
	var out []string
	for _, m := range n.Required() {
		if !have[m] {
			out = append(out, fmt.Sprintf("%s (%s)", m, n.Why[m]))
		}
	}
	return out
}
