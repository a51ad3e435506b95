package main

import (
	"encoding/binary"
	"fmt"
	"hash/crc64"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The disk writer (hb.disk=DEV): numbered records written to the raw block
// device with O_DIRECT, each followed by fdatasync, and "ACK n" printed on
// the console only once that fdatasync returned. A host that sees "ACK n"
// may therefore demand record n on the image whatever happened since: the
// guest was told it is stable.
//
// Record n (n ≥ 1) is the 4096-byte block at offset n*4096 (block 0 stays
// unused):
//
//	[0:8)      magic "HBDISK01"
//	[8:16)     n, little endian
//	[16:64)    the guest's boot id, NUL padded
//	[64:4088)  filler derived from n (so a block of one record copied to
//	           another place fails its checksum or its number)
//	[4088:4096) CRC-64 (ECMA) of bytes [0:4088), little endian
//
// The writer stops at the device's end (no wrap: a record once acknowledged
// is never overwritten), on the first error, which it prints as
// "HEARTBEAT disk error: …", and when the guest powers down (after the
// record in flight is acknowledged).
const (
	diskRecordSize  = 4096
	diskRecordMagic = "HBDISK01"
	// diskModuleList names virtio_blk's modules, dependencies first
	// (written by scripts/guest-initrd.sh; virtio_blk is a module in
	// Debian's kernel).
	diskModuleList = "/etc/hb-disk-modules"
)

// diskRecord fills buf (diskRecordSize bytes) with record n.
func diskRecord(buf []byte, n uint64, bootID string) {
	copy(buf[0:8], diskRecordMagic)
	binary.LittleEndian.PutUint64(buf[8:16], n)
	clear(buf[16:64])
	copy(buf[16:64], bootID)
	x := n*0x9E3779B97F4A7C15 | 1
	for i := 64; i+8 <= diskRecordSize-8; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(buf[i:], x)
	}
	binary.LittleEndian.PutUint64(buf[diskRecordSize-8:], crc64.Checksum(buf[:diskRecordSize-8], crcTable))
}

// diskWriter is a running disk writer that can be stopped between records.
type diskWriter struct {
	stop chan struct{}
	done chan uint64 // the last acknowledged record, once the writer ended
	last uint64
}

func startDiskWriter(out io.Writer, dev string, interval time.Duration, bootID string) *diskWriter {
	w := &diskWriter{stop: make(chan struct{}), done: make(chan uint64, 1)}
	go func() { w.done <- runDiskWriter(out, dev, interval, bootID, w.stop) }()
	return w
}

// Stop ends the writer after the record in flight, if any, is
// acknowledged, and returns the last acknowledged record (0: none). It may
// be called again.
func (w *diskWriter) Stop() uint64 {
	select {
	case <-w.stop:
	default:
		close(w.stop)
		w.last = <-w.done
	}
	return w.last
}

// runDiskWriter writes records to dev every interval until the device ends,
// a write fails or stop is closed, and returns the last record it
// acknowledged. It never ends early without saying why on out.
func runDiskWriter(out io.Writer, dev string, interval time.Duration, bootID string, stop <-chan struct{}) (acked uint64) {
	fail := func(format string, a ...any) {
		fmt.Fprintf(out, "HEARTBEAT disk error: "+format+"\n", a...)
	}
	if b, err := os.ReadFile(diskModuleList); err == nil {
		for _, m := range strings.Fields(string(b)) {
			if err := loadModule(m); err != nil {
				fail("module %s: %v", m, err)
				return 0
			}
		}
	}
	// The device node appears once virtio_blk probed (devtmpfs).
	var fd int
	var err error
	for i := 0; i < 3000; i++ {
		if fd, err = unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		fail("open %s: %v", dev, err)
		return 0
	}
	defer unix.Close(fd)
	size, err := unix.Seek(fd, 0, io.SeekEnd)
	if err != nil {
		fail("size of %s: %v", dev, err)
		return 0
	}
	// O_DIRECT wants an aligned buffer: an anonymous mapping is page
	// aligned.
	buf, err := unix.Mmap(-1, 0, diskRecordSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fail("buffer: %v", err)
		return 0
	}
	fmt.Fprintf(out, "HEARTBEAT disk %s: %d bytes, a record every %s\n", dev, size, interval)
	pause := time.NewTimer(0)
	for n := uint64(1); int64(n+1)*diskRecordSize <= size; n++ {
		select {
		case <-stop:
			return acked
		case <-pause.C:
		}
		diskRecord(buf, n, bootID)
		if w, err := unix.Pwrite(fd, buf, int64(n)*diskRecordSize); err != nil || w != diskRecordSize {
			fail("write of record %d: %d bytes, %v", n, w, err)
			return acked
		}
		if err := unix.Fdatasync(fd); err != nil {
			fail("fdatasync after record %d: %v", n, err)
			return acked
		}
		fmt.Fprintf(out, "ACK %d\n", n)
		acked = n
		pause.Reset(interval)
	}
	fmt.Fprintf(out, "HEARTBEAT disk full: %s ends after record %d\n", dev, size/diskRecordSize-1)
	return acked
}
