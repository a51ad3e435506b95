package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDecodeReply(t *testing.T) {
	var st struct {
		Running bool
		Status  string
	}
	if err := decodeReply([]byte(`{"return": {"running": true, "status": "running"}}`), &st); err != nil || !st.Running || st.Status != "running" {
		t.Errorf("decodeReply = %+v, %v", st, err)
	}
	for _, bad := range []string{``, `{}`, `{"error": {"class": "GenericError"}}`, `{"return": 5}`, `[`} {
		if err := decodeReply([]byte(bad), &st); err == nil {
			t.Errorf("decodeReply(%q) accepted", bad)
		}
	}
}

// FuzzDecodeReply: replies come from QEMU processes, which a guest may
// have compromised; no reply may panic the decoder.
func FuzzDecodeReply(f *testing.F) {
	f.Add([]byte(`{"return": {"running": true, "status": "running"}}`))
	f.Add([]byte(`{"return": {"status": "completed", "error-desc": "x"}}`))
	f.Add([]byte(`{"return": [{"id": "ram0", "size": 268435456, "share": true}]}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		var st struct {
			Running bool
			Status  string
		}
		decodeReply(raw, &st)
		var q struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		decodeReply(raw, &q)
		var mem []map[string]any
		decodeReply(raw, &mem)
	})
}

// fakeMonitor serves one QMP connection on a unix socket in dir. After the
// greeting it answers qmp_capabilities with the replies in onCaps (one per
// line, a pause between them), and every later command with
// {"return": {"cmd": NAME}} carrying the command's id, or with wrongID when
// that is set.
func fakeMonitor(t *testing.T, onCaps []string, wrongID string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		fmt.Fprintln(conn, `{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": ["oob"]}}`)
		dec := json.NewDecoder(conn)
		for {
			var cmd struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			if dec.Decode(&cmd) != nil {
				return
			}
			if cmd.Execute == "qmp_capabilities" {
				for i, r := range onCaps {
					if i > 0 {
						time.Sleep(50 * time.Millisecond)
					}
					fmt.Fprintln(conn, r)
				}
				continue
			}
			id := string(cmd.ID)
			if wrongID != "" {
				id = wrongID
			}
			if id == "" {
				id = "null"
			}
			fmt.Fprintf(conn, `{"return": {"cmd": %q}, "id": %s}`+"\n", cmd.Execute, id)
		}
	}()
	return path
}

// TestDialSync: a reply left in QEMU's monitor by an earlier connection must
// not put this connection's replies out of step.
func TestDialSync(t *testing.T) {
	const stale = `{"return": {}}`
	const already = `{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}`
	for _, tc := range []struct {
		name    string
		onCaps  []string
		wrongID string
		wantErr string
	}{
		{name: "in step", onCaps: []string{`{"return": {}}`}},
		{name: "stale reply first", onCaps: []string{stale, already}},
		{name: "stale replies in one write", onCaps: []string{stale + "\n" + already}},
		{name: "two stale replies", onCaps: []string{stale, `{"return": {"status": "paused"}}`, already}},
		{name: "never our id", onCaps: []string{`{"return": {}}`}, wrongID: `"someone-else"`, wantErr: "waiting for QEMU's reply to query-version"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := fakeMonitor(t, tc.onCaps, tc.wrongID)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			dctx, dcancel := context.WithTimeout(ctx, time.Second)
			defer dcancel()
			c, err := Dial(dctx, path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Dial = %v, want an error saying %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Close()
			for _, cmd := range []string{"query-status", "migrate-set-capabilities", "cont"} {
				var out struct{ Cmd string }
				if err := c.Execute(ctx, cmd, nil, &out); err != nil {
					t.Fatalf("%s: %v", cmd, err)
				}
				if out.Cmd != cmd {
					t.Fatalf("%s got the reply to %q", cmd, out.Cmd)
				}
			}
		})
	}
}

// TestDialNoGreeting: a monitor that never greets (held by another client,
// or QEMU hung) fails the dial at the deadline with that said.
func TestDialNoGreeting(t *testing.T) {
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := Dial(ctx, path); err == nil || !strings.Contains(err.Error(), "no greeting") {
		t.Fatalf("Dial = %v, want no greeting", err)
	}
}

// hangUpMonitor serves one QMP connection that completes the handshake
// (liveupdate's sync included) and then hangs up: at once, once the next
// command has arrived but unread, or once it has read it — never answering.
func hangUpMonitor(t *testing.T, hangUp string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		fmt.Fprintln(conn, `{"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}}, "capabilities": []}}`)
		dec := json.NewDecoder(conn)
		for {
			var cmd struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			if dec.Decode(&cmd) != nil {
				return
			}
			switch {
			case cmd.Execute == "qmp_capabilities":
				fmt.Fprintln(conn, `{"return": {}}`)
			case cmd.Execute == "query-version" && cmd.ID != nil: // the sync
				fmt.Fprintf(conn, `{"return": {}, "id": %s}`+"\n", cmd.ID)
				switch hangUp {
				case "before":
					return
				case "unread":
					time.Sleep(300 * time.Millisecond) // the command arrives meanwhile
					return
				}
			default:
				return // read, never answered
			}
		}
	}()
	return path
}

// TestExecuteAfterHangUp: a command written to a monitor that hung up
// already, or left unread in it as it hangs up, is ErrNotDelivered — QEMU
// never ran it, which lets the engine take back a consumed mark (a cont
// that never reached the new QEMU); one QEMU read and then hung up on is
// ErrDisconnected: it may have run it.
func TestExecuteAfterHangUp(t *testing.T) {
	for _, tc := range []struct {
		hangUp  string
		want    error
		notWant error
	}{
		{hangUp: "before", want: ErrNotDelivered, notWant: ErrDisconnected},
		{hangUp: "unread", want: ErrNotDelivered, notWant: ErrDisconnected},
		{hangUp: "after reading", want: ErrDisconnected, notWant: ErrNotDelivered},
	} {
		t.Run(tc.hangUp, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := Dial(ctx, hangUpMonitor(t, tc.hangUp))
			if err != nil {
				t.Fatalf("Dial: %v", err)
			}
			defer c.Close()
			if tc.hangUp == "before" {
				// The hang-up seen (EOF), so the write surely comes after it.
				select {
				case <-c.Closed():
				case <-ctx.Done():
					t.Fatal("the monitor's hang-up was never seen")
				}
			}
			err = c.Execute(ctx, "cont", nil, nil)
			if !errors.Is(err, tc.want) || errors.Is(err, tc.notWant) {
				t.Fatalf("cont = %v, want %v and not %v", err, tc.want, tc.notWant)
			}
		})
	}
}
