package qemutests

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/cpr"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/pid1"
)

// TestShutDown: PID 1's orderly stop on memmap= PMEM presses every guest's
// ACPI power button and waits for the QEMUs to end (pid1.ShutDown), here
// on this machine with a short deadline where the guest ignores the
// button. The heartbeat guest powers down: its disk writer stops after its
// last acknowledged record, which it names, and every acknowledged record
// is on the image. A QEMU without a guest OS (SeaBIOS only) ignores the
// button: at the deadline the error names it, and it still runs — PID 1
// then abandons the stop and leaves the guests running.
func TestShutDown(t *testing.T) {
	for i, c := range []struct {
		name      string
		heartbeat bool // the heartbeat guest with a disk; else SeaBIOS only
		deadline  time.Duration
		wantGone  bool
	}{
		{name: "guest powers down", heartbeat: true, deadline: 2 * time.Minute, wantGone: true},
		{name: "no guest OS: deadline", deadline: 3 * time.Second},
	} {
		t.Run(c.name, func(t *testing.T) {
			// Unique on the machine: Plan refuses QEMUs sharing a name,
			// and other suites' QEMUs may run beside ours.
			name := fmt.Sprintf("sd%d-%d", i, os.Getpid())
			var g *guest
			if c.heartbeat {
				g = bootAll(t, guestSpec{name: name, disk: &diskSpec{format: "qcow2", frontend: "drive", cache: "writeback", aio: "threads"}})[0]
				g.waitSerial(`HEARTBEAT power button: /dev/input/event\d+`, 2*time.Minute)
				g.checkAcksContinue(0)
			} else {
				g = startBare(t, name)
			}
			pid := g.pid()
			ctx := context.Background()
			ts, err := cpr.New(hostpath.QEMU(t.TempDir()), slog.Default()).Plan(ctx, []string{name})
			if err != nil {
				t.Fatalf("plan: %v", err)
			}
			defer cpr.CloseAll(ts)
			start := time.Now()
			err = pid1.ShutDown(ctx, ts, c.deadline, slog.Default())
			took := time.Since(start)
			if c.wantGone {
				if err != nil {
					t.Fatalf("ShutDown: %v", err)
				}
				if alive(pid) {
					t.Fatalf("QEMU pid %d still runs after ShutDown returned", pid)
				}
				m := g.waitSerial(`HEARTBEAT powered down after ACK (\d+)`, time.Second)
				n, _ := strconv.ParseUint(m[1], 10, 64)
				b, _ := g.lastBeat()
				if last := g.lastAck(); n != last || n == 0 {
					t.Fatalf("the guest says it stopped after ACK %d; its console's last ACK is %d", n, last)
				}
				checked, err := checkImage(g.image, g.disk.format, n, b.boot, false)
				if err != nil {
					t.Fatalf("after the power-down: %v", err)
				}
				t.Logf("the guest powered down %s after its button was pressed; its disk writer stopped after ACK %d; %d acknowledged records intact on the image", took.Round(time.Millisecond), n, checked)
				return
			}
			want := fmt.Sprintf("%s (pid %d)", name, pid)
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("ShutDown: %v, want an error naming %s", err, want)
			}
			if took < c.deadline {
				t.Errorf("ShutDown gave up after %s, before its deadline %s", took, c.deadline)
			}
			if !alive(pid) {
				t.Fatalf("the QEMU that ignored its button is gone: ShutDown must leave it running")
			}
			t.Logf("at the deadline (%s): %v; QEMU pid %d still runs", c.deadline, err, pid)
		})
	}
}

// startBare starts a QEMU with no guest OS — SeaBIOS finds nothing to boot
// and waits —, which ignores the ACPI power button.
func startBare(t *testing.T, name string) *guest {
	t.Helper()
	dir := t.TempDir()
	g := &guest{t: t, name: name, dir: dir, qmp: filepath.Join(dir, "qmp.sock"), pidfile: filepath.Join(dir, "qemu.pid"),
		serial: filepath.Join(dir, "serial.log")}
	out, err := exec.Command(qemuBinary, "-name", name, "-accel", "tcg", "-m", "64", "-nodefaults", "-display", "none",
		"-qmp", "unix:"+g.qmp+",server=on,wait=off", "-daemonize", "-pidfile", g.pidfile).CombinedOutput()
	if err != nil {
		t.Fatalf("starting QEMU: %v\n%s", err, out)
	}
	t.Cleanup(g.kill)
	return g
}

// waitSerial waits until the guest's console has a whole line matching re
// and returns the match.
func (g *guest) waitSerial(re string, d time.Duration) []string {
	g.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(d)
	for {
		b, _ := os.ReadFile(g.serial)
		if i := strings.LastIndexByte(string(b), '\n'); i >= 0 {
			if m := rx.FindStringSubmatch(string(b[:i])); m != nil {
				return m
			}
		}
		if time.Now().After(deadline) {
			tail, _ := exec.Command("tail", "-5", g.serial).Output()
			g.t.Fatalf("%s: no console line matching %q within %s; serial tail:\n%s", g.name, re, d, tail)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
