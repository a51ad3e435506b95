// Package guestagent talks to the QEMU guest agent (qemu-ga) inside a guest,
// through the host side of its virtio-serial channel, to put the guest's
// clock right after an update stopped it.
//
// The agent protocol is QMP-like JSON lines without a greeting; a
// guest-sync-delimited exchange first flushes whatever a previous client
// left in the channel.
package guestagent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net"
	"time"

	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// AgentPortName is the virtio-serial port name qemu-ga listens on.
const AgentPortName = "org.qemu.guest_agent.0"

// Socket returns the host-side unix socket of a command line's guest agent
// channel ("" when the VM has none): a virtserialport named
// org.qemu.guest_agent.0 whose chardev is a unix socket server.
func Socket(c *qemuargv.Cmdline) string {
	chardev := ""
	for _, i := range c.Find("device") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		if d, _ := p.Get("driver"); d != "virtserialport" {
			continue
		}
		if n, _ := p.Get("name"); n == AgentPortName {
			chardev, _ = p.Get("chardev")
		}
	}
	if chardev == "" {
		return ""
	}
	for _, ch := range c.Chardevs() {
		if ch.ID == chardev && ch.Backend == "socket" && ch.Path != "" {
			return ch.Path
		}
	}
	return ""
}

// SyncClock sets the guest's clock to the host's (qemu-ga also writes it to
// the guest's RTC). It is bounded by ctx.
func SyncClock(ctx context.Context, socket string) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return fmt.Errorf("guest agent %s: %w", socket, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	r := bufio.NewReader(conn)
	id := rand.Int64N(1 << 31)
	if err := send(conn, "guest-sync-delimited", map[string]any{"id": id}); err != nil {
		return err
	}
	// The reply is preceded by 0xFF; skip anything stale before it.
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return fmt.Errorf("guest agent %s: no answer to guest-sync (is qemu-ga running in the guest?): %w", socket, err)
		}
		line = bytes.TrimLeft(line, "\xff")
		var resp struct {
			Return int64 `json:"return"`
		}
		if json.Unmarshal(line, &resp) == nil && resp.Return == id {
			break
		}
	}
	// The host's time as it is sent: off by the one-way latency of the
	// channel, well under a millisecond.
	if err := send(conn, "guest-set-time", map[string]any{"time": time.Now().UnixNano()}); err != nil {
		return err
	}
	line, err := r.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("guest agent %s: guest-set-time: %w", socket, err)
	}
	var resp struct {
		Error *struct {
			Desc string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(bytes.TrimLeft(line, "\xff"), &resp); err != nil {
		return fmt.Errorf("guest agent %s: guest-set-time reply %q: %w", socket, line, err)
	}
	if resp.Error != nil {
		return fmt.Errorf("guest agent %s: guest-set-time: %s", socket, resp.Error.Desc)
	}
	return nil
}

func send(conn net.Conn, cmd string, args any) error {
	b, _ := json.Marshal(map[string]any{"execute": cmd, "arguments": args})
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("guest agent: sending %s: %w", cmd, err)
	}
	return nil
}
