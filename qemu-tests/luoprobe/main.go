// Command luoprobe is the /init of TestLUOKexec's VM: it proves pkg/luo on
// a real kernel across a real kexec, the way the LUO backend keeps guest RAM.
//
// First boot (no luoprobe.stage=2 on the command line): a memfd of
// luoprobe.mib MiB (default 64) filled with a pattern, preserved under token
// 42 in session "luoprobe", its resize refused from then on; then
// kexec_file_load of /kernel with /stage2.cpio.gz and this command line plus
// luoprobe.stage=2, and reboot(KEXEC) with the session still open.
// Second boot: the session retrieved, the memfd retrieved by its token, every
// word checked, the session finished; then power off.
//
// Each step prints one "LUOPROBE …" line on the console; the test reads them.
package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/luo"
)

const (
	session = "luoprobe"
	token   = 42
)

func main() {
	os.MkdirAll("/dev", 0o755)
	os.MkdirAll("/proc", 0o755)
	unix.Mount("devtmpfs", "/dev", "devtmpfs", 0, "")
	unix.Mount("proc", "/proc", "proc", 0, "")
	b, _ := os.ReadFile("/proc/cmdline")
	cmdline := strings.TrimSpace(string(b))
	mib := 64
	for _, w := range strings.Fields(cmdline) {
		if v, ok := strings.CutPrefix(w, "luoprobe.mib="); ok {
			mib, _ = strconv.Atoi(v)
		}
	}
	var err error
	if strings.Contains(cmdline, "luoprobe.stage=2") {
		err = second(mib)
	} else {
		err = first(cmdline, mib)
	}
	if err != nil {
		fmt.Printf("LUOPROBE FAIL: %v\n", err)
	}
	unix.Sync()
	unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {} // PID 1 does not exit
}

// word is the pattern: every 8-byte word names its own index.
func word(i int) uint64 { return uint64(i)*0x9E3779B97F4A7C15 ^ 0x5555 }

func first(cmdline string, mib int) error {
	o, err := luo.Open()
	if err != nil {
		return err
	}
	s, err := o.CreateSession(session)
	if err != nil {
		return err
	}
	size := mib << 20
	fd, err := unix.MemfdCreate("guest-ram", unix.MFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		return fmt.Errorf("ftruncate: %w", err)
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	// Every other 64 KiB block left a hole: preservation must fill it.
	for i := 0; i < size/8; i++ {
		if (i*8/65536)%2 == 0 {
			binary.LittleEndian.PutUint64(m[i*8:], word(i))
		}
	}
	unix.Munmap(m)
	start := time.Now()
	if err := s.Preserve(fd, token); err != nil {
		return err
	}
	fmt.Printf("LUOPROBE preserved %d MiB in %.1f ms\n", mib, float64(time.Since(start).Microseconds())/1000)
	if err := unix.Ftruncate(fd, int64(size)*2); err == nil {
		return fmt.Errorf("a preserved memfd was resized: LUO must freeze its size")
	} else {
		fmt.Printf("LUOPROBE resize refused: %v\n", err)
	}
	if err := s.Preserve(fd, token); err == nil {
		return fmt.Errorf("the same token was accepted twice")
	}
	k, err := os.Open("/kernel")
	if err != nil {
		return err
	}
	i, err := os.Open("/stage2.cpio.gz")
	if err != nil {
		return err
	}
	if err := unix.KexecFileLoad(int(k.Fd()), int(i.Fd()), cmdline+" luoprobe.stage=2", 0); err != nil {
		return fmt.Errorf("kexec_file_load: %w", err)
	}
	fmt.Println("LUOPROBE kexec")
	// The session fd is still open here: that is what keeps it.
	return fmt.Errorf("reboot(KEXEC): %w", unix.Reboot(unix.LINUX_REBOOT_CMD_KEXEC))
}

func second(mib int) error {
	start := time.Now()
	o, err := luo.Open()
	if err != nil {
		return err
	}
	s, err := o.RetrieveSession(session)
	if err != nil {
		return err
	}
	if n, err := s.KernelName(); err != nil || n != session {
		return fmt.Errorf("the retrieved session's name is %q (%v), want %q", n, err, session)
	}
	f, err := s.Retrieve(token)
	if err != nil {
		return err
	}
	took := time.Since(start)
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	// What the retrieved memfd looks like to whoever inspects it later
	// (plan, of the QEMU given it): its link, and its link count.
	link, _ := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	fmt.Printf("LUOPROBE retrieved memfd: link %q, %d links\n", link, st.Nlink)
	size := mib << 20
	if st.Size != int64(size) {
		return fmt.Errorf("the retrieved memfd has %d bytes, want %d", st.Size, size)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap of the retrieved memfd: %w", err)
	}
	bad := 0
	for i := 0; i < size/8; i++ {
		want := uint64(0)
		if (i*8/65536)%2 == 0 {
			want = word(i)
		}
		if binary.LittleEndian.Uint64(m[i*8:]) != want {
			bad++
		}
	}
	if bad != 0 {
		return fmt.Errorf("%d of %d words of the retrieved memfd differ", bad, size/8)
	}
	if _, err := s.Retrieve(token + 1); err == nil {
		return fmt.Errorf("a token never preserved was retrieved")
	} else {
		fmt.Printf("LUOPROBE unknown token refused: %v\n", err)
	}
	if err := s.Finish(); err != nil {
		return err
	}
	fmt.Printf("LUOPROBE OK: %d MiB intact (%d words), retrieved in %.1f ms, session finished\n", mib, size/8, float64(took.Microseconds())/1000)
	return nil
}
