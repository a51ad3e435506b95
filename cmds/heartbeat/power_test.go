package main

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
)

func inputEvent(typ, code uint16, value int32) []byte {
	ev := make([]byte, inputEventSize)
	binary.LittleEndian.PutUint16(ev[16:], typ)
	binary.LittleEndian.PutUint16(ev[18:], code)
	binary.LittleEndian.PutUint32(ev[20:], uint32(value))
	return ev
}

// Only a press of KEY_POWER counts: not its release, another key, or an
// event of another type with the same code.
func TestWaitPowerKey(t *testing.T) {
	const evSyn, keyA = 0, 30
	for _, c := range []struct {
		name   string
		events [][]byte
		want   bool
	}{
		{"press", [][]byte{inputEvent(evKey, keyPower, 1), inputEvent(evSyn, 0, 0)}, true},
		{"after other events", [][]byte{inputEvent(evKey, keyA, 1), inputEvent(evSyn, keyPower, 1), inputEvent(evKey, keyPower, 1)}, true},
		{"release only", [][]byte{inputEvent(evKey, keyPower, 0)}, false},
		{"auto-repeat only", [][]byte{inputEvent(evKey, keyPower, 2)}, false},
		{"half an event", [][]byte{inputEvent(evKey, keyPower, 1)[:10]}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := waitPowerKey(bytes.NewReader(bytes.Join(c.events, nil)))
			if (err == nil) != c.want {
				t.Errorf("waitPowerKey: %v, want pressed %v", err, c.want)
			}
		})
	}
}

func TestFindInputDevice(t *testing.T) {
	sys := t.TempDir()
	for dev, name := range map[string]string{"event0": "AT Translated Set 2 keyboard", "event1": "Power Button"} {
		d := filepath.Join(sys, dev, "device")
		os.MkdirAll(d, 0o755)
		os.WriteFile(filepath.Join(d, "name"), []byte(name+"\n"), 0o644)
	}
	if got := findInputDevice(sys, "Power Button"); got != "/dev/input/event1" {
		t.Errorf("got %q", got)
	}
	if got := findInputDevice(sys, "Sleep Button"); got != "" {
		t.Errorf("a device that is not there: %q", got)
	}
}
