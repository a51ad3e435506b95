package qemutests

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc64"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// diskSpec shapes a test guest's disk: an image in the guest's directory,
// attached as virtio-blk, on which the heartbeat's disk writer (hb.disk=)
// writes numbered records with O_DIRECT and prints "ACK n" once record n
// was fdatasync'd (cmds/heartbeat/disk.go).
type diskSpec struct {
	format string // raw | qcow2
	// frontend: "drive" (-drive if=virtio, the hand-written form),
	// "drive+device" (-drive if=none + -device virtio-blk-pci) or
	// "blockdev" (the JSON -blockdev storage and format nodes + -device
	// that libvirt writes).
	frontend string
	iothread bool   // the device on an iothread (-object iothread)
	cache    string // none | writeback
	aio      string // threads | native | io_uring
	sizeMiB  int    // default 64
	// refusal, if set, is part of the message QEMU is expected to refuse
	// this shape with: the guest's start then skips its test naming the
	// message, instead of failing it.
	refusal string
}

func (d diskSpec) String() string {
	s := fmt.Sprintf("%s/%s/cache=%s/aio=%s", d.format, d.frontend, d.cache, d.aio)
	if d.iothread {
		s += "/iothread"
	}
	return s
}

// args is the command line attaching image in this shape.
func (d diskSpec) args(image string) []string {
	var a []string
	dev := "virtio-blk-pci,drive=drive0,id=virtio-disk0"
	if d.iothread {
		a = append(a, "-object", "iothread,id=iothread1")
		dev += ",iothread=iothread1"
	}
	drive := fmt.Sprintf("file=%s,format=%s,cache=%s,aio=%s", image, d.format, d.cache, d.aio)
	switch d.frontend {
	case "drive":
		if d.iothread {
			panic("-drive if=virtio cannot name an iothread: use drive+device")
		}
		return append(a, "-drive", drive+",if=virtio")
	case "drive+device":
		return append(a, "-drive", drive+",if=none,id=drive0", "-device", dev)
	case "blockdev":
		// As libvirt 10 writes a <disk type='file'> with <driver
		// cache=… io=…>: cache=none is cache.direct on both nodes and the
		// device's write cache on (the guest's flushes reach the image).
		cache := map[string]any{"direct": d.cache == "none", "no-flush": false}
		j := func(v any) string { b, _ := json.Marshal(v); return string(b) }
		a = nil
		if d.iothread {
			a = append(a, "-object", j(map[string]any{"qom-type": "iothread", "id": "iothread1"}))
		}
		device := map[string]any{"driver": "virtio-blk-pci", "drive": "libvirt-1-format", "id": "virtio-disk0", "write-cache": "on"}
		if d.iothread {
			device["iothread"] = "iothread1"
		}
		return append(a,
			"-blockdev", j(map[string]any{"driver": "file", "filename": image, "node-name": "libvirt-1-storage",
				"auto-read-only": true, "discard": "unmap", "aio": d.aio, "cache": cache}),
			"-blockdev", j(map[string]any{"node-name": "libvirt-1-format", "read-only": false, "cache": cache,
				"driver": d.format, "file": "libvirt-1-storage"}),
			"-device", j(device))
	}
	panic("unknown disk frontend " + d.frontend)
}

// createImage makes the guest's image with qemu-img.
func (d diskSpec) createImage(dir string) (string, error) {
	size := d.sizeMiB
	if size == 0 {
		size = 64
	}
	p := filepath.Join(dir, "disk."+d.format)
	out, err := exec.Command("qemu-img", "create", "-q", "-f", d.format, p, fmt.Sprintf("%dM", size)).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("qemu-img create: %v %s", err, out)
	}
	return p, nil
}

// diskKargs is what the guest's kernel command line needs for the disk
// writer (none without a disk).
func diskKargs(d *diskSpec) []string {
	if d == nil {
		return nil
	}
	return []string{"hb.disk=/dev/vda"}
}

