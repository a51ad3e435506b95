package kernelconfig

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestFragmentParses(t *testing.T) {
	reqs, err := parseFragment(strings.NewReader(hostConfig))
	if err != nil {
		t.Fatal(err)
	}
	if len(reqs) < 20 {
		t.Fatalf("only %d requirements", len(reqs))
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
		f, err := os.Open(c)
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := ParseConfig(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
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
