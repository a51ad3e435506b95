package kernelconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFragmentParses(t *testing.T) {
	for _, f := range []struct {
		name, text string
		min        int
	}{{"host.config", hostConfig, 20}, {"pmem.config", pmemConfig, 6}, {"luo.config", luoConfig, 4}} {
		reqs, err := parseFragment(strings.NewReader(f.text))
		if err != nil {
			t.Fatalf("%s: %v", f.name, err)
		}
		if len(reqs) < f.min {
			t.Fatalf("%s: only %d requirements", f.name, len(reqs))
		}
	}
}

func TestCheck(t *testing.T) {
	cfg, err := ParseConfig(strings.NewReader("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	reqs := []Requirement{{"CONFIG_A", "m"}, {"CONFIG_B", "y"}, {"CONFIG_C", "m"}, {"CONFIG_E", "n"}, {"CONFIG_A", "n"}}
	var got []string
	for _, p := range Check(cfg, reqs) {
		got = append(got, p.String())
	}
	want := []string{
		"CONFIG_A: is y, needs to be not set",
		"CONFIG_B: is m, needs to be built in (=y)",
		"CONFIG_C: is not set, needs to be built in or a module (=y or =m)",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if _, err := ParseConfig(strings.NewReader("hello\n")); err == nil {
		t.Error("non-config accepted")
	}
}

// TestDebianKernels checks the set-up's Debian 6.1 and 6.12 configs: both
// must pass, and removing an option must be reported.
func TestDebianKernels(t *testing.T) {
	configs, _ := filepath.Glob("../.cache/kernels/*/boot/config-*")
	if len(configs) < 2 {
		t.Fatal("Debian kernel configs missing: run scripts/setup.sh")
	}
	for _, c := range configs {
		cfg := readConfig(t, c)
		if ps := Check(cfg, Requirements()); len(ps) != 0 {
			t.Errorf("%s: %v", filepath.Base(c), ps)
		}
		delete(cfg, "CONFIG_FS_DAX")
		ps := Check(cfg, Requirements())
		if len(ps) != 1 || ps[0].Option != "CONFIG_FS_DAX" {
			t.Errorf("%s without FS_DAX: %v", filepath.Base(c), ps)
		}
	}
}

// TestReadiness: each backend is judged on its own; a host needs the
// host's options and one backend's.
func TestReadiness(t *testing.T) {
	all := map[string]string{}
	for _, r := range append(append(Host(), PMEM()...), LUO()...) {
		all[r.Option] = "y"
	}
	without := func(opts ...string) map[string]string {
		c := map[string]string{}
		for k, v := range all {
			c[k] = v
		}
		for _, o := range opts {
			c[o] = "n"
		}
		return c
	}
	for _, c := range []struct {
		name            string
		cfg             map[string]string
		host, pmem, luo int
		ready           bool
	}{
		{"everything", all, 0, 0, 0, true},
		{"PMEM only", without("CONFIG_KEXEC_HANDOVER", "CONFIG_LIVEUPDATE", "CONFIG_LIVEUPDATE_MEMFD"), 0, 0, 3, true},
		{"LUO only", without("CONFIG_FS_DAX", "CONFIG_X86_PMEM_LEGACY"), 0, 2, 0, true},
		{"neither", without("CONFIG_FS_DAX", "CONFIG_LIVEUPDATE"), 0, 1, 1, false},
		{"no kexec_file_load", without("CONFIG_KEXEC_FILE"), 1, 0, 1, false},
		{"no cgroups", without("CONFIG_CGROUPS"), 1, 0, 0, false},
	} {
		r := Readiness(c.cfg)
		if len(r.Host) != c.host || len(r.PMEM) != c.pmem || len(r.LUO) != c.luo || r.Ready() != c.ready {
			t.Errorf("%s: host %v, PMEM %v, LUO %v, ready %v; want %d, %d, %d problems, ready %v",
				c.name, r.Host, r.PMEM, r.LUO, r.Ready(), c.host, c.pmem, c.luo, c.ready)
		}
	}
}

// TestLUOKernel: the LUO test kernel's config (scripts/luo-kernel.sh),
// when built on this machine, is ready for both backends.
func TestLUOKernel(t *testing.T) {
	configs, _ := filepath.Glob("../.cache/luo-kernel/out-*/config")
	if len(configs) == 0 {
		t.Skip("no LUO test kernel built here (scripts/luo-kernel.sh; qemu-tests' TestLUOKexec builds it)")
	}
	for _, c := range configs {
		cfg := readConfig(t, c)
		// It leaves KVM out: the tests run it under TCG.
		r := Readiness(cfg)
		if len(r.PMEM)+len(r.LUO) != 0 || len(r.Host) != 1 || r.Host[0].Option != "CONFIG_KVM" {
			t.Errorf("%s: host %v (want only CONFIG_KVM, left out), PMEM %v, LUO %v", c, r.Host, r.PMEM, r.LUO)
		}
	}
}

// readConfig parses the kernel config at path.
func readConfig(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cfg, err := ParseConfig(f)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return cfg
}
