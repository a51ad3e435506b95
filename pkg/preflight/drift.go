package preflight

import (
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// Runtime is what QEMU reports of its devices and block graph, to compare
// with its command line: a restart runs that command line, so whatever was
// changed at run time (hot-plug, external snapshots, block jobs) would be
// lost, or worse, the base image opened under a guest that wrote to its
// overlay.
type Runtime struct {
	Block          []BlockInfo    // query-block
	BlockNodes     []BlockNode    // query-named-block-nodes flat=true
	Peripheral     []QOMChild     // qom-list /machine/peripheral
	PeripheralAnon []QOMChild     // qom-list /machine/peripheral-anon
	BlockJobs      []BlockJob     // query-block-jobs
	MemoryDevices  []MemoryDevice // query-memory-devices
}

// BlockInfo is one entry of query-block: a block backend.
type BlockInfo struct {
	Device    string         `json:"device"` // a -drive id ("" for -blockdev backends)
	QDev      string         `json:"qdev"`   // the device's id or QOM path
	Removable bool           `json:"removable"`
	Inserted  *BlockInserted `json:"inserted"`
}

// BlockInserted is a backend's medium.
type BlockInserted struct {
	NodeName string     `json:"node-name"`
	File     string     `json:"file"`
	Drv      string     `json:"drv"`
	RO       bool       `json:"ro"`
	Image    *ImageInfo `json:"image"`
}

// ImageInfo is an image and its backing chain.
type ImageInfo struct {
	Filename string     `json:"filename"`
	Format   string     `json:"format"`
	Backing  *ImageInfo `json:"backing-image"`
}

// BlockNode is one entry of query-named-block-nodes.
type BlockNode struct {
	NodeName string `json:"node-name"`
	Drv      string `json:"drv"`
	File     string `json:"file"`
	RO       bool   `json:"ro"`
}

// QOMChild is one entry of qom-list.
type QOMChild struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

// BlockJob is one entry of query-block-jobs.
type BlockJob struct {
	Type   string `json:"type"`
	Device string `json:"device"`
	Status string `json:"status"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
}

// MemoryDevice is one entry of query-memory-devices.
type MemoryDevice struct {
	Type string `json:"type"`
	Data struct {
		ID     string `json:"id"`
		Memdev string `json:"memdev"`
		Size   uint64 `json:"size"`
	} `json:"data"`
}

// child is the device type of a qom-list child<…> entry, "" for others.
func (c QOMChild) child() string {
	t, ok := strings.CutPrefix(c.Type, "child<")
	if !ok {
		return ""
	}
	return strings.TrimSuffix(t, ">")
}

// qdevID is the id of a backend's device: query-block gives the id itself,
// or the QOM path under /machine/peripheral for virtio devices; "" for a
// device without id.
func qdevID(qdev string) string {
	if rest, ok := strings.CutPrefix(qdev, "/machine/peripheral/"); ok {
		id, _, _ := strings.Cut(rest, "/")
		return id
	}
	if strings.Contains(qdev, "/") {
		return ""
	}
	return qdev
}

// imageFile turns a reported filename into a path: "json:{…}" (a filter
// node, a throttle group over the format node) is followed down to the
// file it ends in.
func imageFile(name string) string {
	if js, ok := strings.CutPrefix(name, "json:"); ok {
		return qemuargv.NestedFilename(js)
	}
	return name
}

// chain is a backend's image chain, active image first, each file once.
func (b BlockInfo) chain() []string {
	var out []string
	add := func(f string) {
		if f = imageFile(f); f != "" && !slices.Contains(out, f) {
			out = append(out, f)
		}
	}
	if b.Inserted == nil {
		return nil
	}
	add(b.Inserted.File)
	for im := b.Inserted.Image; im != nil; im = im.Backing {
		add(im.Filename)
	}
	return out
}

// disk names a backend for an operator.
func (b BlockInfo) disk() string {
	switch {
	case qdevID(b.QDev) != "":
		return "disk " + qdevID(b.QDev)
	case b.Device != "":
		return "drive " + b.Device
	case b.Inserted != nil:
		return "block node " + b.Inserted.NodeName
	}
	return "a disk"
}

// autoDriveID tells whether name is one QEMU gives a -drive without id=
// ("ide0-hd0", "virtio0", "floppy0", "scsi0-hd0", "pflash0", "sd0").
func autoDriveID(name string) bool {
	for _, p := range []string{"ide", "scsi", "virtio", "floppy", "pflash", "sd", "mtd", "xen"} {
		if rest, ok := strings.CutPrefix(name, p); ok && rest != "" && rest[0] >= '0' && rest[0] <= '9' {
			return true
		}
	}
	return false
}

// drift compares what QEMU reports with its command line. It refuses what
// a restart from the command line would get wrong, and notes what it
// cannot tell.
func drift(c *qemuargv.Cmdline, cwd string, rt *Runtime, bad, note func(string, ...any)) {
	abs := func(p string) string {
		if p == "" || strings.Contains(p, ":") && !strings.HasPrefix(p, "/") {
			return p // a protocol (nbd:…, json:…): compared as written
		}
		if !filepath.IsAbs(p) {
			p = filepath.Join(cwd, p)
		}
		return filepath.Clean(p)
	}

	// The command line's block options: -drive by id, -blockdev by
	// node-name, and the images of drives without id.
	args := c.BlockArgs()
	drives, nodes := map[string]qemuargv.BlockArg{}, map[string]qemuargv.BlockArg{}
	var anonDrives []qemuargv.BlockArg
	for _, a := range args {
		switch {
		case a.Option == "blockdev":
			nodes[a.ID] = a
		case a.ID != "":
			drives[a.ID] = a
		default:
			anonDrives = append(anonDrives, a)
		}
	}
	// nodeFile follows a -blockdev node down its file children.
	nodeFile := func(name string) string {
		for range 16 {
			n, ok := nodes[name]
			if !ok {
				return ""
			}
			if n.File != "" || n.Child == "" {
				return n.File
			}
			name = n.Child
		}
		return ""
	}
	devs := c.DeviceArgs()
	devByID := map[string]qemuargv.DeviceArg{}
	var anonDevs []string
	for _, d := range devs {
		if d.ID != "" {
			devByID[d.ID] = d
		} else {
			anonDevs = append(anonDevs, qomType(d.Driver))
		}
	}

	// Each block backend's active image must be the one the command line
	// opens for it.
	disksSeen := map[string]bool{} // device ids reported as hot-plugged disks
	usedAnon := map[int]bool{}
	chainFiles := map[string]bool{}
	for _, b := range rt.Block {
		ch := b.chain()
		for _, f := range ch {
			chainFiles[abs(f)] = true
		}
		if b.Inserted == nil {
			// No medium (an empty CD-ROM, a floppy drive of a pc
			// machine): nothing is written, nothing to open again.
			if a, ok := drives[b.Device]; ok && a.File != "" && b.Removable {
				note("%s's medium %s was ejected at run time: a restarted QEMU would insert it again", b.disk(), a.File)
			}
			continue
		}
		// What the command line opens for this backend.
		want, known := "", false
		id := qdevID(b.QDev)
		if a, ok := drives[b.Device]; ok && b.Device != "" {
			want, known = a.File, true
			if a.Snapshot {
				bad("%s has snapshot=on: the guest's writes live in a temporary overlay that quitting QEMU discards; start it without snapshot=on", b.disk())
				continue
			}
		} else if d, ok := devByID[id]; ok && id != "" {
			if a, ok := drives[d.Drive]; ok {
				want, known = a.File, true
			} else if _, ok := nodes[d.Drive]; ok {
				want, known = nodeFile(d.Drive), true
			}
		}
		if !known && autoDriveID(b.Device) {
			// A -drive without id (-hda, if=virtio): match it by image.
			for i, a := range anonDrives {
				if !usedAnon[i] && a.File != "" && slices.ContainsFunc(ch, func(f string) bool { return abs(f) == abs(a.File) }) {
					usedAnon[i] = true
					want, known = a.File, true
					if a.Snapshot {
						bad("%s (-%s %s) has snapshot=on: the guest's writes live in a temporary overlay that quitting QEMU discards; start it without snapshot=on", b.disk(), a.Option, a.File)
						want = ""
					}
					break
				}
			}
			if !known {
				note("%s (image %s) is not matched to a -drive of the command line (it has no id=): cannot tell whether it changed at run time; give the drive an id=", b.disk(), strings.Join(ch, " over "))
				continue
			}
			if want == "" {
				continue
			}
		}
		if !known {
			node := b.Inserted.NodeName
			if id != "" {
				disksSeen[id] = true
			}
			bad("%s (node %s, %s) was hot-plugged at run time and is not on the command line: a restarted QEMU would not have it; add it to the command line (libvirt: it is in the live XML) or unplug it (device_del, blockdev-del)",
				b.disk(), node, strings.Join(ch, " over "))
			continue
		}
		if want == "" || len(ch) == 0 || abs(ch[0]) == abs(want) {
			continue
		}
		i := slices.IndexFunc(ch, func(f string) bool { return abs(f) == abs(want) })
		switch {
		case i > 0:
			over := "an external snapshot"
			if i > 1 {
				over = fmt.Sprintf("%d external snapshots", i)
			}
			bad("%s's active image is now %s (%s over %s), but the command line opens %s: a restarted QEMU would open %s under a guest that has written to %s; put the overlay on the command line (libvirt: it is in the live XML) or merge it back (block-commit, then block-job-complete)",
				b.disk(), ch[0], over, strings.Join(ch[1:i+1], " over "), want, want, strings.Join(ch[:i], " and "))
		case b.Inserted.RO:
			note("%s's medium is now %s, but the command line opens %s: a restarted QEMU would give the guest the command line's", b.disk(), ch[0], want)
		default:
			bad("%s's image is now %s, but the command line opens %s (changed at run time: a mirror's pivot, or a new medium): a restarted QEMU would open the wrong image; put %s on the command line",
				b.disk(), ch[0], want, ch[0])
		}
	}

	// Block jobs: their targets are nowhere on the command line.
	for _, j := range rt.BlockJobs {
		bad("a %s block job on %s is %s (%d of %d bytes): a restart would drop it and its target is not on the command line; let it finish, or complete or cancel it (block-job-complete, block-job-cancel), then plan again",
			j.Type, j.Device, j.Status, j.Offset, j.Len)
	}

	// Nodes added with blockdev-add that no disk uses: harmless to the
	// guest, but a restarted QEMU would not have them.
	for _, n := range rt.BlockNodes {
		if strings.HasPrefix(n.NodeName, "#") || n.NodeName == "" {
			continue // QEMU's own (implicit protocol nodes, filters, job nodes)
		}
		if _, ok := nodes[n.NodeName]; ok || chainFiles[abs(imageFile(n.File))] {
			continue
		}
		if _, ok := drives[n.NodeName]; ok {
			continue
		}
		note("block node %s (%s) was added at run time (blockdev-add) and no disk uses it: a restarted QEMU would not have it", n.NodeName, imageFile(n.File))
	}

	// Devices with an id: the same on both sides.
	mem := map[string]MemoryDevice{}
	for _, m := range rt.MemoryDevices {
		mem[m.Data.ID] = m
	}
	live := map[string]bool{}
	for _, ch := range rt.Peripheral {
		typ := ch.child()
		if typ == "" {
			continue
		}
		live[ch.Name] = true
		if _, ok := devByID[ch.Name]; ok || disksSeen[ch.Name] {
			continue
		}
		if m, ok := mem[ch.Name]; ok {
			bad("memory device %s (%s, %d MiB, backend %s) was hot-plugged at run time and is not on the command line: a restarted QEMU would not have the guest's memory in it; add it and its backend to the command line (libvirt: they are in the live XML) or unplug it",
				ch.Name, typ, m.Data.Size>>20, strings.TrimPrefix(m.Data.Memdev, "/objects/"))
			continue
		}
		bad("device %s (%s) was hot-plugged at run time and is not on the command line: a restarted QEMU would not have it; add it to the command line (libvirt: it is in the live XML) or unplug it (device_del)", ch.Name, typ)
	}
	for _, d := range devs {
		if d.ID != "" && !live[d.ID] {
			bad("device %s (%s) of the command line was unplugged at run time: a restarted QEMU would plug it back in under the guest; plug it in again (device_add) or take it off the command line", d.ID, d.Driver)
		}
	}

	// Devices without id: counted by type. -drive if=virtio, -nic and
	// the like make some too; a surplus beyond what they can explain is
	// refused, one within it noted only when no option accounts for it.
	want := map[string]int{}
	for _, d := range anonDevs {
		want[d]++
	}
	implicit := len(c.Find("nic", "usbdevice"))
	for _, a := range args {
		if a.Option == "drive" && a.Interface == "virtio" {
			implicit++
		}
	}
	for _, i := range c.Find("net") {
		if strings.HasPrefix(c.Opts[i].Value, "nic") {
			implicit++
		}
	}
	other := false // options that make devices this count does not know
	for _, a := range args {
		other = other || a.Option == "drive" && (a.Interface == "scsi" || a.Interface == "sd" || a.Interface == "pflash" || a.Interface == "mtd")
	}
	got := map[string]int{}
	for _, ch := range rt.PeripheralAnon {
		if t := ch.child(); t != "" {
			got[t]++
		}
	}
	var extra []string
	surplus := 0
	for t, n := range got {
		if n > want[t] {
			extra = append(extra, fmt.Sprintf("%d× %s", n-want[t], t))
			surplus += n - want[t]
		}
	}
	sort.Strings(extra)
	switch {
	case surplus <= implicit:
	case other || len(c.Find("usb")) > 0:
		note("devices without id that no option of the command line accounts for: %s (hot-plugged without id?)", strings.Join(extra, ", "))
	default:
		bad("devices without id were hot-plugged at run time: %s; a restarted QEMU would not have them; unplug them or add them to the command line", strings.Join(extra, ", "))
	}
}

// deviceAliases are -device's short names of PCI devices on x86 (QEMU's
// qdev_alias_table): QOM lists the device under its type.
var deviceAliases = map[string]string{
	"virtio-serial": "virtio-serial-pci", "virtio-net": "virtio-net-pci", "virtio-blk": "virtio-blk-pci",
	"virtio-scsi": "virtio-scsi-pci", "virtio-balloon": "virtio-balloon-pci", "virtio-rng": "virtio-rng-pci",
	"virtio-gpu": "virtio-gpu-pci", "virtio-9p": "virtio-9p-pci", "virtio-input-host": "virtio-input-host-pci",
	"virtio-keyboard": "virtio-keyboard-pci", "virtio-mouse": "virtio-mouse-pci", "virtio-tablet": "virtio-tablet-pci",
	"virtio-crypto": "virtio-crypto-pci", "virtio-iommu": "virtio-iommu-pci", "virtio-mem": "virtio-mem-pci",
	"virtio-pmem": "virtio-pmem-pci", "vhost-vsock": "vhost-vsock-pci", "lsi": "lsi53c895a", "ahci": "ich9-ahci",
}

// qomType is the QOM type a -device driver name makes.
func qomType(driver string) string {
	if t, ok := deviceAliases[driver]; ok {
		return t
	}
	return driver
}

// checkDrift is Check's part for run-time changes.
func checkDrift(in Input, bad, note func(string, ...any)) {
	switch {
	case in.Facts.QMPErr != nil:
	case in.Facts.RuntimeErr != nil:
		bad("cannot compare the devices and disks QEMU has with its command line: %v", in.Facts.RuntimeErr)
	case in.Facts.Runtime != nil:
		drift(in.Proc.Cmdline, in.Proc.Cwd, in.Facts.Runtime, bad, note)
	}
}
