// Package luo talks to the kernel's Live Update Orchestrator (LUO, Linux
// ≥ 6.19, on kexec handover): /dev/liveupdate, whose sessions keep file
// descriptors — here, memfds holding guest RAM — across a kexec into the
// next kernel, which retrieves them by session name and token.
//
// The ioctls and their structures are those of the kernel's UAPI
// include/uapi/linux/liveupdate.h (7.3); golang.org/x/sys/unix does not
// carry them yet. The flow, as tools/testing/selftests/liveupdate does it:
//
//	old kernel: Open → CreateSession(name) → Preserve(memfd, token)…,
//	            keep the session open until reboot(LINUX_REBOOT_CMD_KEXEC)
//	new kernel: Open → RetrieveSession(name) → Retrieve(token)…,
//	            Finish once every preserved fd has found its owner
//
// Closing a session before the kexec drops it (its fds are no longer
// preserved): that is the undo of every step before the kexec.
package luo

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Device is the orchestrator's character device.
const Device = "/dev/liveupdate"

// NameMax is the longest session name, in bytes (the UAPI's 64 with its NUL).
const NameMax = 63

// The ioctl numbers: _IO(LIVEUPDATE_IOCTL_TYPE, cmd), the argument a
// pointer to a structure that starts with its own size.
const (
	ioctlType            = 0xBA
	ioctlCreateSession   = ioctlType<<8 | 0x00
	ioctlRetrieveSession = ioctlType<<8 | 0x01
	ioctlPreserveFD      = ioctlType<<8 | 0x40
	ioctlRetrieveFD      = ioctlType<<8 | 0x41
	ioctlFinish          = ioctlType<<8 | 0x42
	ioctlGetName         = ioctlType<<8 | 0x43
)

// sessionArg is struct liveupdate_ioctl_{create,retrieve}_session.
type sessionArg struct {
	Size uint32
	FD   int32
	Name [NameMax + 1]byte
}

// fdArg is struct liveupdate_session_{preserve,retrieve}_fd.
type fdArg struct {
	Size  uint32
	FD    int32
	Token uint64
}

// finishArg is struct liveupdate_session_finish.
type finishArg struct {
	Size     uint32
	Reserved uint32
}

// nameArg is struct liveupdate_session_get_name.
type nameArg struct {
	Size     uint32
	Reserved uint32
	Name     [NameMax + 1]byte
}

// Orchestrator is the open /dev/liveupdate (one process at a time).
type Orchestrator struct{ f *os.File }

// Open opens the orchestrator, saying what is missing when there is none.
func Open() (*Orchestrator, error) {
	f, err := os.OpenFile(Device, os.O_RDWR|unix.O_CLOEXEC, 0)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("%s does not exist: this kernel has no Live Update Orchestrator (it needs CONFIG_LIVEUPDATE and CONFIG_LIVEUPDATE_MEMFD, Linux ≥ 6.19) or was booted without `kho=on liveupdate=on`", Device)
	case errors.Is(err, unix.EBUSY):
		return nil, fmt.Errorf("%s is held by another process (it opens once at a time): %w", Device, err)
	case err != nil:
		return nil, fmt.Errorf("opening %s: %w", Device, err)
	}
	return &Orchestrator{f: f}, nil
}

// Close closes the device; sessions already created stay with their fds.
func (o *Orchestrator) Close() error { return o.f.Close() }

// CreateSession creates a session the next kernel will find under name.
func (o *Orchestrator) CreateSession(name string) (*Session, error) {
	return o.session(ioctlCreateSession, "creating", name)
}

// RetrieveSession opens, in the new kernel, the session the old one
// created under name.
func (o *Orchestrator) RetrieveSession(name string) (*Session, error) {
	s, err := o.session(ioctlRetrieveSession, "retrieving", name)
	if errors.Is(err, unix.ENOENT) {
		return nil, fmt.Errorf("the previous kernel handed over no LUO session %q (was it preserved, and did the kexec carry it?): %w", name, err)
	}
	return s, err
}

