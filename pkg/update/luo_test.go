package update

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestLUOProblems(t *testing.T) {
	dev := filepath.Join(t.TempDir(), "liveupdate") // absent
	present := "/dev/null"                          // any file that is there
	ready := map[string]string{"CONFIG_KEXEC_FILE": "y", "CONFIG_KEXEC_HANDOVER": "y", "CONFIG_LIVEUPDATE": "y",
		"CONFIG_LIVEUPDATE_MEMFD": "y", "CONFIG_MEMFD_CREATE": "y", "CONFIG_SHMEM": "y"}
	noMemfd := map[string]string{"CONFIG_KEXEC_FILE": "y", "CONFIG_KEXEC_HANDOVER": "y", "CONFIG_LIVEUPDATE": "y",
		"CONFIG_MEMFD_CREATE": "y", "CONFIG_SHMEM": "y"}
	on := "console=ttyS0 kho=on liveupdate=on"
	for _, c := range []struct {
		name    string
		guests  []string
		device  string
		cfg     map[string]string
		cmdline string
		want    []string // each in some problem; none: no problem
	}{
		{"no memfd guest asks nothing", nil, dev, nil, "", nil},
		{"ready", []string{"vm1"}, present, ready, on, nil},
		{"kstrtobool's forms", []string{"vm1"}, present, ready, "kho=1 liveupdate=y", nil},
		{"no device here", []string{"vm1"}, dev, ready, on, []string{"the running kernel has no " + dev}},
		{"new kernel's config not found", []string{"vm1", "vm2"}, present, nil, on, []string{"guests vm1, vm2", "config is not beside it"}},
		{"new kernel without memfd preservation", []string{"vm1"}, present, noMemfd, on, []string{"CONFIG_LIVEUPDATE_MEMFD"}},
		{"no liveupdate=on", []string{"vm1"}, present, ready, "kho=on", []string{"lacks liveupdate=on"}},
		{"turned off by a later word", []string{"vm1"}, present, ready, on + " kho=off", []string{"lacks kho=on"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			probs := luoProblems(c.guests, c.device, c.cfg, "/boot/config-7.3.4-lu", c.cmdline)
			if len(c.want) == 0 && len(probs) > 0 {
				t.Fatalf("want no problem, got %q", probs)
			}
			all := strings.Join(probs, "\n")
			for _, w := range c.want {
				if !strings.Contains(all, w) {
					t.Errorf("problems %q lack %q", probs, w)
				}
			}
		})
	}
}
