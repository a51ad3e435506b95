// Package qmp is a QMP client for the live-update engine, built on
// github.com/digitalocean/go-qemu/qmp's SocketMonitor.
//
// It adds what the engine needs and the monitor lacks: every call is bounded
// by a context and says what it was waiting for when the deadline passes; the
// event stream is drained continuously (an undrained stream blocks replies)
// and kept with QEMU's own host timestamps, so STOP and RESUME can be paired
// into a blackout afterwards. Commands are sent as raw JSON because the
// generated qmp/raw API predates "mode" and "x-ignore-shared".
package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	dqmp "github.com/digitalocean/go-qemu/qmp"
	"golang.org/x/sys/unix"
)

// Event is a QMP event with QEMU's host timestamp.
type Event struct {
	Name string         `json:"event"`
	Time time.Time      `json:"time"`
	Data map[string]any `json:"data,omitempty"`
}

// Client is one QMP connection.
type Client struct {
	path string
	mon  *dqmp.SocketMonitor

	mu     sync.Mutex
	events []Event
	wake   chan struct{} // closed and replaced whenever an event arrives
	closed chan struct{} // closed when the event stream ends
	once   sync.Once
}

// Dial connects to the QMP unix socket at path and does the capabilities
// handshake. It gives up when ctx is done, e.g. when QEMU never sends its
// greeting because another client holds the monitor. It trusts whoever
// serves path: to talk to one QEMU, use DialPeer.
func Dial(ctx context.Context, path string) (*Client, error) {
	return dial(ctx, path, nil)
}

// DialPeer is Dial to the monitor of QEMU process pid: before a byte is
// sent it checks, with SO_PEERCRED, that the socket is served by pid, and
// fails with a *PeerError if not (whoever serves a QEMU's monitor path
// would be handed the guest's state). The kernel records the credentials
// of the process that last called listen() on the socket; QEMU calls it
// on a listening socket passed by fd too (libvirt's, or ours on a
// restart), so a monitor passed by fd is served by QEMU itself as well.
func DialPeer(ctx context.Context, path string, pid int) (*Client, error) {
	return DialPeerCheck(ctx, path, pid, nil)
}

// DialPeerCheck is DialPeer, with a second chance: when the peer is not
// pid, accept (if not nil) may still accept it (return true).
func DialPeerCheck(ctx context.Context, path string, pid int, accept func(peer int) bool) (*Client, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("connecting to QMP %s: no QEMU pid to check its peer against", path)
	}
	return dial(ctx, path, func(peer int) error {
		if peer == pid || (accept != nil && accept(peer)) {
			return nil
		}
		return &PeerError{Path: path, Peer: peer, PID: pid}
	})
}

// PeerError is a monitor socket served by another process than the QEMU.
type PeerError struct {
	Path      string
	Peer, PID int
}

func (e *PeerError) Error() string {
	return fmt.Sprintf("QMP socket %s is served by pid %d, not by QEMU pid %d: not trusted", e.Path, e.Peer, e.PID)
}

// peerPID is the pid of the process serving mon's unix socket.
func peerPID(mon *dqmp.SocketMonitor) (int, error) {
	// go-qemu's SocketMonitor keeps its connection unexported; read it
	// (TestPeerPIDReadsTheConnection fails if go-qemu renames it).
	f := reflect.ValueOf(mon).Elem().FieldByName("c")
	if !f.IsValid() || f.Type() != reflect.TypeFor[net.Conn]() {
		return 0, errors.New("cannot reach go-qemu's monitor connection to check its peer")
	}
	conn, _ := reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem().Interface().(net.Conn)
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return 0, fmt.Errorf("the monitor connection is a %T, not a unix socket", conn)
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := rc.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", credErr)
	}
	return int(cred.Pid), nil
}

