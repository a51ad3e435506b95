package qemutests

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/qmp"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

// netGuestArgs gives a guest a NIC on tap (in the test's namespace), the
// guest agent's channel, and its address.
func netGuestArgs(dir, tap, cidr string) (extra, kargs []string) {
	qga := filepath.Join(dir, "qga.sock")
	return []string{
			"-netdev", "tap,id=n0,ifname=" + tap + ",script=no,downscript=no",
			"-device", "virtio-net-pci,netdev=n0,mac=52:54:00:bb:00:01",
			"-chardev", "socket,id=qga0,path=" + qga + ",server=on,wait=off",
			"-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"},
		[]string{"hb.ip=" + cidr}
}

// dialIn connects to addr from inside a network namespace.
func dialIn(ns, addr string) (net.Conn, error) {
	var c net.Conn
	err := tapdev.InNetNS("/run/netns/"+ns, func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return err
	})
	return c, err
}

var stateRE = regexp.MustCompile(`HB seq=(\d+) boot=(\S+) .* mem=(\S+) .* time=(\d+)`)

// stateWait is how long one question to a guest's state server waits for
// its answer. Under nested TCG a loaded guest has taken more than 5 s to
// accept a connection; an asker that gives up sooner and asks again only
// adds to its load, and then never hears an answer.
const stateWait = 30 * time.Second

// guestState asks the guest's state server for its heartbeat and clock,
// waiting up to wait for the answer; the lag is guest clock − host clock at
// the moment of the answer.
func guestState(ns, addr string, wait time.Duration) (beat, time.Duration, error) {
	c, err := dialIn(ns, addr)
	if err != nil {
		return beat{}, 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(wait))
	line, err := bufio.NewReader(c).ReadString('\n')
	now := time.Now()
	if err != nil {
		return beat{}, 0, err
	}
	m := stateRE.FindStringSubmatch(line)
	if m == nil {
		return beat{}, 0, fmt.Errorf("state line %q", line)
	}
	seq, _ := strconv.ParseUint(m[1], 10, 64)
	ns64, _ := strconv.ParseInt(m[4], 10, 64)
	return beat{seq: seq, boot: m[2], mem: m[3]}, time.Unix(0, ns64).Sub(now), nil
}

func waitGuestState(t testing.TB, ns, addr string, d time.Duration) (beat, time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	var err error
	for left := d; left > 0; left = time.Until(deadline) {
		var b beat
		var lag time.Duration
		if b, lag, err = guestState(ns, addr, min(left, stateWait)); err == nil {
			return b, lag
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("guest state server %s never answered: %v", addr, err)
	return beat{}, 0
}

// TestClockAndTCP: a guest stopped for 5 s has a clock 5 s behind; after
// restart-qemu its clock is corrected through the real qemu-ga, and a TCP
// connection to it opened before the restart still echoes after.
func TestClockAndTCP(t *testing.T) {
	ns, tap := "lu-clock", "luclk0"
	exec.Command("ip", "netns", "del", ns).Run()
	for _, args := range [][]string{{"netns", "add", ns}, {"-n", ns, "tuntap", "add", "dev", tap, "mode", "tap"},
		{"-n", ns, "addr", "add", "10.82.0.1/24", "dev", tap}, {"-n", ns, "link", "set", tap, "up"}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v %s", args, err, out)
		}
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	dir := t.TempDir()
	extra, kargs := netGuestArgs(dir, tap, "10.82.0.2/24")
	g := bootAll(t, guestSpec{name: "clock", netns: "/run/netns/" + ns, extra: extra, kargs: kargs})[0]
	const addr = "10.82.0.2:7008"
	before, _ := waitGuestState(t, ns, addr, 60*time.Second)

	echo, err := dialIn(ns, "10.82.0.2:7007")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	er := bufio.NewReader(echo)
	roundTrip := func(msg string) error {
		echo.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := fmt.Fprintln(echo, msg); err != nil {
			return err
		}
		got, err := er.ReadString('\n')
		if err != nil {
			return err
		}
		if got != msg+"\n" {
			return fmt.Errorf("echo %q, want %q", got, msg)
		}
		return nil
	}
	if err := roundTrip("before"); err != nil {
		t.Fatal(err)
	}

	// Stop the guest for 5 s: its clock stands still meanwhile.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	q, err := qmp.Dial(ctx, g.qmp)
	if err != nil {
		t.Fatal(err)
	}
	q.Execute(ctx, "stop", nil, nil)
	time.Sleep(5 * time.Second)
	q.Execute(ctx, "cont", nil, nil)
	q.Close()
	_, lag := waitGuestState(t, ns, addr, 10*time.Second)
	if lag > -3500*time.Millisecond {
		t.Fatalf("guest clock lag after a 5 s stop is %s: the test cannot see a correction", lag)
	}

	code, out, _ := runLU(t, "restart-qemu", "--json", "--state-dir", t.TempDir(), "clock")
	if code != 0 {
		t.Fatalf("restart-qemu exit %d", code)
	}
	r := parseResult(t, out)
	if r.VMs[0].Clock != "corrected" {
		t.Errorf("clock: %q, want corrected", r.VMs[0].Clock)
	}
	// The offset the agent read back is reported, and it is small.
	if off := r.VMs[0].ClockOffMS; off == 0 || off < -1000 || off > 1000 {
		t.Errorf("clock offset read back after the fix = %.3f ms, want a measured value within ±1 s", off)
	}
	after, lagAfter := waitGuestState(t, ns, addr, 30*time.Second)
	if lagAfter < -time.Second || lagAfter > time.Second {
		t.Errorf("guest clock off by %s after restart (was %s)", lagAfter, lag)
	}
	if after.boot != before.boot || after.seq <= before.seq || after.mem != "ok" {
		t.Errorf("guest state %+v after, %+v before", after, before)
	}
	if err := roundTrip("after"); err != nil {
		t.Errorf("the TCP connection opened before the restart no longer echoes: %v", err)
	}
	t.Logf("clock lag %s before the restart, %s after (agent read back %+.3f ms); blackout %.1f ms", lag, lagAfter, r.VMs[0].ClockOffMS, r.VMs[0].BlackoutMS)
}
