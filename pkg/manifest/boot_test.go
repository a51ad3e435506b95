package manifest

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func sampleBoot() *Boot {
	t0 := time.Date(2026, 11, 26, 10, 0, 2, 0, time.UTC)
	return &Boot{Schema: BootSchemaVersion, Kernel: "6.12", Start: t0, KernelBoot: 1800 * time.Millisecond,
		SinceKexec: 1940 * time.Millisecond, WallError: -300 * time.Millisecond, ClockSource: "tsc", Uncertainty: 40 * time.Microsecond,
		Phases: []Phase{{Name: "modules", Start: t0, End: t0.Add(200 * time.Millisecond)},
			{Name: "restore", Start: t0.Add(250 * time.Millisecond), End: t0.Add(600 * time.Millisecond)}}}
}

func TestBootFile(t *testing.T) {
	dir := t.TempDir()
	if b, err := ReadBoot(dir); b != nil || err != nil {
		t.Errorf("no boot record: %v %v", b, err)
	}
	b := sampleBoot()
	b.Schema = 0 // WriteBoot fills it in
	if err := WriteBoot(dir, b); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(filepath.Join(dir, BootFileName))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("boot record: %v, %v", st, err)
	}
	got, err := ReadBoot(dir)
	if err != nil || got.Schema != BootSchemaVersion || got.Kernel != "6.12" || got.SinceKexec != b.SinceKexec ||
		got.WallError != b.WallError || len(got.Phases) != 2 {
		t.Errorf("read back %+v, %v", got, err)
	}
	bad := sampleBoot()
	bad.ClockSource = "ntp"
	if err := WriteBoot(dir, bad); err == nil || !strings.Contains(err.Error(), "clock_source") {
		t.Errorf("invalid boot record written: %v", err)
	}
	os.WriteFile(filepath.Join(dir, BootFileName), []byte(`{"schema":2}`), 0o600)
	if _, err := ReadBoot(dir); err == nil || !strings.Contains(err.Error(), BootFileName) {
		t.Errorf("newer boot record read: %v", err)
	}
}

// A boot record from before records had a version (testdata/boot-v0.json,
// written by that binary) reads as version 1.
func TestBootUnversioned(t *testing.T) {
	old, err := os.ReadFile("testdata/boot-v0.json")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(old), `"schema"`) {
		t.Fatal("testdata/boot-v0.json has a schema field")
	}
	b, err := DecodeBoot(old)
	if err != nil {
		t.Fatal(err)
	}
	if b.Schema != 1 || b.Kernel != "6.12" || b.ClockSource != "tsc" || b.Uncertainty != 40*time.Microsecond || len(b.Phases) != 1 {
		t.Errorf("decoded %+v", b)
	}
}

func TestBootSchema(t *testing.T) {
	base, _ := json.Marshal(sampleBoot())
	for _, tc := range []struct {
		name, schema string // "" drops the field
		want         int
		wantErr      string
	}{
		{"absent", "", 1, ""},
		{"zero", "0", 1, ""},
		{"current", "1", BootSchemaVersion, ""},
		{"newer", "2", 0, "boot record schema 2, this liveupdate reads 1"},
		{"much newer", "99", 0, "this liveupdate reads 1"},
		{"negative", "-1", 0, "not a version"},
		{"not a number", `"1"`, 0, "does not parse"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := strings.Replace(string(base), `"schema":1,`, "", 1)
			if tc.schema != "" {
				s = `{"schema":` + tc.schema + "," + s[1:]
			}
			b, err := DecodeBoot([]byte(s))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || b.Schema != tc.want {
				t.Fatalf("got %+v, %v; want schema %d", b, err, tc.want)
			}
		})
	}
}

func TestBootValidate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		mutate  func(*Boot)
		wantErr string
	}{
		{"ok", func(*Boot) {}, ""},
		{"rtc", func(b *Boot) { b.ClockSource, b.SinceKexec, b.Uncertainty = "rtc", 0, RTCUncertainty }, ""},
		{"unversioned", func(b *Boot) { b.Schema = 0 }, ""},
		{"no phases", func(b *Boot) { b.Phases = nil }, ""},
		{"wall clock behind", func(b *Boot) { b.WallError = -time.Hour }, ""},
		{"zero-length phase", func(b *Boot) { b.Phases[0].End = b.Phases[0].Start }, ""},
		{"newer schema", func(b *Boot) { b.Schema = BootSchemaVersion + 1 }, "this liveupdate reads 1"},
		{"no clock source", func(b *Boot) { b.ClockSource = "" }, "clock_source"},
		{"other clock source", func(b *Boot) { b.ClockSource = "ntp" }, `"ntp" is neither`},
		{"negative kernel boot", func(b *Boot) { b.KernelBoot = -1 }, "kernel_boot_ns is negative"},
		{"negative since kexec", func(b *Boot) { b.SinceKexec = -time.Second }, "since_kexec_ns is negative"},
		{"negative uncertainty", func(b *Boot) { b.Uncertainty = -1 }, "uncertainty_ns is negative"},
		{"unnamed phase", func(b *Boot) { b.Phases[1].Name = "" }, "phase 1 has no name"},
		{"phase ends before it starts", func(b *Boot) { b.Phases[0].End = b.Phases[0].Start.Add(-time.Nanosecond) }, `phase 0 ("modules") ends before it starts`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := sampleBoot()
			tc.mutate(b)
			err := b.Validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func TestDecodeBootStrict(t *testing.T) {
	b, _ := json.Marshal(sampleBoot())
	bad := strings.Replace(string(b), `"schema":1`, `"schema":1,"surprise":true`, 1)
	if _, err := DecodeBoot([]byte(bad)); err == nil || !strings.Contains(err.Error(), "surprise") {
		t.Fatalf("unknown field accepted: %v", err)
	}
	if _, err := DecodeBoot([]byte("{")); err == nil {
		t.Fatal("truncated boot record accepted")
	}
	if _, err := DecodeBoot(append(b, []byte("{}")...)); err == nil {
		t.Fatal("trailing data accepted")
	}
}

func FuzzDecodeBoot(f *testing.F) {
	b, _ := json.Marshal(sampleBoot())
	f.Add(b)
	if old, err := os.ReadFile("testdata/boot-v0.json"); err == nil {
		f.Add(old)
	}
	f.Add([]byte(`{"clock_source":"rtc","phases":[{"name":"x","start":"2026-01-01T00:00:00Z","end":"2026-01-01T00:00:01Z"}]}`))
	f.Add([]byte(`{"schema":2,"clock_source":"tsc"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := DecodeBoot(data)
		if err != nil {
			return
		}
		// Whatever decodes is a version this code reads, validates, and
		// survives a write and a read unchanged.
		if b.Schema != BootSchemaVersion {
			t.Fatalf("decoded schema %d", b.Schema)
		}
		if err := b.Validate(); err != nil {
			t.Fatalf("decoded boot record does not validate: %v", err)
		}
		dir := t.TempDir()
		if err := WriteBoot(dir, b); err != nil {
			t.Fatalf("decoded boot record does not write: %v", err)
		}
		got, err := ReadBoot(dir)
		if err != nil {
			t.Fatalf("written boot record does not read: %v", err)
		}
		b1, _ := json.Marshal(b)
		b2, _ := json.Marshal(got)
		if string(b1) != string(b2) {
			t.Fatalf("write/read changed the record:\n%s\n%s", b1, b2)
		}
	})
}
