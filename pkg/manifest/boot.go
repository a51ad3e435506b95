package manifest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// BootSchemaVersion is the boot record version this code writes and the
// newest it reads. A record without a version (as liveupdate wrote it
// before records had one) is version 1.
const BootSchemaVersion = 1

// BootFileName is the boot record's name, next to the manifest.
const BootFileName = "boot.json"

// Boot is what PID 1 records about the boot after a kexec, next to the
// manifest, for `liveupdate status` to put on the run's time axis.
type Boot struct {
	Schema int    `json:"schema"`
	Kernel string `json:"kernel"`
	// Start is PID 1's start on the run's time axis (see ClockSource).
	Start time.Time `json:"start"`
	// KernelBoot is the kernel's own uptime when PID 1 started.
	KernelBoot time.Duration `json:"kernel_boot_ns"`
	// SinceKexec is the kexec stamp to PID 1's start, by the TSC (0 when
	// the TSC could not carry the time).
	SinceKexec time.Duration `json:"since_kexec_ns,omitempty"`
	// WallError is how far the new kernel's wall clock (from the RTC) was
	// off before PID 1 stepped it; positive means ahead.
	WallError time.Duration `json:"wall_error_ns"`
	// ClockSource is "tsc" when the axis was carried across the kexec by
	// the TSC, "rtc" when the new kernel's wall clock had to be trusted.
	ClockSource string `json:"clock_source"`
	// Uncertainty bounds the error of any span that crosses the kexec.
	Uncertainty time.Duration `json:"uncertainty_ns"`
	// Phases are PID 1's, on the same axis.
	Phases []Phase `json:"phases"`
}

// RTCUncertainty is what a span across the kexec is worth without the
// TSC: the new kernel reads the RTC's whole seconds.
const RTCUncertainty = time.Second

// Validate checks the boot record is one this code reads and makes sense.
// Schema 0 (no version) is version 1.
func (b *Boot) Validate() error {
	switch {
	case b.Schema > BootSchemaVersion:
		return fmt.Errorf("boot record schema %d, this liveupdate reads %d: read it with the liveupdate that wrote it", b.Schema, BootSchemaVersion)
	case b.Schema < 0:
		return fmt.Errorf("boot record schema %d is not a version", b.Schema)
	}
	if b.ClockSource != "tsc" && b.ClockSource != "rtc" {
		return fmt.Errorf("boot record clock_source %q is neither \"tsc\" nor \"rtc\"", b.ClockSource)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"kernel_boot_ns", b.KernelBoot}, {"since_kexec_ns", b.SinceKexec}, {"uncertainty_ns", b.Uncertainty}} {
		if d.v < 0 {
			return fmt.Errorf("boot record %s is negative (%s)", d.name, d.v)
		}
	}
	for i, p := range b.Phases {
		if p.Name == "" {
			return fmt.Errorf("boot record phase %d has no name", i)
		}
		if p.End.Before(p.Start) {
			return fmt.Errorf("boot record phase %d (%q) ends before it starts", i, p.Name)
		}
	}
	return nil
}

// DecodeBoot parses a boot record strictly (unknown fields are an error, as
// for the manifest), reads a record without a version as version 1, and
// validates it.
func DecodeBoot(data []byte) (*Boot, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var b Boot
	if err := dec.Decode(&b); err != nil {
		return nil, fmt.Errorf("boot record does not parse: %w", err)
	}
	if dec.More() {
		return nil, fmt.Errorf("boot record does not parse: trailing data after the JSON object")
	}
	if b.Schema == 0 {
		b.Schema = 1
	}
	if err := b.Validate(); err != nil {
		return nil, err
	}
	return &b, nil
}

// WriteBoot validates b and writes it into dir (the manifest's directory)
// atomically with mode 0600, as BootFileName. It sets b.Schema when unset.
func WriteBoot(dir string, b *Boot) error {
	if b.Schema == 0 {
		b.Schema = BootSchemaVersion
	}
	if err := b.Validate(); err != nil {
		return fmt.Errorf("not writing the boot record: %w", err)
	}
	data, err := json.MarshalIndent(b, "", "  ")
	if err != nil {
		return fmt.Errorf("encoding the boot record: %w", err)
	}
	return WriteFileAtomic(filepath.Join(dir, BootFileName), append(data, '\n'), 0o600)
}

// ReadBoot reads the boot record in dir; (nil, nil) when there is none
// (a run without kexec, or before the new kernel's PID 1 got that far).
func ReadBoot(dir string) (*Boot, error) {
	path := filepath.Join(dir, BootFileName)
	data, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	b, err := DecodeBoot(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}
