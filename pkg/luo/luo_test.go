package luo

import (
	"os"
	"strings"
	"testing"
	"unsafe"
)

// The structures must have the kernel's sizes (each starts with its size,
// which the kernel checks) and the ioctls its numbers: UAPI
// include/uapi/linux/liveupdate.h, _IO(0xBA, cmd).
func TestABI(t *testing.T) {
	for _, c := range []struct {
		what      string
		got, want uintptr
	}{
		{"liveupdate_ioctl_create_session", unsafe.Sizeof(sessionArg{}), 72},
		{"liveupdate_session_preserve_fd", unsafe.Sizeof(fdArg{}), 16},
		{"liveupdate_session_finish", unsafe.Sizeof(finishArg{}), 8},
		{"liveupdate_session_get_name", unsafe.Sizeof(nameArg{}), 72},
		{"token offset (__aligned_u64)", unsafe.Offsetof(fdArg{}.Token), 8},
		{"LIVEUPDATE_IOCTL_CREATE_SESSION", ioctlCreateSession, 0xBA00},
		{"LIVEUPDATE_IOCTL_RETRIEVE_SESSION", ioctlRetrieveSession, 0xBA01},
		{"LIVEUPDATE_SESSION_PRESERVE_FD", ioctlPreserveFD, 0xBA40},
		{"LIVEUPDATE_SESSION_RETRIEVE_FD", ioctlRetrieveFD, 0xBA41},
		{"LIVEUPDATE_SESSION_FINISH", ioctlFinish, 0xBA42},
		{"LIVEUPDATE_SESSION_GET_NAME", ioctlGetName, 0xBA43},
	} {
		if c.got != c.want {
			t.Errorf("%s: %#x, the kernel's is %#x", c.what, c.got, c.want)
		}
	}
}

func TestCheckName(t *testing.T) {
	for _, c := range []struct {
		name string
		ok   bool
	}{
		{"liveupdate", true},
		{"g", true},
		{strings.Repeat("n", NameMax), true},
		{strings.Repeat("n", NameMax+1), false},
		{"", false},
		{"a\x00b", false},
	} {
		if err := CheckName(c.name); (err == nil) != c.ok {
			t.Errorf("CheckName(%q) = %v, want ok=%v", c.name, err, c.ok)
		}
	}
}

// On a kernel without LUO (this machine's, usually) Open says what is
// missing and how to get it.
func TestOpenWithoutLUO(t *testing.T) {
	if _, err := os.Stat(Device); err == nil {
		t.Skip(Device + " exists here: the real flow is tested in qemu-tests (TestLUOKexec)")
	}
	_, err := Open()
	if err == nil || !strings.Contains(err.Error(), "kho=on liveupdate=on") || !strings.Contains(err.Error(), "CONFIG_LIVEUPDATE") {
		t.Fatalf("Open without %s: %v", Device, err)
	}
}
