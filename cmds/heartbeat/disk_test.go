package main

import (
	"bytes"
	"encoding/binary"
	"hash/crc64"
	"os"
	"path/filepath"
	"strings"
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
	runDiskWriter(&out, p, time.Millisecond, "boot-1234")
	if strings.Contains(out.String(), "disk error") {
		t.Skipf("no O_DIRECT here: %s", out.String())
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
