package manifest

import (
	"fmt"
	"unicode"
	"unicode/utf8"
)

// MaxVMNameLen is the longest VM name liveupdate accepts, in bytes.
const MaxVMNameLen = 64

// CheckVMName is the one rule for a VM's name: plan refuses a VM whose
// -name breaks it, and Validate refuses a manifest holding one, so no
// manifest written before a kexec is refused after it because of a name.
//
// The name becomes file names in the state directory (NAME.state,
// NAME.qemu.log) and a key of the manifest, so it must be one path element
// ("/", ".", ".." and NUL are refused), valid UTF-8 (JSON would replace the
// bytes and the name read back would differ), printable (no control
// characters, which would also garble the logs) and at most MaxVMNameLen
// bytes. The error says what is wrong; the fix is always a new -name.
func CheckVMName(name string) error {
	bad := func(why string) error {
		return fmt.Errorf("VM name %q %s: give the VM a -name of at most %d printable characters without '/' (the name is used for its files in the state directory)", name, why, MaxVMNameLen)
	}
	switch {
	case name == "":
		return bad("is empty")
	case name == "." || name == "..":
		return bad("is a path element of its own")
	case len(name) > MaxVMNameLen:
		return bad(fmt.Sprintf("is %d bytes long, more than %d", len(name), MaxVMNameLen))
	case !utf8.ValidString(name):
		return bad("is not valid UTF-8")
	}
	for _, r := range name {
		switch {
		case r == '/':
			return bad("holds '/'")
		case r == 0:
			return bad("holds a NUL")
		case unicode.IsControl(r):
			return bad(fmt.Sprintf("holds the control character %U", r))
		}
	}
	return nil
}
