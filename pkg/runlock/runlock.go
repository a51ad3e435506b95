// Package runlock lets one liveupdate at a time change guests.
//
// The lock is an flock(2) on a file under /run: the kernel drops it when
// its holder dies, however it dies, so it can never be left stale. The file
// names the holder, for the error the second invocation prints.
package runlock

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultPath is where the lock lives (tmpfs: it starts empty every boot).
const DefaultPath = "/run/liveupdate.lock"

// Lock is a held lock.
type Lock struct{ f *os.File }

// Acquire takes the lock without waiting. what describes this holder
// ("update --kernel …"). When another process holds the lock, the error
// names it.
func Acquire(path, what string) (*Lock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening the lock %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		holder, _ := io.ReadAll(io.LimitReader(f, 512))
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another liveupdate is running (%s holds %s): wait for it to finish; the lock goes with its process",
				strings.TrimSpace(string(holder)), path)
		}
		return nil, fmt.Errorf("locking %s: %w", path, err)
	}
	f.Truncate(0)
	fmt.Fprintf(f, "pid %d, %q, since %s\n", os.Getpid(), what, time.Now().Format(time.RFC3339))
	f.Sync()
	return &Lock{f: f}, nil
}

// Release gives the lock up. The file stays (removing it would race with
// a process that has it open and is about to lock it).
func (l *Lock) Release() {
	if l == nil || l.f == nil {
		return
	}
	l.f.Truncate(0)
	unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
	l.f.Close()
	l.f = nil
}
