// Package tapdev keeps a guest's tap devices alive across a QEMU restart and
// hands the new QEMU fds for them.
//
// A tap that QEMU (or libvirt) created without TUNSETPERSIST disappears with
// its last fd, i.e. when the old QEMU quits. So before the quit the engine
// takes a duplicate of QEMU's tap fd (pidfd_getfd) and marks the tap
// persistent; the new QEMU gets a fresh fd for the same device (TUNSETIFF by
// name, same flags); and once the guest runs again the tap's original
// persistence is put back.
package tapdev

import (
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// setIFFMask are the flags TUNSETIFF accepts back (not PERSIST, not the
// queue attach/detach requests).
const setIFFMask = unix.IFF_TUN | unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_ONE_QUEUE |
	unix.IFF_VNET_HDR | unix.IFF_MULTI_QUEUE | unix.IFF_NAPI | unix.IFF_NAPI_FRAGS

// DupFromProcess duplicates fd number fd of process pid into this process.
func DupFromProcess(pid, fd int) (*os.File, error) {
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open(%d): %w", pid, err)
	}
	defer unix.Close(pidfd)
	n, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_getfd(pid %d, fd %d): %w", pid, fd, err)
	}
	return os.NewFile(uintptr(n), fmt.Sprintf("pid%d-fd%d", pid, fd)), nil
}

// Info returns the name and TUN flags of the tap an fd is attached to. The
// flags include IFF_PERSIST when the device is persistent.
func Info(f *os.File) (string, uint16, error) {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return "", 0, err
	}
	if err := ioctlIfreq(f, unix.TUNGETIFF, ifr); err != nil {
		return "", 0, fmt.Errorf("TUNGETIFF: %w", err)
	}
	return ifr.Name(), ifr.Uint16(), nil
}

// SetPersist makes the tap behind f outlive its fds (or not).
func SetPersist(f *os.File, on bool) error {
	v := 0
	if on {
		v = 1
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) { ierr = unix.IoctlSetInt(int(fd), unix.TUNSETPERSIST, v) }); err != nil {
		return err
	}
	if ierr != nil {
		return fmt.Errorf("TUNSETPERSIST %v: %w", on, ierr)
	}
	return nil
}

// Open attaches a new fd to the tap called name with the given flags (as
// returned by Info; IFF_PERSIST is ignored). For a multi-queue tap each call
// attaches one more queue. If the device does not exist it is created.
func Open(name string, flags uint16) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening /dev/net/tun: %w", err)
	}
	f := os.NewFile(uintptr(fd), "tap:"+name)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		f.Close()
		return nil, err
	}
	ifr.SetUint16(flags & setIFFMask)
	if err := ioctlIfreq(f, unix.TUNSETIFF, ifr); err != nil {
		f.Close()
		return nil, fmt.Errorf("attaching to tap %s (flags %#x): %w", name, flags&setIFFMask, err)
	}
	return f, nil
}

// SetPersistByName changes the persistence of the tap called name by
// attaching to it briefly. Used when no fd of ours is at hand.
func SetPersistByName(name string, flags uint16, on bool) error {
	f, err := Open(name, flags)
	if err != nil {
		return err
	}
	defer f.Close()
	return SetPersist(f, on)
}

func ioctlIfreq(f *os.File, req uint, ifr *unix.Ifreq) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var ierr error
	if err := rc.Control(func(fd uintptr) { ierr = unix.IoctlIfreq(int(fd), req, ifr) }); err != nil {
		return err
	}
	return ierr
}

// InNetNS runs fn on an OS thread that has joined the network namespace at
// path (e.g. /run/netns/x); an empty path runs fn as is. Processes started
// from fn (os/exec forks from the calling thread) and taps opened in it live
// in that namespace.
func InNetNS(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return fmt.Errorf("reading current network namespace: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("opening network namespace %s: %w", path, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return fmt.Errorf("entering network namespace %s: %w", path, err)
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// This thread is now in the wrong namespace: keep it locked so
		// the runtime discards it when the goroutine exits.
		runtime.LockOSThread()
		return fmt.Errorf("leaving network namespace %s: %w", path, err)
	}
	return ferr
}

// NamedNetNS returns the /run/netns path whose namespace is nsLink
// ("net:[inode]", from /proc/PID/ns/net), "" when it is this process's own
// namespace, or an error when it is an unnamed foreign one.
func NamedNetNS(nsLink string) (string, error) {
	self, _ := os.Readlink("/proc/self/ns/net")
	if nsLink == "" || nsLink == self {
		return "", nil
	}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		p := "/run/netns/" + e.Name()
		var st unix.Stat_t
		if unix.Stat(p, &st) == nil && fmt.Sprintf("net:[%d]", st.Ino) == nsLink {
			return p, nil
		}
	}
	return "", fmt.Errorf("QEMU runs in network namespace %s, which has no name under /run/netns: name it (ip netns attach) or run liveupdate inside it", nsLink)
}
