package qemutests

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestAnsibleGateStopsTheWave runs the project's playbook (ansible/) with
// ansible-core against two hosts that are this machine (a local
// connection each), in waves of one: the first host's gate — liveupdate's
// own `update --dry-run --json`, the real binary on the real QEMUs here —
// refuses a guest whose RAM is private, so that host fails naming the
// guest and the reason, its guest is untouched, and the play stops before
// the second wave: the second host is never touched.
// (The whole update driven by this playbook is the nested Debian host's.)
func TestAnsibleGateStopsTheWave(t *testing.T) {
	if _, err := exec.LookPath("ansible-playbook"); err != nil {
		t.Fatal("ansible-playbook is not installed (scripts/setup.sh installs ansible-core)")
	}
	g := bootAll(t, guestSpec{name: "wave-private", memory: []string{"-m", "128", "-machine", "pc,memory-backend=wram",
		"-object", "memory-backend-file,id=wram,size=128M,mem-path=/dev/shm/lu-test-wave.ram"}})[0]
	t.Cleanup(func() { os.Remove("/dev/shm/lu-test-wave.ram") })
	before, _ := g.lastBeat()
	pid := g.pid()

	dir := t.TempDir()
	inv := filepath.Join(dir, "inventory.ini")
	os.WriteFile(inv, []byte("[kvm_hosts]\nwave1-host ansible_connection=local\nwave2-host ansible_connection=local\n"), 0o644)
	kver := kernelVersion(t, "new")
	vmlinuz := filepath.Join(repoRoot, ".cache/kernels/new/boot/vmlinuz-"+kver)
	cmd := exec.Command("ansible-playbook", "-i", inv, filepath.Join(repoRoot, "ansible/playbook.yml"),
		"-e", "liveupdate_kernel_version=lu-test-"+kver, // not the running kernel: the role must not skip the host
		"-e", "liveupdate_kernel="+vmlinuz, "-e", "liveupdate_initrd="+guestInitrd,
		"-e", "liveupdate_bin="+filepath.Join(binDir, "liveupdate"), "-e", "liveupdate_state_dir="+filepath.Join(dir, "state"),
		"-e", `{"liveupdate_update_args": "--lock `+filepath.Join(binDir, "liveupdate.lock")+`"}`,
		"-e", "ansible_python_interpreter=/usr/bin/python3")
	cmd.Env = append(os.Environ(), "ANSIBLE_NOCOLOR=1", "ANSIBLE_LOCAL_TEMP="+filepath.Join(dir, "tmp"),
		"ANSIBLE_HOST_KEY_CHECKING=0", "ANSIBLE_RETRY_FILES_ENABLED=0")
	out, err := cmd.CombinedOutput()
	t.Logf("ansible-playbook:\n%s", out)
	if err == nil {
		t.Fatalf("the playbook succeeded with an unsafe guest on the first host")
	}
	s := string(out)
	for _, want := range []string{
		"liveupdate refuses to update wave1-host (exit 3)",
		`wave-private: memory backend \"wram\"`,
		"has share=off",
	} {
		if !strings.Contains(s, want) {
			t.Errorf("the playbook's output does not say %q", want)
		}
	}
	if strings.Contains(s, "TASK [liveupdate : Update the kernel") && regexp.MustCompile(`changed: \[wave1-host\]`).MatchString(s) {
		t.Errorf("the update ran on the refused host")
	}
	// The second wave never started: wave2-host ran no task.
	if strings.Contains(s, "[wave2-host]") {
		t.Errorf("the play went on to the second wave after the first host failed")
	}
	if m := regexp.MustCompile(`wave1-host\s+: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=1`).FindString(s); m == "" {
		t.Errorf("the recap does not show wave1-host failed once")
	}
	if g.pid() != pid {
		t.Errorf("the guest's QEMU changed (%d → %d) after a refused gate", pid, g.pid())
	}
	g.checkContinues(before)
	if ents, _ := os.ReadDir(filepath.Join(dir, "state")); len(ents) > 0 {
		t.Errorf("the gate left files in the state directory: %v", ents)
	}
}
