package guestagent

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
}

// fakeAgent answers like qemu-ga: stale junk first, then the sync reply
// behind 0xFF, then a guest-set-time result.
func fakeAgent(t *testing.T, setTimeErr string) (string, chan int64) {
	p := filepath.Join(t.TempDir(), "qga.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	got := make(chan int64, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
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
				if setTimeErr != "" {
					c.Write([]byte(`{"error": {"class": "GenericError", "desc": "` + setTimeErr + `"}}` + "\n"))
				} else {
					c.Write([]byte(`{"return": {}}` + "\n"))
				}
			}
		}
	}()
	return p, got
}

func TestSyncClock(t *testing.T) {
	p, got := fakeAgent(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	before := time.Now().UnixNano()
	if err := SyncClock(ctx, p); err != nil {
		t.Fatal(err)
	}
	if ts := <-got; ts < before || ts > time.Now().UnixNano() {
		t.Errorf("time sent %d is not now", ts)
	}
	p, _ = fakeAgent(t, "hwclock failed")
	if err := SyncClock(ctx, p); err == nil || !strings.Contains(err.Error(), "hwclock failed") {
		t.Errorf("agent error not reported: %v", err)
	}
}

func TestSyncClockNoAgent(t *testing.T) {
	p := filepath.Join(t.TempDir(), "qga.sock")
	l, _ := net.Listen("unix", p) // a channel with no agent behind it
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := SyncClock(ctx, p); err == nil || !strings.Contains(err.Error(), "is qemu-ga running") {
		t.Errorf("err = %v", err)
	}
}