var ackRE = regexp.MustCompile(`\bACK (\d+)\b`)

// acks reads the disk writer's console: every "ACK n" in order, and its
// error line if it stopped on one.
func (g *guest) acks() (ns []uint64, errLine string) {
	b, err := os.ReadFile(g.serial)
	if err != nil {
		return nil, ""
	}
	return parseAcks(b)
}

// parseAcks reads a console's "ACK n" lines in order, and the disk writer's
// error line if it stopped on one. Only whole lines count: the guest may be
// half-way through "ACK 950\n", which would read as ACK 95.
func parseAcks(b []byte) (ns []uint64, errLine string) {
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		l := sc.Text()
		if m := ackRE.FindStringSubmatch(l); m != nil {
			n, _ := strconv.ParseUint(m[1], 10, 64)
			ns = append(ns, n)
		}
		if i := strings.Index(l, "HEARTBEAT disk error"); i >= 0 && errLine == "" {
			errLine = strings.TrimSpace(l[i:])
		}
	}
	return ns, errLine
}

// highest is the largest of ns (0: none).
func highest(ns []uint64) uint64 {
	var h uint64
	for _, n := range ns {
		h = max(h, n)
	}
	return h
}

// lastAck is the highest record the guest has acknowledged (0: none).
func (g *guest) lastAck() uint64 {
	ns, _ := g.acks()
	return highest(ns)
}

// checkAcksContinue waits until the guest acknowledges records past
// before+2 — its disk writer goes on after whatever the test did — and
// checks the acknowledgements never went back (a repeated number would be
// a guest that ran some writes twice).
//
// One stall is QEMU's, not ours, and is reported instead of failed on: a
// disk on an iothread whose every request QEMU completed while the guest
// still waits (lostCompletionIRQ). The guest's writer then never goes on,
// and later calls only say so.
func (g *guest) checkAcksContinue(before uint64) {
	g.t.Helper()
	if g.lostIRQ != "" {
		g.t.Logf("%s (disk %s): its writer has waited since QEMU lost a completion interrupt; ACKs not awaited", g.name, g.disk)
		return
	}
	deadline := time.Now().Add(60 * time.Second)
	for g.lastAck() <= before+2 {
		if _, e := g.acks(); e != "" {
			g.t.Fatalf("%s: the disk writer stopped: %s", g.name, e)
		}
		if time.Now().After(deadline) {
			if why := g.lostCompletionIRQ(); why != "" {
				g.lostIRQ = why
				g.t.Logf("%s (disk %s): no ACK past %d within 60 s — QEMU 10.0's lost completion interrupt, not liveupdate's (docs/reliability.md): %s", g.name, g.disk, before, why)
				return
			}
			tail, _ := exec.Command("tail", "-5", g.serial).Output()
			g.t.Fatalf("%s (disk %s): no ACK past %d within 60 s (last %d); serial tail:\n%s\nQEMU's view of the disk:\n%s", g.name, g.disk, before, g.lastAck(), tail, g.diskDiagnosis())
		}
		time.Sleep(100 * time.Millisecond)
	}
	ns, _ := g.acks()
	for i := 1; i < len(ns); i++ {
		if ns[i] <= ns[i-1] {
			g.t.Fatalf("%s: ACK %d after ACK %d: the guest's writes went back", g.name, ns[i], ns[i-1])
		}
		if ns[i] != ns[i-1]+1 {
			g.t.Logf("%s: the console lost ACKs %d..%d (the records are still checked on the image)", g.name, ns[i-1]+1, ns[i]-1)
		}
	}
}

// virtqueueState is the part of QEMU's x-query-virtio-queue-status that
// tells where a virtqueue's requests are.
type virtqueueState struct {
	LastAvail   uint16 `json:"last-avail-idx"`   // requests QEMU took from the ring
	ShadowAvail uint16 `json:"shadow-avail-idx"` // requests the guest put there, as QEMU last read it
	Used        uint16 `json:"used-idx"`         // requests QEMU completed
	InUse       int    `json:"inuse"`            // taken and not yet completed
}

