// Command heartbeat is the /init of the project's test guest: a tiny static
// program booted by a Debian kernel inside a QEMU guest whose RAM lives in a
// shared memory-backend-file.
//
// It proves a guest survived a live update by printing, on its serial console,
// one line per beat:
//
//	HB seq=42 boot=<boot id> up=4.20 mem=ok checks=3
//
// seq is a counter kept in guest RAM that only ever increases; boot is the
// kernel's boot id (a new boot would change it); mem says whether the pattern
// written into a block of guest RAM at start still has its checksum. A test
// reads these lines from the serial log before and after an update.
//
// The guest is a set of small services started from main:
//   - heartbeat on the serial console;
//   - with hb.ip=CIDR: the NIC configured (virtio_net loaded from the
//     initramfs), a TCP echo server on port 7007 (a test keeps one connection
//     open across an update) and a state server on port 7008 that answers
//     every connection with one heartbeat line plus the guest's wall clock
//     ("time=UNIX_NANOS"), so a test can watch the guest from the network;
//   - with hb.disk=DEV (e.g. /dev/vda): a disk writer (disk.go) writing
//     numbered records to the raw device with O_DIRECT, an fdatasync after
//     each, and "ACK n" on the console once record n is stable — one every
//     hb.disk_ms (default 80 ms) — so a test can check every acknowledged
//     write survived an update;
//   - the QEMU guest agent (qemu-ga, from the initramfs) on the virtio-serial
//     port named org.qemu.guest_agent.0, if the VM has one: the host fixes
//     the guest's clock through it after an update;
//   - the ACPI power button (power.go): pressed (QMP system_powerdown), the
//     guest stops its disk writer after the last acknowledged record,
//     prints "HEARTBEAT powered down after ACK n" and powers off.
package main

import (
	"fmt"
	"hash/crc64"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

// config comes from the kernel command line (hb.*=), with defaults that suit a
// 256 MiB guest under TCG.
type config struct {
	interval time.Duration // between heartbeats
	memMiB   int           // size of the checked RAM block
	check    time.Duration // between checksum verifications
	ip       string        // hb.ip: address for eth0 (CIDR); "" = no network
	disk     string        // hb.disk: block device for the disk writer; "" = none
	diskGap  time.Duration // hb.disk_ms: pause after each acknowledged record
}

func parseConfig(cmdline string) config {
	c := config{interval: 200 * time.Millisecond, memMiB: 32, check: 2 * time.Second, diskGap: 80 * time.Millisecond}
	for _, f := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			continue
		}
		switch k {
		case "hb.interval_ms":
			if n, err := strconv.Atoi(v); err == nil && n > 0 {
				c.interval = time.Duration(n) * time.Millisecond
			}
		case "hb.mem_mib":
			if n, err := strconv.Atoi(v); err == nil && n >= 0 {
				c.memMiB = n
			}
		case "hb.ip":
			c.ip = v
		case "hb.disk":
			c.disk = v
		case "hb.disk_ms":
			if n, err := strconv.Atoi(v); err == nil && n > 0 {
				c.diskGap = time.Duration(n) * time.Millisecond
			}
		case "hb.check_ms":
			if n, err := strconv.Atoi(v); err == nil && n > 0 {
				c.check = time.Duration(n) * time.Millisecond
			}
		}
	}
	return c
}

func main() {
	mountBasics()
	cmdline, _ := os.ReadFile("/proc/cmdline")
	cfg := parseConfig(string(cmdline))
	bootID := readTrim("/proc/sys/kernel/random/boot_id")
	out := console()
	fmt.Fprintf(out, "HEARTBEAT start boot=%s mem_mib=%d interval=%s\n", bootID, cfg.memMiB, cfg.interval)

	mem := newMemCheck(cfg.memMiB, bootID)
	go mem.run(cfg.check)

	var seq atomic.Uint64
	line := func() string {
		return fmt.Sprintf("HB seq=%d boot=%s up=%.2f mem=%s checks=%d served=%d", seq.Load(), bootID, uptime(), mem.status(), mem.checks.Load(), served.Load())
	}
	if cfg.ip != "" {
		if err := setupNetwork(cfg.ip); err != nil {
			fmt.Fprintf(out, "HEARTBEAT network: %v\n", err)
		} else {
			go serveEcho(out, ":7007")
			go serveState(out, ":7008", func() string {
				return fmt.Sprintf("%s time=%d", line(), time.Now().UnixNano())
			})
			fmt.Fprintf(out, "HEARTBEAT network %s up: echo :7007, state :7008\n", cfg.ip)
		}
	}
	var dw *diskWriter
	if cfg.disk != "" {
		dw = startDiskWriter(out, cfg.disk, cfg.diskGap, bootID)
	}
	go watchPowerButton(out, func() { powerDown(out, dw) })
	go runGuestAgent(out)

	t := time.NewTicker(cfg.interval)
	for range t.C {
		seq.Add(1)
		fmt.Fprintln(out, line())
	}
}

// memCheck fills a block of RAM with a pattern derived from the boot id and
// keeps verifying its checksum. A guest whose RAM was not preserved exactly
// reports mem=BAD from then on.
type memCheck struct {
	buf    []byte
	want   uint64
	bad    atomic.Bool
	checks atomic.Uint64
}

var crcTable = crc64.MakeTable(crc64.ECMA)

func newMemCheck(mib int, seed string) *memCheck {
	m := &memCheck{buf: make([]byte, mib<<20)}
	x := crc64.Checksum([]byte(seed), crcTable) | 1
	for i := 0; i+8 <= len(m.buf); i += 8 {
		// xorshift64: cheap, and every page differs.
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		for j := 0; j < 8; j++ {
			m.buf[i+j] = byte(x >> (8 * j))
		}
	}
	m.want = crc64.Checksum(m.buf, crcTable)
	return m
}

func (m *memCheck) run(every time.Duration) {
	for {
		time.Sleep(every)
		if crc64.Checksum(m.buf, crcTable) != m.want {
			m.bad.Store(true)
		}
		m.checks.Add(1)
	}
}

func (m *memCheck) status() string {
	switch {
	case len(m.buf) == 0:
		return "off"
	case m.bad.Load():
		return "BAD"
	}
	return "ok"
}

func mountBasics() {
	os.MkdirAll("/proc", 0o555)
	os.MkdirAll("/sys", 0o555)
	os.MkdirAll("/dev", 0o755)
	syscall.Mount("proc", "/proc", "proc", 0, "")
	syscall.Mount("sysfs", "/sys", "sysfs", 0, "")
	syscall.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
}

// console returns the serial console; if /dev/console cannot be opened the
// kernel-provided stdout is used.
func console() *os.File {
	if f, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		return f
	}
	return os.Stdout
}

func readTrim(p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

func uptime() float64 {
	f := strings.Fields(readTrim("/proc/uptime"))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}
