package hostmods

import (
	"bytes"
	"compress/gzip"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/u-root/u-root/pkg/cpio"

	"github.com/liveupdate/liveupdate/pkg/kmod"
)

// fakeHost builds a sysfs and procfs tree of a real host's shape: the root
// on NVMe, /boot/efi on a SATA disk behind AHCI, PMEM of the e820 kind, a
// built-in virtio disk, an Intel NIC under a bond and a VLAN, a bridge, a
// tap and loopback, and KVM loaded.
func fakeHost(t *testing.T, mounts, modules string) Host {
	t.Helper()
	root := t.TempDir()
	sys, proc := filepath.Join(root, "sys"), filepath.Join(root, "proc")
	mkdir := func(p string) {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, name string) {
		mkdir(filepath.Dir(name))
		if err := os.Symlink(target, name); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p, s string) {
		mkdir(filepath.Dir(p))
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// driver binds the device directory dev to a driver, a module's when
	// module is not "".
	driver := func(dev, bus, drv, module string) {
		d := filepath.Join(sys, "bus", bus, "drivers", drv)
		mkdir(d)
		if module != "" {
			mkdir(filepath.Join(sys, "module", module))
			if _, err := os.Lstat(filepath.Join(d, "module")); err != nil {
				link(filepath.Join(sys, "module", module), filepath.Join(d, "module"))
			}
		}
		link(d, filepath.Join(dev, "driver"))
	}
	block := func(dir, name, majMin string) {
		write(filepath.Join(dir, "dev"), majMin+"\n")
		link(dir, filepath.Join(sys, "class", "block", name))
		link(dir, filepath.Join(sys, "dev", "block", majMin))
	}
	pci := filepath.Join(sys, "devices", "pci0000:00")

	nvme := filepath.Join(pci, "0000:00:1d.0")
	driver(nvme, "pci", "nvme", "nvme")
	block(filepath.Join(nvme, "nvme", "nvme0", "nvme0n1", "nvme0n1p2"), "nvme0n1p2", "259:2")

	ahci := filepath.Join(pci, "0000:00:17.0")
	driver(ahci, "pci", "ahci", "ahci")
	sdev := filepath.Join(ahci, "ata1", "host0", "target0:0:0", "0:0:0:0")
	driver(sdev, "scsi", "sd", "sd_mod")
	block(filepath.Join(sdev, "block", "sda", "sda1"), "sda1", "8:1")

	e820 := filepath.Join(sys, "devices", "platform", "e820_pmem")
	driver(e820, "platform", "e820_pmem", "nd_e820")
	region := filepath.Join(e820, "ndbus0", "region0")
	driver(region, "nd", "nd_region", "libnvdimm")
	ns := filepath.Join(region, "namespace0.0")
	driver(ns, "nd", "nd_pmem", "nd_pmem")
	block(filepath.Join(ns, "block", "pmem0"), "pmem0", "259:0")

	vd := filepath.Join(pci, "0000:00:02.0")
	driver(vd, "pci", "virtio-pci", "") // built in
	driver(filepath.Join(vd, "virtio1"), "virtio", "virtio_blk", "")
	block(filepath.Join(vd, "virtio1", "block", "vdb"), "vdb", "254:16")

	// ens2 and ens3 share a driver: ens2 is on no bridge, ens3 is br1's
	// port, so the driver is an uplink's, said of ens3.
	for _, n := range []struct{ pci, drv, name string }{{"0000:00:1f.6", "e1000e", "eno1"}, {"0000:03:00.0", "igb", "enp3s0"},
		{"0000:00:04.0", "virtio_net", "ens2"}, {"0000:00:05.0", "virtio_net", "ens3"}} {
		nic := filepath.Join(pci, n.pci)
		driver(nic, "pci", n.drv, n.drv)
		eth := filepath.Join(nic, "net", n.name)
		link(nic, filepath.Join(eth, "device"))
		write(filepath.Join(eth, "uevent"), "INTERFACE="+n.name+"\n")
		link(eth, filepath.Join(sys, "class", "net", n.name))
	}
	// eno1 under bond0, a VLAN on it, the VLAN a port of br0 (enp3s0 is
	// on no bridge); as sysfs links them: lower_* down, upper_* up.
	virt := filepath.Join(sys, "devices", "virtual", "net")
	for _, v := range []struct{ name, devtype, lower string }{
		{"bond0", "bond", "eno1"}, {"bond0.100", "vlan", "bond0"}, {"br0", "bridge", "bond0.100"}, {"br1", "bridge", "ens3"},
		{"tap0", "", ""}, {"lo", "", ""}} {
		d := filepath.Join(virt, v.name)
		ue := "INTERFACE=" + v.name + "\n"
		if v.devtype != "" {
			ue = "DEVTYPE=" + v.devtype + "\n" + ue
		}
		write(filepath.Join(d, "uevent"), ue)
		link(d, filepath.Join(sys, "class", "net", v.name))
		if v.lower != "" {
			link(filepath.Join(sys, "class", "net", v.lower), filepath.Join(d, "lower_"+v.lower))
			link(d, filepath.Join(sys, "class", "net", v.lower, "upper_"+v.name))
		}
	}

	write(filepath.Join(proc, "self", "mounts"), mounts)
	if modules != "" {
		write(filepath.Join(proc, "modules"), modules)
	}
	return Host{Sys: sys, Proc: proc}
}

const realMounts = `/dev/nvme0n1p2 / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
tmpfs /run tmpfs rw 0 0
/dev/sda1 /boot/efi vfat rw,codepage=437,iocharset=ascii 0 0
/dev/pmem0 /mnt/pmem ext4 rw,dax=always 0 0
/dev/nvme0n1p2 /var/lib/docker ext4 rw 0 0
/dev/vdb /srv/images\040a ext4 rw 0 0
/dev/loop0 /snap/core squashfs ro 0 0
`

const realModules = `kvm_intel 409600 0 - Live 0x0
kvm 1396736 1 kvm_intel, Live 0x0
ext4 1064960 3 - Live 0x0
vfat 20480 1 - Live 0x0
nls_cp437 16384 1 - Live 0x0
nls_ascii 16384 1 - Live 0x0
nvme 61440 3 - Live 0x0
`

func TestRead(t *testing.T) {
	for _, tc := range []struct {
		name         string
		mounts, mods string
		disks, kvm   []string
		nics         []string
		required     []string
		why          map[string]string
	}{
		{
			name: "a real host's shape", mounts: realMounts, mods: realModules,
			disks: []string{"nvme", "ext4", "ahci", "sd_mod", "vfat", "nls_ascii", "nls_cp437", "nd_e820", "libnvdimm", "nd_pmem"},
			kvm:   []string{"kvm", "kvm_intel"}, nics: []string{"e1000e", "bonding", "8021q", "igb", "virtio_net"},
			required: []string{"nvme", "ext4", "ahci", "sd_mod", "vfat", "nls_ascii", "nls_cp437", "nd_e820", "libnvdimm", "nd_pmem",
				"kvm", "kvm_intel", "e1000e", "bonding", "8021q", "virtio_net"},
			why: map[string]string{"nvme": "/ on /dev/nvme0n1p2", "sd_mod": "/boot/efi on /dev/sda1", "nd_pmem": "/mnt/pmem on /dev/pmem0",
				"8021q": "NIC bond0.100, a port of bridge br0", "e1000e": "NIC bond0, a port of bridge br0", "igb": "NIC enp3s0", "kvm_intel": "KVM",
				"virtio_net": "NIC ens3, a port of bridge br1"},
		},
		{
			// A kernel without modules: drivers found, none a module's
			// filesystem; nothing for KVM.
			name: "no /proc/modules", mounts: "/dev/vdb / ext4 rw 0 0\n", mods: "",
			disks: nil, kvm: nil, nics: []string{"e1000e", "bonding", "8021q", "igb", "virtio_net"},
			required: []string{"e1000e", "bonding", "8021q", "virtio_net"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := fakeHost(t, tc.mounts, tc.mods)
			n, err := h.Read()
			if err != nil {
				t.Fatal(err)
			}
			// Load order (outermost driver first), compared as is.
			if !slices.Equal(n.Disks, tc.disks) {
				t.Errorf("disks %v, want %v", n.Disks, tc.disks)
			}
			if !slices.Equal(n.KVM, tc.kvm) {
				t.Errorf("KVM %v, want %v", n.KVM, tc.kvm)
			}
			if !slices.Equal(n.NICs, tc.nics) {
				t.Errorf("NICs %v, want %v", n.NICs, tc.nics)
			}
			if !slices.Equal(n.Required(), tc.required) {
				t.Errorf("required %v, want %v", n.Required(), tc.required)
			}
			for m, w := range tc.why {
				if n.Why[m] != w {
					t.Errorf("why %s: %q, want %q", m, n.Why[m], w)
				}
			}
		})
	}
}

func TestListForm(t *testing.T) {
	n := Needs{Disks: []string{"nvme", "ext4"}, KVM: []string{"kvm_intel"}, NICs: []string{"e1000e"},
		Why: map[string]string{"nvme": "/ on /dev/nvme0n1p2", "ext4": "/ on /dev/nvme0n1p2", "kvm_intel": "KVM", "e1000e": "NIC eno1"}}
	got := n.List()
	// What PID 1's list parser makes of it, as build.sh passes it on.
	groups, err := kmod.ParseList(got)
	if err != nil {
		t.Fatalf("%v in\n%s", err, got)
	}
	want := []kmod.Group{{Names: []string{"nvme", "ext4"}}, {Phase: "restore", Names: []string{"kvm_intel"}}, {Phase: "uplinks", Names: []string{"e1000e"}}}
	if !reflect.DeepEqual(groups, want) {
		t.Fatalf("groups %+v, want %+v, from\n%s", groups, want, got)
	}
	if !strings.Contains(got, "# / on /dev/nvme0n1p2:\nnvme\n") {
		t.Errorf("nvme is not said why:\n%s", got)
	}
	if g, _ := kmod.ParseList((Needs{}).List()); len(g) != 0 {
		t.Errorf("no needs gave groups %+v", g)
	}
}

// TestRunningHost reads this machine's own kernel: whatever it finds must
// be module names (the machine's root is on some disk; its kernel may have
// every driver built in, then nothing is found, which is right too).
func TestRunningHost(t *testing.T) {
	n, err := Host{}.Read()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range slices.Concat(n.Disks, n.KVM, n.NICs) {
		if m == "" || strings.ContainsAny(m, "/ \n") {
			t.Errorf("not a module name: %q", m)
		}
		if _, err := os.Stat(filepath.Join("/sys/module", m)); err != nil {
			t.Errorf("%s (for %s) is not a loaded module: %v", m, n.Why[m], err)
		}
	}
	t.Logf("this machine: disks %v, KVM %v, NICs %v", n.Disks, n.KVM, n.NICs)
}

// writeInitramfs writes archives as initramfs/build.sh does: each a gzip'd
// newc archive of files (name → content), one after the other.
func writeInitramfs(t testing.TB, archives ...map[string]string) string {
	t.Helper()
	var out bytes.Buffer
	for _, files := range archives {
		zw := gzip.NewWriter(&out)
		w := cpio.Newc.Writer(zw)
		for _, name := range slices.Sorted(maps.Keys(files)) {
			if err := w.WriteRecord(cpio.StaticFile(name, files[name], 0o644)); err != nil {
				t.Fatal(err)
			}
		}
		if err := cpio.WriteTrailer(w); err != nil {
			t.Fatal(err)
		}
		zw.Close()
	}
	p := filepath.Join(t.TempDir(), "initramfs.img")
	if err := os.WriteFile(p, out.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestInitramfsModules(t *testing.T) {
	const k = "lib/modules/6.12.118+deb12-amd64/"
	img := writeInitramfs(t,
		map[string]string{"init": "#!/bbin/init", "bin/liveupdate": "x"},
		map[string]string{
			k + "kernel/drivers/nvme/host/nvme.ko":         "\x7fELF",
			k + "kernel/arch/x86/kvm/kvm-intel.ko":         "\x7fELF",
			k + "kernel/fs/ext4/ext4.ko.xz":                "xz",
			k + "modules.builtin":                          "kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/block/virtio_blk.ko\n",
			k + "modules.dep":                              "kernel/fs/ext4/ext4.ko.xz:\n",
			"etc/liveupdate/modules":                       "ext4\n",
			"lib/modules/README.ko.txt":                    "not a module",
			k + "kernel/drivers/net/ethernet/intel/e1000e": "a directory's name, not a module's",
		})
	got, err := InitramfsModules(img)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"ext4", "kvm_intel", "nvme", "virtio_blk", "virtio_pci"}
	if names := slices.Sorted(maps.Keys(got)); !slices.Equal(names, want) {
		t.Errorf("modules %v, want %v", names, want)
	}

	needs := Needs{Disks: []string{"nvme", "ext4", "sd_mod"}, KVM: []string{"kvm", "kvm_intel"}, NICs: []string{"e1000e", "igb"},
		Why:    map[string]string{"nvme": "/ on /dev/nvme0n1p2", "ext4": "/ on /dev/nvme0n1p2", "sd_mod": "/srv on /dev/sdb1", "kvm": "KVM", "kvm_intel": "KVM", "e1000e": "NIC eno1, a port of bridge br0", "igb": "NIC enp3s0"},
		Uplink: map[string]bool{"e1000e": true}}
	wantMissing := []string{"sd_mod (/srv on /dev/sdb1)", "kvm (KVM)", "e1000e (NIC eno1, a port of bridge br0)"}
	if m := needs.Missing(got); !slices.Equal(m, wantMissing) {
		t.Errorf("missing %v, want %v", m, wantMissing)
	}

	for name, data := range map[string][]byte{"empty": nil, "an uncompressed cpio": []byte("070701000000"), "zstd": {0x28, 0xb5, 0x2f, 0xfd}} {
		p := filepath.Join(t.TempDir(), "bad.img")
		os.WriteFile(p, data, 0o644)
		if _, err := InitramfsModules(p); err == nil {
			t.Errorf("%s: read as an initramfs", name)
		}
	}
}

func TestModuleName(t *testing.T) {
	for in, want := range map[string]string{"kvm-intel.ko": "kvm_intel", "ext4.ko.xz": "ext4", "nvme.ko.zst": "nvme", "sd_mod.ko.gz": "sd_mod",
		"modules.dep": "", ".ko": "", "e1000e": "", "x.ko.bz2": ""} {
		got, ok := moduleName(in)
		if got != want || ok != (want != "") {
			t.Errorf("moduleName(%q) = %q, %v; want %q", in, got, ok, want)
		}
	}
}

// FuzzInitramfsModules: an initramfs is outside input; whatever it holds,
// reading it must not panic.
func FuzzInitramfsModules(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3})
	good, _ := os.ReadFile(writeInitramfs(f, map[string]string{"lib/modules/1/kernel/a.ko": "x", "lib/modules/1/modules.builtin": "kernel/b.ko\n"}))
	f.Add(good)
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(dir, "fuzz.img")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		InitramfsModules(p)
	})
}
