package kexec

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestExplain(t *testing.T) {
	for errno, want := range map[unix.Errno]string{
		unix.EPERM: "kexec_load_disabled", unix.EKEYREJECTED: "signature", unix.ENOEXEC: "not a bootable kernel",
		unix.ETXTBSY: "open for writing", unix.EBUSY: "another kexec", unix.ENOSYS: "CONFIG_KEXEC_FILE",
	} {
		err := Explain(errno)
		if !strings.Contains(err.Error(), want) || !errors.Is(err, errno) {
			t.Errorf("Explain(%v) = %v", errno, err)
		}
	}
}
