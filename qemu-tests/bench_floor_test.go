package qemutests

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/liveupdate/liveupdate/pkg/kmod"
)

// BenchmarkModulesFloor measures the least PID 1 can spend on modules in
// an update (P5'f): the host booted with an initramfs that lists only the
// groups of initramfs/modules.txt that hold ext4 and the PMEM driver —
// what any update needs before a guest's RAM file can be opened — and no
// guests, disks or network. The kernel does that work (a signature check
// and the linking of each module; ext4's alone on one CPU), so its time is
// a floor under the update's own share of the blackout (P5'), set by the
// kernel package's modules, not by PID 1. Each kernel of the nested
// update, b.N boots each; one BENCH line per kernel.
func BenchmarkModulesFloor(b *testing.B) {
	list := floorModuleList(b)
	for _, k := range []string{"old", "new"} {
		dir := filepath.Join(repoRoot, ".cache/kernels", k)
		kver, err := os.ReadFile(filepath.Join(dir, "version"))
		if err != nil {
			b.Fatalf("the %s kernel (make setup fetches it): %v", k, err)
		}
		v := strings.TrimSpace(string(kver))
		initrd := filepath.Join(b.TempDir(), "floor.cpio.gz")
		cmd := exec.Command(filepath.Join(repoRoot, "initramfs/build.sh"), v, dir, initrd)
		cmd.Dir, cmd.Env = repoRoot, append(os.Environ(), "MODULE_LIST="+list)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("initramfs/build.sh with the floor's list: %v\n%s", err, out)
		}
		var ms []float64
		for range b.N {
			h := bootHost(b, hostOpts{kernel: filepath.Join(dir, "boot/vmlinuz-"+v), initrd: initrd, memmap: true,
				cmdline: []string{"lu.pmem=/dev/pmem0", "lu.format_pmem=1"}})
			m := h.waitFor(`phase done" phase=modules took=(\S+)`, 3*time.Minute)
			h.waitFor(`liveupdate: READY`, 3*time.Minute) // the PMEM mounted: the modules did their job
			took, err := time.ParseDuration(m[1])         // slog writes a time.Duration
			if err != nil {
				b.Fatalf("the modules phase's time %q: %v", m[1], err)
			}
			ms = append(ms, float64(took.Microseconds())/1000)
			h.cmd.Process.Kill()
			h.cmd.Wait()
		}
		fmt.Fprintf(os.Stderr, "BENCH id=P5f name=%s/%s kernel=%s samples=%d median_ms=%.1f min_ms=%.1f max_ms=%.1f raw=%s\n",
			b.Name(), k, v, len(ms), median(ms), slices.Min(ms), slices.Max(ms), strings.Trim(strings.Join(strings.Fields(fmt.Sprint(ms)), ","), "[]"))
	}
}

// floorModuleList writes the groups of initramfs/modules.txt that load
// ext4 and the PMEM driver (nd_pmem) to a list file of their own.
func floorModuleList(b *testing.B) string {
	groups, err := kmod.ReadList(filepath.Join(repoRoot, "initramfs/modules.txt"))
	if err != nil {
		b.Fatal(err)
	}
	var text strings.Builder
	found := map[string]bool{}
	for _, g := range groups {
		for _, want := range []string{"ext4", "nd_pmem"} {
			if slices.Contains(g.Names, want) && g.Phase == "" {
				found[want] = true
				fmt.Fprintf(&text, "%s\n\n", strings.Join(g.Names, "\n"))
			}
		}
	}
	if len(found) != 2 {
		b.Fatalf("initramfs/modules.txt has no first-needed group with ext4 and one with nd_pmem: %v", found)
	}
	p := filepath.Join(b.TempDir(), "floor-modules.txt")
	if err := os.WriteFile(p, []byte(text.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	return p
}
