package qemutests

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// luoKernel returns the directory of the LUO test kernel
// (scripts/luo-kernel.sh: Debian's linux-source-7.3 with KHO, LUO and memfd
// preservation; make setup builds it once per machine).
func luoKernel(t testing.TB) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(repoRoot, "scripts/luo-kernel.sh"))
	cmd.Dir = repoRoot
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("scripts/luo-kernel.sh: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// luoProbeInitrds builds luoprobe's two initramfs: the second boot's
// (/init only) and the first's (/init, the kernel to kexec, the second's).
func luoProbeInitrds(t testing.TB, kernel string) string {
	t.Helper()
	dir := t.TempDir()
	probe := filepath.Join(dir, "luoprobe")
	build := exec.Command("go", "build", "-o", probe, "./qemu-tests/luoprobe")
	build.Dir, build.Env = repoRoot, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building luoprobe: %v\n%s", err, out)
	}
	second, first := filepath.Join(dir, "stage2.cpio.gz"), filepath.Join(dir, "stage1.cpio.gz")
	for _, args := range [][]string{
		{"-o", second, "-init", probe},
		{"-o", first, "-init", probe, "-file", "kernel=" + kernel, "-file", "stage2.cpio.gz=" + second},
	} {
		if out, err := exec.Command(filepath.Join(binDir, "mkinitrd"), args...).CombinedOutput(); err != nil {
			t.Fatalf("mkinitrd %v: %v\n%s", args, err, out)
		}
	}
	return first
}

// runLUOProbe boots the LUO kernel with luoprobe as /init: a memfd of mib
// MiB preserved, kexec into the same kernel, retrieved and checked there.
// It returns the console.
func runLUOProbe(t testing.TB, kdir, initrd string, mib int, cmdline string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	console := filepath.Join(t.TempDir(), "console.log")
	cmd := exec.CommandContext(ctx, qemuBinary, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1G",
		"-nographic", "-nodefaults", "-no-reboot", "-serial", "file:"+console,
		"-kernel", filepath.Join(kdir, "bzImage"), "-initrd", initrd,
		"-append", "console=ttyS0 "+cmdline+" luoprobe.mib="+strconv.Itoa(mib))
	if out, err := cmd.CombinedOutput(); err != nil {
		b, _ := os.ReadFile(console)
		t.Fatalf("the LUO probe VM: %v %s\nconsole:\n%s", err, out, tail(string(b), 40))
	}
	b, _ := os.ReadFile(console)
	return string(b)
}

// TestLUOKexec proves pkg/luo on the real kernel across a real kexec: a
// memfd (half of it holes) preserved in a session, its resize refused, the
// same token refused twice; in the kexec'd kernel the session found by
// name, the memfd by token, every word as written, a token never
// preserved refused, the session finished. Without liveupdate=on the probe must stop
// at Open with the reason.
func TestLUOKexec(t *testing.T) {
	kdir := luoKernel(t)
	initrd := luoProbeInitrds(t, filepath.Join(kdir, "bzImage"))
	t.Run("Kept", func(t *testing.T) {
		out := runLUOProbe(t, kdir, initrd, 64, "kho=on liveupdate=on")
		for _, want := range []string{"LUOPROBE preserved 64 MiB", "LUOPROBE resize refused: operation not permitted", "LUOPROBE kexec", "LUOPROBE unknown token refused", "LUOPROBE OK: 64 MiB intact"} {
			if !strings.Contains(out, want) {
				t.Errorf("the console lacks %q", want)
			}
		}
		if strings.Contains(out, "LUOPROBE FAIL") || t.Failed() {
			t.Fatalf("console:\n%s", tail(out, 60))
		}
		for _, l := range regexp.MustCompile(`LUOPROBE (preserved|OK).*`).FindAllString(out, -1) {
			t.Log(l)
		}
	})
	t.Run("NoLiveupdateOn", func(t *testing.T) {
		out := runLUOProbe(t, kdir, initrd, 8, "")
		if !strings.Contains(out, "LUOPROBE FAIL: /dev/liveupdate does not exist") || !strings.Contains(out, "kho=on liveupdate=on") {
			t.Fatalf("without kho=on liveupdate=on the probe did not stop at Open with the reason:\n%s", tail(out, 30))
		}
	})
}
