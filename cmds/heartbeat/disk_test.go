package main

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc64"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// The writer against a small regular file (O_DIRECT works on it as on the
// guest's block device): every record acknowledged is on the file, intact,
// and it stops at the end instead of wrapping.
func TestDiskWriter(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(p, make([]byte, 5*diskRecordSize), 0o600); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	acked := runDiskWriter(&out, p, time.Millisecond, "boot-1234", nil)
	if strings.Contains(out.String(), "disk error") {
		t.Skipf("no O_DIRECT here: %s", out.String())
	}
	if acked != 4 {
		t.Errorf("last acknowledged record %d, want 4", acked)
	}
	if !strings.Contains(out.String(), "ACK 1\nACK 2\nACK 3\nACK 4\nHEARTBEAT disk full") {
		t.Fatalf("output:\n%s", out.String())
	}
	b, _ := os.ReadFile(p)
	for n := uint64(1); n <= 4; n++ {
		r := b[n*diskRecordSize : (n+1)*diskRecordSize]
		if string(r[:8]) != diskRecordMagic || binary.LittleEndian.Uint64(r[8:]) != n ||
			string(bytes.TrimRight(r[16:64], "\x00")) != "boot-1234" ||
			binary.LittleEndian.Uint64(r[diskRecordSize-8:]) != crc64.Checksum(r[:diskRecordSize-8], crcTable) {
			t.Errorf("record %d bad", n)
		}
	}
	if !bytes.Equal(b[:diskRecordSize], make([]byte, diskRecordSize)) {
		t.Errorf("block 0 written")
	}
}

func TestParseConfigDisk(t *testing.T) {
	c := parseConfig("console=ttyS0 hb.disk=/dev/vda hb.disk_ms=50")
	if c.disk != "/dev/vda" || c.diskGap != 50*time.Millisecond {
		t.Errorf("%+v", c)
	}
	if c := parseConfig("quiet"); c.disk != "" || c.diskGap != 80*time.Millisecond {
		t.Errorf("defaults: %+v", c)
	}
}

// Stopped (the guest powers down), the writer ends after an acknowledged
// record and reports the last one: its "ACK n" is the last line it wrote,
// and no record follows n on the disk.
func TestDiskWriterStop(t *testing.T) {
	p := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(p, make([]byte, 1000*diskRecordSize), 0o600); err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	w := startDiskWriter(&out, p, 5*time.Millisecond, "boot-1")
	for !strings.Contains(out.String(), "ACK 3\n") {
		if strings.Contains(out.String(), "disk error") {
			t.Skipf("no O_DIRECT here: %s", out.String())
		}
		time.Sleep(time.Millisecond)
	}
	n := w.Stop()
	if again := w.Stop(); again != n {
		t.Errorf("second Stop: %d, first %d", again, n)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if n < 3 || lines[len(lines)-1] != fmt.Sprintf("ACK %d", n) {
		t.Fatalf("stopped at %d; output ends %q", n, lines[len(lines)-1])
	}
	b, _ := os.ReadFile(p)
	if next := b[(n+1)*diskRecordSize:][:8]; string(next) == diskRecordMagic {
		t.Errorf("record %d written after the last acknowledged one", n+1)
	}
}

// syncBuffer is a bytes.Buffer the writer's goroutine and the test share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
