package qemuargv

import (
	"errors"
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// An option the table does not know swallows nothing and is named; QEMU
// 10's flags that the table once lacked no longer take the next option.
func TestUnknownOptions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		argv    []string
		vmName  string
		unknown []string
	}{
		{"known only", []string{"qemu", "-S", "-name", "vm1", "-m", "1G"}, "vm1", nil},
		{"unknown flag before -name", []string{"qemu", "-frobnicate", "-name", "vm1"}, "vm1", []string{"frobnicate"}},
		{"unknown with a value", []string{"qemu", "-frob", "x", "-frob", "y", "-name", "vm1"}, "vm1", []string{"frob"}},
		{"async-teardown (QEMU 8/9)", []string{"qemu", "-async-teardown", "-name", "vm1"}, "vm1", nil},
		{"perfmap, jitdump (QEMU 10)", []string{"qemu", "-perfmap", "-jitdump", "-name", "vm1"}, "vm1", nil},
		{"double dash", []string{"qemu", "--preconfig", "--name", "vm1"}, "vm1", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse(tc.argv)
			if err != nil {
				t.Fatal(err)
			}
			if got := c.Name(); got != tc.vmName {
				t.Errorf("Name = %q, want %q: an option swallowed -name", got, tc.vmName)
			}
			if got := c.UnknownOptions(); !reflect.DeepEqual(got, tc.unknown) {
				t.Errorf("UnknownOptions = %q, want %q", got, tc.unknown)
			}
			err = c.CheckOptions()
			var ue *UnknownOptionError
			switch {
			case tc.unknown == nil && err != nil:
				t.Errorf("CheckOptions = %v", err)
			case tc.unknown != nil && (!errors.As(err, &ue) || ue.Name != tc.unknown[0] || !strings.Contains(err.Error(), "-"+tc.unknown[0]+": ")):
				t.Errorf("CheckOptions = %v, want one naming -%s", err, tc.unknown[0])
			}
			if _, err := c.ForRestart(RestartOptions{MachineType: "pc-q35-10.0"}); (err != nil) != (tc.unknown != nil) {
				t.Errorf("ForRestart error = %v, want one only for unknown options", err)
			}
		})
	}
}

// helpOption matches an option line of qemu-system-* -help: the option,
// then a single space and its argument, or two spaces and its description
// (or nothing) for a flag.
var helpOption = regexp.MustCompile(`^(-{1,2}[a-zA-Z0-9_-]+)((?:/-[a-z]+)*)( [^ ]|  |$)`)

// helpOptions reads a -help text into option → takes an argument.
func helpOptions(t *testing.T, help string) map[string]bool {
	out := map[string]bool{}
	for _, l := range strings.Split(help, "\n") {
		m := helpOption.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		takesArg := strings.HasPrefix(m[3], " ") && m[3] != "  "
		for _, n := range append([]string{m[1]}, strings.Split(strings.TrimPrefix(m[2], "/"), "/")...) {
			if n = strings.TrimLeft(n, "-"); n != "" {
				out[n] = takesArg
			}
		}
		if strings.HasPrefix(l, "-h or -help") {
			out["h"], out["help"] = false, false
		}
	}
	// Lines the two-space rule misreads: "-dtb    file    use 'file' …".
	out["dtb"] = true
	if len(out) < 80 {
		t.Fatalf("read only %d options from the -help text", len(out))
	}
	return out
}

func checkAgainstHelp(t *testing.T, help string) {
	for name, wantArg := range helpOptions(t, help) {
		takesArg, ok := Known(name)
		switch {
		case !ok:
			t.Errorf("-%s (in QEMU's -help) is not in the option table", name)
		case takesArg != wantArg:
			t.Errorf("-%s: the table says takes an argument = %v, QEMU's -help says %v", name, takesArg, wantArg)
		}
	}
}

// TestOptionTableMatchesQEMUHelp checks the hand-kept option table against
// QEMU 10.0's -help (kept in testdata) and, when installed, the machine's
// QEMU: every option it lists is known, with or without its argument.
func TestOptionTableMatchesQEMUHelp(t *testing.T) {
	b, err := os.ReadFile("testdata/qemu-10.0.2-x86_64.help")
	if err != nil {
		t.Fatal(err)
	}
	t.Run("QEMU 10.0.2", func(t *testing.T) { checkAgainstHelp(t, string(b)) })
	t.Run("installed", func(t *testing.T) {
		out, err := exec.Command("qemu-system-x86_64", "-help").Output()
		if err != nil {
			t.Skipf("no qemu-system-x86_64 to ask: %v", err)
		}
		checkAgainstHelp(t, string(out))
	})
}