// lostCompletionIRQ recognises, on a guest whose disk writer stalled, QEMU
// 10.0.2's lost completion interrupt (docs/reliability.md, "A QEMU 10.0.2
// bug"): a request in flight when a save stops the VM completes in the
// stop's drain, and its deferred guest notification fires after the stop
// tore the notifiers down. It is seen only with the device on an iothread,
// and looks like this: the guest runs, the block device has no error, and
// every virtqueue is complete — each request the guest made taken and
// completed, none in use — while the guest still waits for one. It returns
// the evidence, or "" when the stall looks like anything else (which the
// caller fails on).
func (g *guest) lostCompletionIRQ() string {
	if g.disk == nil || !g.disk.iothread {
		return ""
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, g.qmp)
	if err != nil {
		return ""
	}
	defer c.Close()
	var st struct{ Status string }
	if c.Execute(ctx, "query-status", nil, &st) != nil || st.Status != "running" {
		return ""
	}
	var blocks []struct {
		Device, QDev string
		IOStatus     string `json:"io-status"`
	}
	if c.Execute(ctx, "query-block", nil, &blocks) != nil {
		return ""
	}
	for _, b := range blocks {
		if b.IOStatus != "" && b.IOStatus != "ok" {
			return ""
		}
	}
	queues, err := blkQueues(ctx, c)
	if err != nil {
		return ""
	}
	var evidence []string
	for _, q := range queues {
		var vq virtqueueState
		if q.err != nil || json.Unmarshal(q.status, &vq) != nil {
			return ""
		}
		if vq.InUse != 0 || vq.LastAvail != vq.Used || vq.ShadowAvail != vq.LastAvail {
			return ""
		}
		evidence = append(evidence, fmt.Sprintf("queue %d: taken %d = completed %d = offered %d, none in use", q.n, vq.LastAvail, vq.Used, vq.ShadowAvail))
	}
	if len(evidence) == 0 {
		return ""
	}
	return "guest running, disk without error, " + strings.Join(evidence, "; ")
}

// blkQueue is one virtqueue of a virtio-blk device, as QEMU reports it.
type blkQueue struct {
	path   string          // the device's QOM path
	n      int             // the queue's index
	status json.RawMessage // x-query-virtio-queue-status's answer
	err    error           // or why QEMU gave none (queue 0 only)
}

// blkQueues asks the guest's QEMU for every virtqueue of each virtio-blk
// device: queue after queue until QEMU says there is no such queue (an
// error on queue 0 is kept: that device's queues cannot be read).
func blkQueues(ctx context.Context, c *qmp.Client) ([]blkQueue, error) {
	var devs []struct{ Path, Name string }
	if err := c.Execute(ctx, "x-query-virtio", nil, &devs); err != nil {
		return nil, err
	}
	var qs []blkQueue
	for _, d := range devs {
		if d.Name != "virtio-blk" {
			continue
		}
		for n := 0; n < 16; n++ {
			q := blkQueue{path: d.Path, n: n}
			if q.err = c.Execute(ctx, "x-query-virtio-queue-status", map[string]any{"path": d.Path, "queue": n}, &q.status); q.err != nil {
				if n == 0 {
					qs = append(qs, q)
				}
				break
			}
			qs = append(qs, q)
		}
	}
	return qs, nil
}