func (o *Orchestrator) session(req uintptr, doing, name string) (*Session, error) {
	if err := CheckName(name); err != nil {
		return nil, err
	}
	a := sessionArg{Size: uint32(unsafe.Sizeof(sessionArg{}))}
	copy(a.Name[:], name)
	if err := ioctl(o.f, req, unsafe.Pointer(&a)); err != nil {
		return nil, fmt.Errorf("%s LUO session %q: %w", doing, name, err)
	}
	return &Session{f: os.NewFile(uintptr(a.FD), "luo-session:"+name), Name: name}, nil
}

// CheckName says whether name can name a session.
func CheckName(name string) error {
	if name == "" || len(name) > NameMax {
		return fmt.Errorf("LUO session name %q: must be 1 to %d bytes", name, NameMax)
	}
	for i := 0; i < len(name); i++ {
		if name[i] == 0 {
			return fmt.Errorf("LUO session name %q: contains a NUL byte", name)
		}
	}
	return nil
}

// Session is one LUO session. Its fd must stay open until the kexec in the
// old kernel; closing it drops what it preserves.
type Session struct {
	f    *os.File
	Name string
}

// Preserve hands fd (a shmem memfd: not hugetlb) to the session under
// token. From then on the memfd's size is frozen.
func (s *Session) Preserve(fd int, token uint64) error {
	a := fdArg{Size: uint32(unsafe.Sizeof(fdArg{})), FD: int32(fd), Token: token}
	if err := ioctl(s.f, ioctlPreserveFD, unsafe.Pointer(&a)); err != nil {
		hint := ""
		switch {
		case errors.Is(err, unix.EEXIST):
			hint = " (the token is already used in this session)"
		case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOENT):
			hint = " (LUO keeps only unlinked shmem memfds: not hugetlb, not a file on a filesystem)"
		}
		return fmt.Errorf("preserving fd %d as token %d in LUO session %q%s: %w", fd, token, s.Name, hint, err)
	}
	return nil
}

// Retrieve returns, in the new kernel, the fd preserved under token
// (opened close-on-exec; its name and FD_CLOEXEC flag are not kept).
func (s *Session) Retrieve(token uint64) (*os.File, error) {
	a := fdArg{Size: uint32(unsafe.Sizeof(fdArg{})), FD: -1, Token: token}
	if err := ioctl(s.f, ioctlRetrieveFD, unsafe.Pointer(&a)); err != nil {
		return nil, fmt.Errorf("retrieving token %d from LUO session %q: %w", token, s.Name, err)
	}
	return os.NewFile(uintptr(a.FD), fmt.Sprintf("luo:%s:%d", s.Name, token)), nil
}

// Finish ends the session in the new kernel once every fd it held has been
// retrieved and taken over: the kernel then forgets it.
func (s *Session) Finish() error {
	a := finishArg{Size: uint32(unsafe.Sizeof(finishArg{}))}
	if err := ioctl(s.f, ioctlFinish, unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("finishing LUO session %q: %w", s.Name, err)
	}
	return nil
}

// KernelName asks the kernel for the session's name.
func (s *Session) KernelName() (string, error) {
	a := nameArg{Size: uint32(unsafe.Sizeof(nameArg{}))}
	if err := ioctl(s.f, ioctlGetName, unsafe.Pointer(&a)); err != nil {
		return "", fmt.Errorf("asking LUO session %q's name: %w", s.Name, err)
	}
	n := 0
	for n < len(a.Name) && a.Name[n] != 0 {
		n++
	}
	return string(a.Name[:n]), nil
}

// Fd is the session's file descriptor (kept open across exec by a holder
// that must outlive this process until the kexec).
func (s *Session) Fd() uintptr { return s.f.Fd() }

// Close closes the session: before the kexec, that drops it.
func (s *Session) Close() error { return s.f.Close() }

func ioctl(f *os.File, req uintptr, arg unsafe.Pointer) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno unix.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, uintptr(arg))
	}); err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}
