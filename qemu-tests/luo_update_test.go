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
// nothing of it on PMEM but its state and serial log.
func luoHostConfig() pid1.HostConfig {
	hc := nestedHostConfig()
	g := &hc.Guests[0]
	i := slices.Index(g.Argv, "memory-backend-file,id=ram0,size=160M,mem-path=/mnt/pmem/inner.ram,share=on")
	g.Argv[i] = "memory-backend-file,id=ram0,size=160M,mem-path=/proc/self/fd/3,share=on"
	g.MemfdMiB = []int{160}
	return hc
}

// TestLUOUpdate (tier 4, the LUO backend): a nested host on the LUO test
// kernel (7.3.4-lu, booted with kho=on liveupdate=on) whose guest's RAM is a
// memfd. The updater killed just before its kexec: recover resumes the
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
		rootEnv: []string{"LUO_KERNEL=" + kdir}, cmdline: []string{"kho=on", "liveupdate=on"}})
	t.Cleanup(func() {
		if t.Failed() {
			h.use(t)
			h.conn = nil
			h.run("tail -n 25 /mnt/pmem/inner-serial.log", 30*time.Second)
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

	const lu = "liveupdate %s --root /newroot --state-dir /mnt/pmem/liveupdate"
	kargs := fmt.Sprintf(" --kernel /boot/vmlinuz-%s --initrd /boot/initramfs-%s.img", kver, kver)

	t.Run("Plan", func(t *testing.T) {
		defer h.use(t)()
		out, code := h.run(fmt.Sprintf(lu, "update")+" --dry-run"+kargs, 2*time.Minute)
		if code != 0 || !strings.Contains(out, "RAM: ram0 memfd-fd") {
			t.Errorf("update --dry-run: exit %d, want 0 with the RAM shown as memfd-fd", code)
		}
	})
	// The updater dies (SIGKILL) just before its kexec, its LUO session
	// with it: the guest's old QEMU, kept paused, still holds the RAM, and
	// recover continues it there.
	t.Run("CrashBeforeKexec", func(t *testing.T) {
		defer h.use(t)()
		before, _ := waitGuestState(t, nestNS, state, time.Minute)
		out, code := h.run("LIVEUPDATE_FAULT=pmem-ro=kill /newroot/usr/sbin/liveupdate-fault update --root /newroot --state-dir /mnt/pmem/liveupdate"+kargs, 3*time.Minute)
		if code == 0 || !strings.Contains(out, "FAULT INJECTED: kill at pmem-ro") {
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
		echo.takeGap()
		before, _ := waitGuestState(t, nestNS, state, 4*time.Minute)
		start := time.Now()
		h.sendNoAnswer(fmt.Sprintf(lu, "update")+" --keep-control"+kargs, "the update returned instead of rebooting")
		m := h.waitForNth(fmt.Sprintf(`(?s)Linux version %s .*?liveupdate: READY in ([0-9.]+)ms after PID 1 start[^\n]*guests running: (\d+)`, regexp.QuoteMeta(kver)), 2, 5*time.Minute)
		if m[2] != "1" {
			t.Fatalf("%s guests running after the kexec, want 1", m[2])
		}
		h.waitFor(`LUO session finished: every guest with memfd RAM runs`, time.Minute)
		after, _ := waitGuestState(t, nestNS, state, 4*time.Minute)
		acks = h.waitAcksPast(t, acks, 4*time.Minute)
		if after.boot != first.boot || after.seq <= before.seq || after.mem != "ok" {
			t.Fatalf("inner guest after the update: %+v, before %+v (first %+v)", after, before, first)
		}
		gap, err := echo.takeGap()
		if err != nil {
			t.Fatalf("the TCP connection opened before the update broke: %v", err)
		}
		h.conn.Close()
		h.conn = nil
		time.Sleep(100 * time.Millisecond)
		split, _ := h.split()
		t.Logf("LUO update %s → %s: TCP echo longest gap %s; wall time %s; PID 1 start→ready %s ms; disk ACKs past %d\n%s",
			kver, kver, gap.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), m[1], acks, split)
	})
}