// diskDiagnosis is what the guest's QEMU says of its disk when the disk
// writer stalls: the block layer's view, and each virtio queue's indexes
// (a request QEMU took from the ring but never completed shows as
// last-avail-idx ahead of used-idx with nothing in flight in the block
// layer). Best effort: errors are part of the text.
func (g *guest) diskDiagnosis() string {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := qmp.Dial(ctx, g.qmp)
	if err != nil {
		return fmt.Sprintf("(its monitor: %v)", err)
	}
	defer c.Close()
	var b strings.Builder
	ask := func(cmd string, args any) any {
		var out any
		if err := c.Execute(ctx, cmd, args, &out); err != nil {
			return err.Error()
		}
		return out
	}
	fmt.Fprintf(&b, "query-status: %v\nquery-block: %v\n", ask("query-status", nil), ask("query-block", nil))
	queues, err := blkQueues(ctx, c)
	if err != nil {
		fmt.Fprintf(&b, "x-query-virtio: %v\n", err)
	}
	for i, q := range queues {
		if i == 0 || queues[i-1].path != q.path {
			fmt.Fprintf(&b, "%s status: %v\n", q.path, ask("x-query-virtio-status", map[string]any{"path": q.path}))
		}
		if q.err != nil {
			fmt.Fprintf(&b, "%s queue %d: %v\n", q.path, q.n, q.err)
			continue
		}
		fmt.Fprintf(&b, "%s queue %d: %s\n", q.path, q.n, q.status)
	}
	return b.String()
}

// checkDisk reads the guest's image on the host and asserts every record
// the guest acknowledged is there and intact (checkImage). It returns how
// many were checked.
//
// Why reading while the guest's QEMU runs is sound: the acknowledgements
// are read from the console first, so every record checked had its guest
// fdatasync return before we look. A guest flush makes QEMU flush the
// image: for raw the data was written to the image file (cache=writeback:
// into the host's page cache, which a QEMU's death does not lose and which
// our read sees; cache=none: to the disk) and fdatasync'd. For qcow2 the
// flush also writes QEMU's cached L2 and refcount tables to the file, after
// the data they point at, before it returns — so the cluster mappings of
// every acknowledged record are in the file. What the running QEMU still
// changes (allocations for later records) only adds mappings to L2 tables
// written whole; the entries of records already flushed are the same bytes
// before and after, so a read racing such a write still finds them. We
// read qcow2 with `qemu-img convert -U` (force share: the running QEMU
// holds the image's write lock); once the QEMU is gone (killed: see
// TestRestartDiskShapes) the same check runs without -U on an image
// nothing holds — the claim that matters: acknowledged means on the image,
// whatever becomes of QEMU.
func (g *guest) checkDisk() int {
	g.t.Helper()
	if _, e := g.acks(); e != "" {
		g.t.Fatalf("%s: the disk writer stopped: %s", g.name, e)
	}
	acked := g.lastAck()
	b, ok := g.lastBeat()
	if !ok {
		g.t.Fatalf("%s: no heartbeat, no boot id to check the disk against", g.name)
	}
	n, err := checkImage(g.image, g.disk.format, acked, b.boot, alive(g.pid()))
	if err != nil {
		g.t.Fatalf("%s (disk %s): %v", g.name, g.disk, err)
	}
	return n
}

