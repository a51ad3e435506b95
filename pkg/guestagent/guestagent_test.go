package guestagent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

func TestSocket(t *testing.T) {
	c, _ := qemuargv.Parse([]string{"qemu", "-chardev", "socket,id=qga0,path=/run/vm/qga.sock,server=on,wait=off",
		"-device", "virtio-serial", "-device", `{"driver":"virtserialport","chardev":"qga0","name":"org.qemu.guest_agent.0"}`})
	if got := Socket(c); got != "/run/vm/qga.sock" {
		t.Errorf("Socket = %q", got)
	}
	c, _ = qemuargv.Parse([]string{"qemu", "-chardev", "socket,id=x,path=/a,server=on", "-device", "virtserialport,chardev=x,name=other"})
	if got := Socket(c); got != "" {
		t.Errorf("Socket without agent = %q", got)
	}
	// libvirt's channel: a listening socket passed by fd, named by what it
	// is bound to.
	c, _ = qemuargv.Parse([]string{"qemu", "-chardev", "socket,id=charchannel0,fd=33,server=on,wait=off",
		"-device", `{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0","id":"channel0","name":"org.qemu.guest_agent.0"}`})
	p := &discover.Process{Cmdline: c, Fds: map[int]discover.FdInfo{33: {SocketPath: "/run/libvirt/qemu/channel/1-vm/org.qemu.guest_agent.0"}}}
	if got := ProcessSocket(p); got != "/run/libvirt/qemu/channel/1-vm/org.qemu.guest_agent.0" {
		t.Errorf("ProcessSocket of an fd-passed channel = %q", got)
	}
	if got := Socket(c); got != "" {
		t.Errorf("Socket of an fd-passed channel = %q: it has no path on the command line", got)
	}
}

// fakeAgent answers like qemu-ga: stale junk first, then the sync reply
// behind 0xFF, then a guest-set-time result after setDelay (qemu-ga runs
// hwclock first), then guest-get-time with the clock it was set to.
func fakeAgent(t *testing.T, setTimeErr string, setDelay time.Duration) (string, chan int64) {
	return fakeAgentLag(t, setTimeErr, setDelay, 0)
}

// fakeAgentLag applies a set time only applyLag after receiving it, as a
// slow guest does: its clock ends up behind by that much.
func fakeAgentLag(t *testing.T, setTimeErr string, setDelay, applyLag time.Duration) (string, chan int64) {
	p := filepath.Join(t.TempDir(), "qga.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	got := make(chan int64, 8)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		var offset int64
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			var req struct {
				Execute   string
				Arguments map[string]int64
			}
			json.Unmarshal(line, &req)
			switch req.Execute {
			case "guest-sync-delimited":
				c.Write([]byte(`{"return": {}}` + "\n\xff"))
				b, _ := json.Marshal(map[string]int64{"return": req.Arguments["id"]})
				c.Write(append(b, '\n'))
			case "guest-set-time":
				got <- req.Arguments["time"]
				time.Sleep(applyLag)
				offset = req.Arguments["time"] - time.Now().UnixNano()
				time.Sleep(setDelay)
				if setTimeErr != "" {
					c.Write([]byte(`{"error": {"class": "GenericError", "desc": "` + setTimeErr + `"}}` + "\n"))
				} else {
					c.Write([]byte(`{"return": {}}` + "\n"))
				}
			case "guest-get-time":
				b, _ := json.Marshal(map[string]int64{"return": time.Now().UnixNano() + offset + int64(3*time.Millisecond)})
				c.Write(append(b, '\n'))
			}
		}
	}()
	return p, got
}

func TestSyncClock(t *testing.T) {
	for _, tc := range []struct {
		name     string
		setErr   string
		setDelay time.Duration
		wantErr  string
	}{
		{"answers at once", "", 0, ""},
		// The set-time answer may come long after a handshake try would
		// have given up: it is awaited until the overall deadline.
		{"slow hwclock", "", 400 * time.Millisecond, ""},
		{"agent error", "hwclock failed", 0, "hwclock failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, got := fakeAgent(t, tc.setErr, tc.setDelay)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			before := time.Now().UnixNano()
			off, err := SyncClock(ctx, p, 100*time.Millisecond)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("agent error not reported: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ts := <-got; ts < before || ts > time.Now().UnixNano() {
				t.Errorf("time sent %d is not now", ts)
			}
			if off == 0 || (off-3*time.Millisecond).Abs() > 15*time.Millisecond {
				t.Errorf("offset read back = %s, want about 3ms", off)
			}
		})
	}
}