func dial(ctx context.Context, path string, check func(peer int) error) (*Client, error) {
	timeout := 5 * time.Second
	if d, ok := ctx.Deadline(); ok {
		timeout = time.Until(d)
	}
	if timeout <= 0 {
		return nil, fmt.Errorf("connecting to QMP %s: %w", path, context.DeadlineExceeded)
	}
	mon, err := dqmp.NewSocketMonitor("unix", path, timeout)
	if err != nil {
		return nil, fmt.Errorf("connecting to QMP %s: %w", path, err)
	}
	if check != nil {
		peer, err := peerPID(mon)
		if err != nil {
			mon.Disconnect()
			return nil, fmt.Errorf("QMP %s: checking who serves it: %w", path, err)
		}
		if err := check(peer); err != nil {
			mon.Disconnect()
			return nil, err
		}
	}
	done := make(chan error, 1)
	go func() { done <- mon.Connect() }()
	select {
	case err := <-done:
		if err != nil {
			mon.Disconnect()
			return nil, fmt.Errorf("QMP handshake on %s: %w", path, err)
		}
	case <-ctx.Done():
		mon.Disconnect()
		return nil, fmt.Errorf("QMP %s sent no greeting before the deadline (QEMU hung, or another client such as libvirt holds the monitor): %w", path, ctx.Err())
	}
	c := &Client{path: path, mon: mon, wake: make(chan struct{}), closed: make(chan struct{})}
	evs, err := mon.Events(context.Background())
	if err != nil {
		mon.Disconnect()
		return nil, fmt.Errorf("QMP %s: subscribing to events: %w", path, err)
	}
	go c.drain(evs)
	if err := c.sync(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// syncSeq numbers sync commands, so that no two share an id.
var syncSeq atomic.Uint64

// sync makes the next reply on the connection the answer to the next command.
// QEMU has one monitor per chardev, not one per connection: a command it was
// still dispatching when its client hung up is answered on the next
// connection. Seen under load (sixteen QEMUs starting on two cores): a
// handshake took a stale {"return": {}} for its own, and from then on every
// reply answered the command before it ("Capabilities negotiation is already
// complete" came back for migrate-set-capabilities). So send a command with a
// unique id and read replies until that id comes back; QEMU dispatches in
// order, so nothing stale can follow it.
func (c *Client) sync(ctx context.Context) error {
	id := fmt.Sprintf("liveupdate-sync-%d-%d", os.Getpid(), syncSeq.Add(1))
	cmd := []byte(`{"execute": "query-version", "id": "` + id + `"}`)
	for range 8 {
		raw, err := c.run(ctx, "query-version", cmd)
		// The rest are reads: QMP's parser skips whitespace between
		// commands, and the monitor hands us the next reply.
		cmd = []byte("\n")
		if err != nil {
			var qe *Error
			if errors.As(err, &qe) {
				continue // an error reply carries no id: a stale one
			}
			return fmt.Errorf("QMP handshake on %s: %w", c.path, err)
		}
		var r struct {
			ID string `json:"id"`
		}
		if json.Unmarshal(raw, &r) == nil && r.ID == id {
			return nil
		}
	}
	return fmt.Errorf("QMP handshake on %s: the monitor keeps answering other commands than ours; is another client talking to it?", c.path)
}

func (c *Client) drain(evs <-chan dqmp.Event) {
	for e := range evs {
		ev := Event{
			Name: e.Event,
			Time: time.Unix(int64(e.Timestamp.Seconds), int64(e.Timestamp.Microseconds)*1000),
			Data: e.Data,
		}
		c.mu.Lock()
		c.events = append(c.events, ev)
		close(c.wake)
		c.wake = make(chan struct{})
		c.mu.Unlock()
	}
	close(c.closed)
}

// Path is the socket this client is connected to.
func (c *Client) Path() string { return c.path }

// Close disconnects. It is safe to call more than once.
func (c *Client) Close() {
	c.once.Do(func() { c.mon.Disconnect() })
}

// Closed is closed when QEMU closes the connection (e.g. after quit).
func (c *Client) Closed() <-chan struct{} { return c.closed }

// ErrDisconnected means QEMU closed the monitor before replying.
var ErrDisconnected = errors.New("QMP connection closed")

// ErrNotDelivered means the command never reached QEMU: writing it failed,
// the connection being closed already (QEMU gone: EPIPE), or QEMU's end was
// closed with the command still unread in it (ECONNRESET: Linux resets a
// unix socket whose peer closes with data left unread — a QEMU killed while
// its last threads were still exiting takes the write, never reads it).
// Unlike ErrDisconnected — closed after QEMU read the command, before its
// reply, when QEMU may have run it — QEMU certainly did not run it: a
// command QEMU got only part of is not run either.
var ErrNotDelivered = errors.New("QMP command never reached QEMU: its monitor closed")

// Error is an error reply from QEMU.
type Error struct {
	Command string
	Msg     string
}

func (e *Error) Error() string { return fmt.Sprintf("QMP %s: %s", e.Command, e.Msg) }

// Execute runs a command with arguments (nil for none) and decodes its
// "return" value into out (nil to ignore it).
func (c *Client) Execute(ctx context.Context, cmd string, args any, out any) error {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	raw, err := c.run(ctx, cmd, b)
	if err != nil {
		return err
	}
	if out == nil {
		return nil
	}
	if err := decodeReply(raw, out); err != nil {
		return fmt.Errorf("decoding reply to %s: %w", cmd, err)
	}
	return nil
}

// run sends b (a command named cmd) and waits for the next reply. A reply
// that does not come before ctx is done closes the connection: it would
// otherwise answer the next command.
func (c *Client) run(ctx context.Context, cmd string, b []byte) ([]byte, error) {
	type result struct {
		raw []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		raw, err := c.mon.Run(b)
		done <- result{raw, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		c.Close()
		return nil, fmt.Errorf("waiting for QEMU's reply to %s on %s: %w", cmd, c.path, ctx.Err())
	}
	if r.err != nil {
		// go-qemu returns the error of writing the command as it is, and
		// the error of reading the reply as the read's. Every command
		// before this one was answered, so data left unread in QEMU's end
		// (the reset) is this command.
		var op *net.OpError
		if errors.As(r.err, &op) && (op.Op == "write" || errors.Is(op.Err, syscall.ECONNRESET)) {
			return nil, fmt.Errorf("%s on %s: %w (%v)", cmd, c.path, ErrNotDelivered, op.Err)
		}
		// The monitor hands a closed connection to Run as an empty reply,
		// which fails to decode.
		var syn *json.SyntaxError
		if errors.As(r.err, &syn) || errors.Is(r.err, io.EOF) {
			return nil, fmt.Errorf("%s on %s: %w", cmd, c.path, ErrDisconnected)
		}
		return nil, &Error{Command: cmd, Msg: r.err.Error()}
	}
	return r.raw, nil
}

// decodeReply puts a QMP reply's "return" value into out.
func decodeReply(raw []byte, out any) error {
	var resp struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(raw, &resp); err != nil {
		return err
	}
	if resp.Return == nil {
		return errors.New("the reply has no return value")
	}
	return json.Unmarshal(resp.Return, out)
}

// Events returns a copy of the events received so far.
func (c *Client) Events() []Event {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Event(nil), c.events...)
}

// WaitEvent waits for the first event named name, at or after index from
// in the event list, for which match (if not nil) is true. It returns the
// event and its index.
func (c *Client) WaitEvent(ctx context.Context, name string, from int, match func(Event) bool) (Event, int, error) {
	for {
		c.mu.Lock()
		for i := from; i < len(c.events); i++ {
			e := c.events[i]
			if e.Name == name && (match == nil || match(e)) {
				c.mu.Unlock()
				return e, i, nil
			}
		}
		from = len(c.events)
		wake := c.wake
		c.mu.Unlock()
		select {
		case <-wake:
		case <-c.closed:
			// Pick up events that arrived just before the close.
			c.mu.Lock()
			n := len(c.events)
			c.mu.Unlock()
			if n > from {
				continue
			}
			return Event{}, 0, fmt.Errorf("waiting for QMP event %s on %s: %w", name, c.path, ErrDisconnected)
		case <-ctx.Done():
			return Event{}, 0, fmt.Errorf("waiting for QMP event %s on %s: %w", name, c.path, ctx.Err())
		}
	}
}