// checkImage asserts that every record up to acked is on image (raw or
// qcow2, as format says), intact: its magic, its number at its place, the
// writer's boot id, its checksum (see checkDisk for why a read beside a
// running QEMU is sound). inUse says a QEMU still holds the image: qcow2
// is then read with -U. It returns how many records were checked.
func checkImage(image, format string, acked uint64, bootID string, inUse bool) (int, error) {
	img := image
	if format != "raw" {
		dir, err := os.MkdirTemp("", "lu-disk-check")
		if err != nil {
			return 0, err
		}
		defer os.RemoveAll(dir)
		img = filepath.Join(dir, "disk.raw")
		args := []string{"convert", "-f", format, "-O", "raw", image, img}
		if inUse {
			args = append([]string{"convert", "-U"}, args[1:]...)
		}
		// A QEMU just SIGKILLed was once seen to hold its image lock a
		// moment after it no longer showed as alive (qcow2, aio=native,
		// iothread; why not established — in-flight AIO ending before
		// the files close is a guess): try again briefly, and name the
		// holders if it persists.
		for start := time.Now(); ; {
			out, err := exec.Command("qemu-img", args...).CombinedOutput()
			if err == nil {
				break
			}
			if inUse || !strings.Contains(string(out), "lock") || time.Since(start) > 10*time.Second {
				holders, _ := exec.Command("fuser", "-v", image).CombinedOutput()
				return 0, fmt.Errorf("qemu-img %s: %v %s\nholders of the image:\n%s", strings.Join(args, " "), err, out, holders)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	f, err := os.Open(img)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	data := make([]byte, (acked+1)*4096)
	if n, err := f.ReadAt(data, 0); uint64(n) < uint64(len(data)) {
		return 0, fmt.Errorf("image %s holds %d bytes, %d acknowledged records need %d: %v", img, n, acked, len(data), err)
	}
	table := crc64.MakeTable(crc64.ECMA)
	var bad []string
	for n := uint64(1); n <= acked; n++ {
		r := data[n*4096 : (n+1)*4096]
		switch {
		case string(r[:8]) != "HBDISK01":
			bad = append(bad, fmt.Sprintf("%d: no record (magic %q)", n, r[:8]))
		case binary.LittleEndian.Uint64(r[8:]) != n:
			bad = append(bad, fmt.Sprintf("%d: holds record %d", n, binary.LittleEndian.Uint64(r[8:])))
		case binary.LittleEndian.Uint64(r[4088:]) != crc64.Checksum(r[:4088], table):
			bad = append(bad, fmt.Sprintf("%d: checksum wrong", n))
		case string(bytes.TrimRight(r[16:64], "\x00")) != bootID:
			bad = append(bad, fmt.Sprintf("%d: boot id %q, the guest's is %s", n, bytes.TrimRight(r[16:64], "\x00"), bootID))
		}
	}
	if len(bad) > 0 {
		if len(bad) > 10 {
			bad = append(bad[:10], fmt.Sprintf("… %d more", len(bad)-10))
		}
		return 0, fmt.Errorf("%d of %d acknowledged records lost or damaged:\n%s", len(bad), acked, strings.Join(bad, "\n"))
	}
	return int(acked), nil
}

// diskShapes are the disk shapes TestRestartDiskShapes restarts: both
// formats, the three front ends (hand-written -drive, -drive + -device,
// libvirt's JSON -blockdev), with and without an iothread, both cache
// modes, the three aio engines where QEMU allows them.
var diskShapes = []diskSpec{
	{format: "raw", frontend: "drive", cache: "writeback", aio: "threads"},
	{format: "raw", frontend: "drive", cache: "none", aio: "native"},
	{format: "raw", frontend: "drive", cache: "none", aio: "io_uring", refusal: "io_uring"},
	// QEMU 10.0.2: "aio=native was specified, but it requires
	// cache.direct=on, which was not specified."
	{format: "raw", frontend: "drive", cache: "writeback", aio: "native", refusal: "aio=native was specified, but it requires cache.direct=on"},
	{format: "qcow2", frontend: "drive", cache: "writeback", aio: "threads"},
	{format: "qcow2", frontend: "drive+device", iothread: true, cache: "none", aio: "native"},
	{format: "raw", frontend: "drive+device", iothread: true, cache: "writeback", aio: "io_uring", refusal: "io_uring"},
	{format: "raw", frontend: "blockdev", iothread: true, cache: "none", aio: "native"},
	{format: "qcow2", frontend: "blockdev", iothread: true, cache: "writeback", aio: "threads"},
	{format: "qcow2", frontend: "blockdev", cache: "none", aio: "io_uring", refusal: "io_uring"},
	{format: "raw", frontend: "blockdev", cache: "writeback", aio: "threads"},
}

// TestRestartDiskShapes checks plan finds each shape's image (it refuses
// while the image is moved away), then restarts one guest per disk shape
// twice — the
// early-start way, then --sequential — while its disk writer runs, and
// checks after each restart that it still acknowledges writes and that
// every record it acknowledged is on the image, intact; at the end its
// QEMU is SIGKILLed and the image, which nothing holds any more, checked
// once more. Each restart logs a "DISKSHAPE" line (docs/reliability.md's
// table is made from them).
func TestRestartDiskShapes(t *testing.T) {
	for i, d := range diskShapes {
		t.Run(strings.NewReplacer("/", "_", "=", "-").Replace(d.String()), func(t *testing.T) {
			g := bootAll(t, guestSpec{name: fmt.Sprintf("ds%d", i), disk: &d})[0]
			if code, out, _ := runLU(t, "plan", g.name); code != 0 {
				t.Skipf("DISKSHAPE %s | liveupdate plan refuses it (exit %d): %s", d, code, strings.TrimSpace(out))
			}
			// plan finds the image on the command line, also in libvirt's
			// JSON -blockdev: with it gone, a restarted QEMU could not
			// start, and plan says so.
			if err := os.Rename(g.image, g.image+".gone"); err != nil {
				t.Fatal(err)
			}
			code, out, _ := runLU(t, "plan", g.name)
			if err := os.Rename(g.image+".gone", g.image); err != nil {
				t.Fatal(err)
			}
			if code != 3 || !strings.Contains(out, g.image+" cannot be found") {
				t.Errorf("plan with the image %s gone: exit %d, not refused naming it:\n%s", g.image, code, out)
			}
			for _, mode := range []string{"early", "sequential"} {
				last, _ := g.lastBeat()
				state := t.TempDir()
				args := []string{"restart-qemu", "--json", "--state-dir", state}
				if mode == "sequential" {
					args = append(args, "--sequential")
				}
				code, out, errOut := runLU(t, append(args, g.name)...)
				if code != 0 {
					t.Fatalf("DISKSHAPE %s | %s | restart-qemu exit %d: %s", d, mode, code, strings.TrimSpace(errOut))
				}
				r := parseResult(t, out)
				if len(r.VMs) != 1 || r.VMs[0].Status != "running" {
					t.Fatalf("result: %+v", r)
				}
				g.checkContinues(last)
				m, err := manifest.Read(filepath.Join(state, manifest.FileName))
				if err != nil {
					t.Fatal(err)
				}
				path := "sequential"
				if startedEarly(m, g.name) {
					path = "early start"
				}
				if mode == "early" && path != "early start" {
					t.Logf("%s: restart-qemu took the sequential way: %s", d, strings.TrimSpace(errOut))
				}
				t.Logf("DISKSHAPE %s | %s | ran %s, blackout %.1f ms, %d acknowledged records intact", d, mode, path, r.VMs[0].BlackoutMS, g.lastAck())
			}
			// Without any QEMU: acknowledged means on the image.
			pid := g.pid()
			g.kill()
			for i := 0; i < 100 && alive(pid); i++ {
				time.Sleep(50 * time.Millisecond)
			}
			t.Logf("DISKSHAPE %s | QEMU killed | %d acknowledged records intact on the image", d, g.checkDisk())
		})
	}
}

// startedEarly says whether the guest's new QEMU answered its monitor
// before the old one stopped.
func startedEarly(m *manifest.Manifest, name string) bool {
	var stopped time.Time
	for _, v := range m.VMs {
		if v.Name == name {
			stopped = v.Stopped
		}
	}
	for _, p := range m.Phases {
		if p.Name == "qemu-init" && p.VM == name {
			return !p.End.IsZero() && p.End.Before(stopped)
		}
	}
	return false
}

// waitAckPast polls read (the highest "ACK n" a guest printed) every
// interval until it passes n, and returns it; after d it fails the test,
// with more() appended to the message (the guest's console, say).
func waitAckPast(t testing.TB, n uint64, d, interval time.Duration, read func() uint64, more func() string) uint64 {
	deadline := time.Now().Add(d)
	for {
		if got := read(); got > n {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest acknowledged no disk record past %d within %s%s", n, d, more())
		}
		time.Sleep(interval)
	}
}
