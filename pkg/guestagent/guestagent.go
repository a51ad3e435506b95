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
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"time"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// AgentPortName is the virtio-serial port name qemu-ga listens on.
const AgentPortName = "org.qemu.guest_agent.0"

// Socket returns the host-side unix socket of a command line's guest agent
// channel ("" when the VM has none): a virtserialport named
// org.qemu.guest_agent.0 whose chardev is a unix socket server.
func Socket(c *qemuargv.Cmdline) string {
	path, _ := SocketOrFD(c)
	return path
}

// SocketOrFD is the agent channel's socket: its path on the command line,
// or, for a listening socket passed by fd (libvirt's channels), that fd
// (-1 if none) — its path is the one the socket is bound to.
func SocketOrFD(c *qemuargv.Cmdline) (path string, fd int) {
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
		return "", -1
	}
	for _, ch := range c.Chardevs() {
		if ch.ID == chardev && ch.Backend == "socket" && (ch.Path != "" || ch.FD >= 0) {
			return ch.Path, ch.FD
		}
	}
	return "", -1
}

// ProcessSocket is the agent channel's socket path of a running QEMU as
// QEMU names it (relative to its working directory if the command line
// says so): from its command line, or the path its fd-passed listening
// socket is bound to. "" when it has none.
func ProcessSocket(p *discover.Process) string {
	path, fd := SocketOrFD(p.Cmdline)
	if path == "" && fd >= 0 {
		path = p.Fds[fd].SocketPath
	}
	return path
}

// SyncClock sets the guest's clock to the host's (qemu-ga also writes it to
// the guest's RTC) and returns the guest's offset from the host read back
// afterwards. It is bounded by ctx.
//
// The handshake is retried, each try bounded by try, until ctx ends: after
// a restore the agent may still be waking up. The answer to guest-set-time
// is awaited until ctx ends, because qemu-ga answers only once hwclock -w
// has run, which takes many seconds in a guest under nested emulation.
func SyncClock(ctx context.Context, socket string, try time.Duration) (time.Duration, error) {
	for {
		tctx, cancel := context.WithTimeout(ctx, try)
		conn, r, err := handshake(tctx, socket)
		cancel()
		if err == nil {
			defer conn.Close()
			return setTimeTight(ctx, conn, r, socket)
		}
		if errors.Is(err, ErrLineTooLong) {
			return 0, err // not an agent waking up: do not ask again
		}
		select {
		case <-ctx.Done():
			return 0, err
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// handshake connects and flushes the channel with guest-sync-delimited.
func handshake(ctx context.Context, socket string) (net.Conn, *bufio.Reader, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, nil, fmt.Errorf("guest agent %s: %w (is qemu-ga running in the guest?)", socket, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	r := bufio.NewReader(conn)
	id := rand.Int64N(1 << 31)
	if err := send(conn, "guest-sync-delimited", map[string]any{"id": id}); err != nil {
		conn.Close()
		return nil, nil, err
	}
	// The reply is preceded by 0xFF; skip anything stale before it.
	for {
		line, err := readLine(r)
		if err != nil {
			conn.Close()
			return nil, nil, fmt.Errorf("guest agent %s: no answer to guest-sync (is qemu-ga running in the guest?): %w", socket, err)
		}
		line = bytes.TrimLeft(line, "\xff")
		var resp struct {
			Return int64 `json:"return"`
		}
		if json.Unmarshal(line, &resp) == nil && resp.Return == id {
			return conn, r, nil
		}
	}
}

// Tolerance is the clock offset SyncClock settles for; beyond it, the time
// sent is advanced by the agent's measured lag and set again (a slow,
// emulated guest applies the time hundreds of milliseconds after it was
// sent).
const Tolerance = 20 * time.Millisecond

// setTimeTight sets the time up to three times, each time sending it
// ahead by the offset the previous try left.
func setTimeTight(ctx context.Context, conn net.Conn, r *bufio.Reader, socket string) (time.Duration, error) {
	var lead, off time.Duration
	for try := 0; try < 3; try++ {
		var err error
		off, err = setTime(ctx, conn, r, socket, lead)
		if err != nil || off.Abs() <= Tolerance {
			return off, err
		}
		lead -= off
	}
	return off, nil
}

// setTime sends guest-set-time with the host's time as it is sent plus
// lead (the agent applies it that much later), then reads the guest's
// clock back and returns its offset from the host's.
func setTime(ctx context.Context, conn net.Conn, r *bufio.Reader, socket string, lead time.Duration) (time.Duration, error) {
	conn.SetDeadline(time.Time{})
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	if err := send(conn, "guest-set-time", map[string]any{"time": time.Now().Add(lead).UnixNano()}); err != nil {
		return 0, err
	}
	if _, err := reply(r); err != nil {
		return 0, fmt.Errorf("guest agent %s: guest-set-time (sent; qemu-ga answers after hwclock -w): %w", socket, err)
	}
	sent := time.Now()
	if err := send(conn, "guest-get-time", nil); err != nil {
		return 0, err
	}
	ret, err := reply(r)
	if err != nil {
		return 0, fmt.Errorf("guest agent %s: guest-get-time after setting the clock: %w", socket, err)
	}
	var ns int64
	if err := json.Unmarshal(ret, &ns); err != nil {
		return 0, fmt.Errorf("guest agent %s: guest-get-time returned %s", socket, ret)
	}
	mid := sent.Add(time.Since(sent) / 2)
	return time.Unix(0, ns).Sub(mid), nil
}

// reply reads one answer and returns its "return" value or its error.
func reply(r *bufio.Reader) (json.RawMessage, error) {
	line, err := readLine(r)
	if err != nil {
		return nil, err
	}
	var resp struct {
		Return json.RawMessage `json:"return"`
		Error  *struct {
			Desc string `json:"desc"`
		} `json:"error"`
	}
	if err := json.Unmarshal(bytes.TrimLeft(line, "\xff"), &resp); err != nil {
		return nil, fmt.Errorf("unreadable reply %q: %w", line, err)
	}
	if resp.Error != nil {
		return nil, errors.New(resp.Error.Desc)
	}
	return resp.Return, nil
}

// MaxLine bounds one line read from a guest agent. The guest is not
// trusted: one streaming an endless line must not grow the host's memory.
// qemu-ga's answers to what we send are a few hundred bytes.
const MaxLine = 64 << 10

// ErrLineTooLong is returned when the guest sends a line longer than MaxLine.
var ErrLineTooLong = fmt.Errorf("the guest agent sent a line longer than %d bytes (a misbehaving or hostile guest): gave up reading it", MaxLine)

// readLine reads one line, '\n' included, of at most MaxLine bytes.
func readLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		if len(line)+len(frag) > MaxLine {
			return nil, ErrLineTooLong
		}
		line = append(line, frag...)
		if err != bufio.ErrBufferFull {
			return line, err
		}
	}
}

func send(conn net.Conn, cmd string, args any) error {
	m := map[string]any{"execute": cmd}
	if args != nil {
		m["arguments"] = args
	}
	b, _ := json.Marshal(m)
	if _, err := conn.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("guest agent: sending %s: %w", cmd, err)
	}
	return nil
}