func TestSyncClockNoAgent(t *testing.T) {
	p := filepath.Join(t.TempDir(), "qga.sock")
	l, _ := net.Listen("unix", p) // a channel with no agent behind it
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := SyncClock(ctx, p, 100*time.Millisecond); err == nil || !strings.Contains(err.Error(), "is qemu-ga running") {
		t.Errorf("err = %v", err)
	}
}

// An agent that comes up late (its socket appears after the first tries)
// is still reached: the handshake is retried until the deadline.
func TestSyncClockLateAgent(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "qga.sock")
	late, _ := fakeAgent(t, "", 0)
	time.AfterFunc(300*time.Millisecond, func() { os.Rename(late, p) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := SyncClock(ctx, p, 100*time.Millisecond); err != nil {
		t.Fatalf("late agent not reached: %v", err)
	}
}

// A guest that applies the time 150 ms late is set again with the time
// sent that much ahead, and ends within the tolerance.
func TestSyncClockCompensatesLag(t *testing.T) {
	p, got := fakeAgentLag(t, "", 0, 150*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	off, err := SyncClock(ctx, p, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if off.Abs() > Tolerance {
		t.Errorf("offset after compensation = %s, want within %s", off, Tolerance)
	}
	if n := len(got); n < 2 {
		t.Errorf("time set %d times, want a second, compensated try", n)
	}
}

// FuzzReply: the guest agent's answers come from inside the guest, which
// the host must not trust; no answer may panic the reader.
func FuzzReply(f *testing.F) {
	f.Add([]byte("{\"return\": {}}\n"))
	f.Add([]byte("\xff{\"return\": 1700000000000000000}\n"))
	f.Add([]byte("{\"error\": {\"class\": \"GenericError\", \"desc\": \"hwclock failed\"}}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		ret, err := reply(bufio.NewReader(bytes.NewReader(b)))
		if err == nil && ret != nil && !json.Valid(ret) {
			t.Errorf("return value %q is not JSON", ret)
		}
	})
}

// endlessAgent answers guest-sync like qemu-ga when syncOK, then streams one
// endless line in answer to the next command (or to guest-sync itself).
func endlessAgent(t *testing.T, syncOK bool) string {
	p := filepath.Join(t.TempDir(), "qga.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				junk := bytes.Repeat([]byte("a"), 32<<10)
				for {
					line, err := r.ReadBytes('\n')
					if err != nil {
						return
					}
					var req struct {
						Execute   string
						Arguments map[string]int64
					}
					json.Unmarshal(line, &req)
					if req.Execute == "guest-sync-delimited" && syncOK {
						b, _ := json.Marshal(map[string]int64{"return": req.Arguments["id"]})
						c.Write(append([]byte("\xff"), append(b, '\n')...))
						continue
					}
					for {
						if _, err := c.Write(junk); err != nil {
							return
						}
					}
				}
			}()
		}
	}()
	return p
}

// A guest streaming an endless line is given up on at MaxLine, at once and
// without growing the host's memory, whether it does so instead of the
// sync reply or after it.
func TestSyncClockEndlessLine(t *testing.T) {
	for _, tc := range []struct {
		name   string
		syncOK bool
	}{
		{"instead of the sync reply", false},
		{"in answer to guest-set-time", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := endlessAgent(t, tc.syncOK)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			start := time.Now()
			_, err := SyncClock(ctx, p, 5*time.Second)
			took := time.Since(start)
			runtime.ReadMemStats(&after)
			if !errors.Is(err, ErrLineTooLong) {
				t.Fatalf("err = %v, want ErrLineTooLong", err)
			}
			if took > 3*time.Second {
				t.Errorf("took %s to give up", took)
			}
			if grew := after.TotalAlloc - before.TotalAlloc; grew > 16<<20 {
				t.Errorf("allocated %d bytes reading the endless line", grew)
			}
		})
	}
}

func TestReadLine(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    string
		wantErr error
	}{
		{"short", "{}\nrest", "{}\n", nil},
		{"exactly MaxLine", strings.Repeat("x", MaxLine-1) + "\n", strings.Repeat("x", MaxLine-1) + "\n", nil},
		{"one byte over", strings.Repeat("x", MaxLine) + "\n", "", ErrLineTooLong},
		{"no newline, short", "abc", "abc", io.EOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readLine(bufio.NewReader(strings.NewReader(tc.in)))
			if !errors.Is(err, tc.wantErr) && err != tc.wantErr {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr != ErrLineTooLong && string(got) != tc.want {
				t.Errorf("line = %q", got)
			}
		})
	}
}
