package qemutests

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/pid1"
)

// luoHostConfig is the nested host's first boot on the LUO kernel: the
// inner guest of nestedHostConfig with its RAM in a memfd PID 1 makes and
// passes as fd 3 (memory-backend-file,mem-path=/proc/self/fd/3,share=on),
// and its serial log on the root filesystem: the host has no PMEM.
func luoHostConfig() pid1.HostConfig {
	hc := nestedHostConfig()
	g := &hc.Guests[0]
	i := slices.Index(g.Argv, "memory-backend-file,id=ram0,size=160M,mem-path=/mnt/pmem/inner.ram,share=on")
	g.Argv[i] = "memory-backend-file,id=ram0,size=160M,mem-path=/proc/self/fd/3,share=on"
	g.MemfdMiB = []int{160}
	i = slices.Index(g.Argv, "file,id=ser0,path=/mnt/pmem/inner-serial.log,append=on")
	g.Argv[i] = "file,id=ser0,path=" + luoSerialLog + ",append=on"
	return hc
}

// luoSerialLog is the inner guest's serial log on the LUO host (QEMU's
// view: the host root).
const luoSerialLog = "/var/log/inner-serial.log"

// TestLUOUpdate (tier 4, the LUO backend): a nested host on the LUO test
// kernel (7.3.4-lu, booted with kho=on liveupdate=on) with no PMEM at all —
// no memmap=, the state directory on its root filesystem (the default
// /var/lib/liveupdate) — whose guest's RAM is a memfd. A failure just
// before the kexec: every undo runs, the guest resumes on its old QEMU. The updater killed just before its kexec: recover resumes the
// guest on this kernel, its RAM held by its old QEMU all along. Then a live
// update into the same kernel: the memfd is preserved in a LUO session,
// PID 1 of the new kernel retrieves it and gives it to the new QEMU, and
// finishes the session once the guest runs — heartbeat, same boot id, RAM
// checksum, disk records, the TCP session.
func TestLUOUpdate(t *testing.T) {
	kdir := luoKernel(t)
	kver := strings.TrimSpace(readFile(t, kdir+"/version"))
	h := bootNestedHostOn(t, nestedBoot{config: luoHostConfig(),
		kernel: kdir + "/bzImage", initrd: repoRoot + "/.cache/hostroot/initramfs-" + kver + ".img",
		rootEnv: []string{"LUO_KERNEL=" + kdir}, cmdline: []string{"kho=on", "liveupdate=on"}, noPMEM: true})
	t.Cleanup(func() {
		if t.Failed() {
			h.use(t)
			h.conn = nil
			h.run("tail -n 25 "+h.innerLog(), 30*time.Second)
		}
	})
	h.waitFor(`liveupdate: READY in`, 3*time.Minute)
	h.waitFor(`liveupdate: started guest inner pid \d+`, time.Minute)
	state := innerAddr + ":7008"
	first, _ := waitGuestState(t, nestNS, state, 8*time.Minute)
	t.Logf("inner guest up on %s: %+v", kver, first)
	acks := h.waitAcksPast(t, 0, 5*time.Minute)
	echo := watchEcho(t, nestNS, innerAddr+":7007")
	defer close(echo.stop)

	const lu = "liveupdate %s --root /newroot" // the state directory: the default, on the root
	kargs := fmt.Sprintf(" --kernel /boot/vmlinuz-%s --initrd /boot/initramfs-%s.img", kver, kver)

	t.Run("Plan", func(t *testing.T) {
		defer h.use(t)()
		out, code := h.run(fmt.Sprintf(lu, "update")+" --dry-run"+kargs, 2*time.Minute)
		if code != 0 || !strings.Contains(out, "RAM: ram0 memfd-fd") || !regexp.MustCompile(`state dir: +/var/lib/liveupdate \(on the filesystem of /\)`).MatchString(out) ||
			!strings.Contains(out, "lu.manifest=/var/lib/liveupdate/manifest.json") || strings.Contains(out, "lu.pmem") || strings.Contains(out, "memmap=") {
			t.Errorf("update --dry-run: exit %d, want 0 with the RAM shown as memfd-fd, the state on the root filesystem, lu.manifest there and no PMEM", code)
		}
		// A guest whose RAM is a file cannot have its state off PMEM.
		h.run("chroot /newroot /usr/bin/qemu-system-x86_64 -name file -S -accel tcg -m 32 -machine pc,memory-backend=f0 "+
			"-object memory-backend-file,id=f0,size=32M,mem-path=/tmp/file.ram,share=on -nodefaults -display none "+
			"-qmp unix:/run/file.qmp,server=on,wait=off -daemonize -pidfile /run/file.pid", time.Minute)
		out, code = h.run(fmt.Sprintf(lu, "update")+" --dry-run"+kargs, 2*time.Minute)
		h.run("kill $(cat /run/file.pid); rm -f /newroot/tmp/file.ram", time.Minute)
		if code == 0 || !strings.Contains(out, "not on PMEM mounted with dax, and file keep RAM in files") {
			t.Errorf("update --dry-run with a file-RAM guest beside: exit %d, want the state directory off PMEM refused for it", code)
		}
	})
	// A failure just before the kexec: the updater's undos run — the state
	// filesystem writable again, the guest resumed on its old QEMU (which
	// held the RAM all along), the session closed (the next subtest opens
	// one: /dev/liveupdate is free again), the kernel unloaded.
	t.Run("FailBeforeKexec", func(t *testing.T) {
		defer h.use(t)()
		before, _ := waitGuestState(t, nestNS, state, time.Minute)
		out, code := h.run("LIVEUPDATE_FAULT=state-ro=fail /newroot/usr/sbin/liveupdate-fault update --root /newroot"+kargs, 3*time.Minute)
		if code == 0 || !strings.Contains(out, "update abandoned, guests restored on the running kernel") {
			t.Fatalf("update with a failure at state-ro: exit %d, want the update abandoned and the guest restored", code)
		}
		acks = h.waitAcksPast(t, acks, 4*time.Minute) // it runs again: its disk writer goes on
		after, _ := waitGuestState(t, nestNS, state, 4*time.Minute)
		if after.boot != first.boot || after.seq <= before.seq || after.mem != "ok" {
			t.Fatalf("guest after the failed update: %+v, before %+v", after, before)
		}
		if out, _ := h.run("cat /sys/kernel/kexec_loaded; touch /newroot/var/lib/liveupdate/writable && echo writable", time.Minute); !strings.HasPrefix(out, "0") || !strings.Contains(out, "\nwritable") {
			t.Errorf("after the failed update: the new kernel still loaded, or the root not writable: %s", out)
		}
		if _, err := echo.takeGap(); err != nil {
			t.Errorf("the TCP connection broke: %v", err)
		}
	})
	// The updater dies (SIGKILL) just before its kexec, its LUO session
	// with it: the guest's old QEMU, kept paused, still holds the RAM, and
	// recover continues it there.
	t.Run("CrashBeforeKexec", func(t *testing.T) {
		defer h.use(t)()
		before, _ := waitGuestState(t, nestNS, state, time.Minute)
		out, code := h.run("LIVEUPDATE_FAULT=state-ro=kill /newroot/usr/sbin/liveupdate-fault update --root /newroot"+kargs, 3*time.Minute)
		if code == 0 || !strings.Contains(out, "FAULT INJECTED: kill at state-ro") {
			t.Fatalf("the injected crash did not happen: exit %d", code)
		}
		out, code = h.run(fmt.Sprintf(lu, "recover")+" --clock-timeout 20s", 3*time.Minute)
		if code != 0 || !regexp.MustCompile(`inner +resumed`).MatchString(out) {
			t.Fatalf("recover after the crash: exit %d, want the inner guest resumed on its old QEMU\n%s", code, out)
		}
		acks = h.waitAcksPast(t, acks, 4*time.Minute)
		after, _ := waitGuestState(t, nestNS, state, 4*time.Minute)
		if after.boot != first.boot || after.seq <= before.seq || after.mem != "ok" {
			t.Fatalf("guest after recover: %+v, before %+v", after, before)
		}
		if out, _ := h.run("cat /sys/kernel/kexec_loaded", time.Minute); !strings.HasPrefix(out, "0") {
			t.Errorf("the new kernel is still loaded after recover: %s", out)
		}
		if _, err := echo.takeGap(); err != nil {
			t.Errorf("the TCP connection broke: %v", err)
		}
	})
	if t.Failed() {
		return
	}
	t.Run("Update", func(t *testing.T) {
		defer h.use(t)()
		h.waitAgent(t, "inner", 8*time.Minute) // for PID 1 to put its clock right after the kexec
		echo.takeGap()
		before, _ := waitGuestState(t, nestNS, state, 4*time.Minute)
		start := time.Now()
		h.sendNoAnswer(fmt.Sprintf(lu, "update")+" --keep-control"+kargs, "the update returned instead of rebooting")
		m := h.waitForNth(fmt.Sprintf(`(?s)Linux version %s .*?liveupdate: READY in ([0-9.]+)ms after PID 1 start[^\n]*guests running: (\d+)`, regexp.QuoteMeta(kver)), 2, 5*time.Minute)
		if m[2] != "1" {
			t.Fatalf("%s guests running after the kexec, want 1", m[2])
		}
		h.waitFor(`LUO session finished: every guest with memfd RAM runs`, time.Minute)
		clock := h.waitClockFix(1)
		after, lag := waitGuestState(t, nestNS, state, 4*time.Minute)
		acks = h.waitAcksPast(t, acks, 4*time.Minute)
		if after.boot != first.boot || after.seq <= before.seq || after.mem != "ok" {
			t.Fatalf("inner guest after the update: %+v, before %+v (first %+v)", after, before, first)
		}
		checkClock(t, clock, lag)
		gap, split, _ := h.endUpdate(t, echo, kver)
		t.Logf("LUO update %s → %s: TCP echo longest gap %s; wall time %s; PID 1 start→ready %s ms; disk ACKs past %d\n%s",
			kver, kver, gap.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), m[1], acks, split)
	})
	if t.Failed() {
		return
	}
	// The guest must be ready for the next update as for the first: its
	// RAM is now the memfd LUO handed back, which has no name ("/ (deleted)"
	// where memfd_create's reads "/memfd:…") — once refused as "not a memfd".
	t.Run("PlanAfterUpdate", func(t *testing.T) {
		defer h.use(t)()
		out, code := h.run(fmt.Sprintf(lu, "update")+" --dry-run"+kargs, 2*time.Minute)
		if code != 0 || !strings.Contains(out, "RAM: ram0 memfd-fd") {
			t.Errorf("update --dry-run after the update: exit %d, want 0 with the RAM shown as memfd-fd", code)
		}
	})
}
