package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The ACPI power button (QMP system_powerdown, a host's orderly stop): the
// guest shuts down cleanly as a real one would — the disk writer stops
// after its last acknowledged record, "HEARTBEAT powered down after ACK n"
// goes to the console, the filesystems' caches are synced and the guest
// powers off, which ends its QEMU.
const (
	// buttonModuleList names the modules the button needs, dependencies
	// first (written by scripts/guest-initrd.sh): ACPI's button driver
	// and evdev, which makes its input device readable (both modules in
	// Debian's kernel).
	buttonModuleList = "/etc/hb-button-modules"
	// powerButtonName is the input device ACPI's fixed power button
	// registers (LNXPWRBN).
	powerButtonName = "Power Button"

	evKey    = 0x01 // EV_KEY
	keyPower = 116  // KEY_POWER
	// inputEventSize is struct input_event on a 64-bit kernel: a timeval
	// (16 bytes), type and code (u16 each), value (s32).
	inputEventSize = 24
)

// watchPowerButton finds the power button's input device and calls press
// when the button is pressed. Without the button it says why and returns:
// the guest then ignores the button, as a guest without ACPI would.
func watchPowerButton(out io.Writer, press func()) {
	fail := func(format string, a ...any) {
		fmt.Fprintf(out, "HEARTBEAT power button: "+format+"\n", a...)
	}
	if b, err := os.ReadFile(buttonModuleList); err == nil {
		for _, m := range strings.Fields(string(b)) {
			if err := loadModule(m); err != nil {
				fail("module %s: %v", m, err)
				return
			}
		}
	}
	var dev string
	for i := 0; i < 600 && dev == ""; i++ {
		dev = findInputDevice("/sys/class/input", powerButtonName)
		if dev == "" {
			time.Sleep(100 * time.Millisecond)
		}
	}
	if dev == "" {
		fail("no input device named %q", powerButtonName)
		return
	}
	f, err := os.Open(dev)
	if err != nil {
		fail("%v", err)
		return
	}
	defer f.Close()
	fmt.Fprintf(out, "HEARTBEAT power button: %s\n", dev)
	if err := waitPowerKey(f); err != nil {
		fail("reading %s: %v", dev, err)
		return
	}
	press()
}

// findInputDevice returns /dev/input/eventN of the input device called
// name, from sysfs ("" if none).
func findInputDevice(sysClass, name string) string {
	names, _ := filepath.Glob(filepath.Join(sysClass, "event*", "device", "name"))
	for _, n := range names {
		if b, err := os.ReadFile(n); err == nil && strings.TrimSpace(string(b)) == name {
			return filepath.Join("/dev/input", filepath.Base(filepath.Dir(filepath.Dir(n))))
		}
	}
	return ""
}

// waitPowerKey reads input events until KEY_POWER is pressed.
func waitPowerKey(r io.Reader) error {
	ev := make([]byte, inputEventSize)
	for {
		if _, err := io.ReadFull(r, ev); err != nil {
			if errors.Is(err, io.EOF) {
				return io.ErrUnexpectedEOF
			}
			return err
		}
		typ, code := binary.LittleEndian.Uint16(ev[16:]), binary.LittleEndian.Uint16(ev[18:])
		if typ == evKey && code == keyPower && int32(binary.LittleEndian.Uint32(ev[20:])) == 1 {
			return nil
		}
	}
}

// powerDown stops the disk writer (nil: none) after its last acknowledged
// record, says so, and powers the guest off.
func powerDown(con *os.File, dw *diskWriter) {
	var n uint64
	if dw != nil {
		n = dw.Stop()
	}
	fmt.Fprintf(con, "HEARTBEAT powered down after ACK %d\n", n)
	// tcdrain: the line must leave the UART before the power does.
	unix.IoctlSetInt(int(con.Fd()), unix.TCSBRK, 1)
	unix.Sync()
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		fmt.Fprintf(con, "HEARTBEAT power off: %v\n", err)
	}
}
