package qemutests

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
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
		for _, l := range regexp.MustCompile(`LUOPROBE (preserved|OK|retrieved memfd).*`).FindAllString(out, -1) {
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

// BenchmarkLUOPreserve: LUO's preserve (in the old kernel, before the
// kexec: pinning every page, filling holes) and retrieve (in the new one)
// against the memfd's size, half of it holes as guest RAM has. One VM boot
// pair per run and size; b.N runs. Reported as BENCH lines (P11).
func BenchmarkLUOPreserve(b *testing.B) {
	kdir := luoKernel(b)
	initrd := luoProbeInitrds(b, filepath.Join(kdir, "bzImage"))
	re := regexp.MustCompile(`LUOPROBE preserved (\d+) MiB in ([0-9.]+) ms[\s\S]*LUOPROBE OK: .* retrieved in ([0-9.]+) ms`)
	for _, mib := range []int{64, 256, 768} {
		var pres, retr []float64
		for i := 0; i < b.N; i++ {
			out := runLUOProbe(b, kdir, initrd, mib, "kho=on liveupdate=on")
			m := re.FindStringSubmatch(out)
			if m == nil {
				b.Fatalf("%d MiB: the probe did not finish:\n%s", mib, tail(out, 30))
			}
			p, _ := strconv.ParseFloat(m[2], 64)
			r, _ := strconv.ParseFloat(m[3], 64)
			pres, retr = append(pres, p), append(retr, r)
		}
		fmt.Fprintf(os.Stderr, "BENCH id=P11 name=LUOPreserve%dMiB ram_mib=%d samples=%d preserve_median_ms=%.1f preserve_min_ms=%.1f preserve_max_ms=%.1f retrieve_median_ms=%.1f retrieve_min_ms=%.1f retrieve_max_ms=%.1f\n",
			mib, mib, len(pres), median(pres), slices.Min(pres), slices.Max(pres), median(retr), slices.Min(retr), slices.Max(retr))
	}
}
