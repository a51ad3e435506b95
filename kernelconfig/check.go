// Package kernelconfig checks a kernel's .config against the options a
// liveupdate host needs: host.config (every host), and one backend for its
// guests' RAM — pmem.config (files on a DAX filesystem on persistent memory)
// or luo.config (memfds kept across the kexec by the Live Update
// Orchestrator). The fragments are embedded.
package kernelconfig

import (
	"bufio"
	_ "embed"
	"fmt"
	"io"
	"sort"
	"strings"
)

var (
	//go:embed host.config
	hostConfig string
	//go:embed pmem.config
	pmemConfig string
	//go:embed luo.config
	luoConfig string
)

// Requirement is one line of the fragment.
type Requirement struct {
	Option string // CONFIG_X
	Want   string // "y", "m" (y or m), or "n" (not set)
}

// Problem is a requirement a config does not meet.
type Problem struct {
	Requirement
	Have string // "y", "m", "n" or another value
}

func (p Problem) String() string {
	want := map[string]string{"y": "built in (=y)", "m": "built in or a module (=y or =m)", "n": "not set"}[p.Want]
	have := p.Have
	if have == "n" {
		have = "not set"
	}
	return fmt.Sprintf("%s: is %s, needs to be %s", p.Option, have, want)
}

// Requirements is what a host with the PMEM backend needs (host.config
// and pmem.config): what `update` checks a new kernel's config against.
func Requirements() []Requirement {
	return append(fragment(hostConfig), fragment(pmemConfig)...)
}

// Host is what every host needs (host.config).
func Host() []Requirement { return fragment(hostConfig) }

// PMEM is what the PMEM backend needs besides Host (pmem.config).
func PMEM() []Requirement { return fragment(pmemConfig) }

// LUO is what the LUO backend needs besides Host (luo.config).
func LUO() []Requirement { return fragment(luoConfig) }

// fragment parses an embedded fragment (their syntax is tested).
func fragment(text string) []Requirement {
	reqs, _ := parseFragment(strings.NewReader(text))
	return reqs
}

// Report is a config checked against every fragment.
type Report struct {
	Host, PMEM, LUO []Problem // what each lacks; none: ready
}

// Ready reports whether the kernel can be a liveupdate host: everything
// of Host, and one backend at least.
func (r Report) Ready() bool { return len(r.Host) == 0 && (len(r.PMEM) == 0 || len(r.LUO) == 0) }

// Readiness checks cfg against each fragment.
func Readiness(cfg map[string]string) Report {
	return Report{Host: Check(cfg, Host()), PMEM: Check(cfg, PMEM()), LUO: Check(cfg, LUO())}
}

func parseFragment(r io.Reader) ([]Requirement, error) {
	var out []Requirement
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(l, "# CONFIG_") && strings.HasSuffix(l, " is not set") {
			out = append(out, Requirement{Option: strings.Fields(l)[1], Want: "n"})
			continue
		}
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok || !strings.HasPrefix(k, "CONFIG_") || (v != "y" && v != "m") {
			return nil, fmt.Errorf("fragment line %q: want CONFIG_X=y, CONFIG_X=m or '# CONFIG_X is not set'", l)
		}
		out = append(out, Requirement{Option: k, Want: v})
	}
	return out, sc.Err()
}

// ParseConfig reads a kernel .config into option → value ("n" for "is not
// set" lines).
func ParseConfig(r io.Reader) (map[string]string, error) {
	m := map[string]string{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(l, "# CONFIG_") && strings.HasSuffix(l, " is not set") {
			m[strings.Fields(l)[1]] = "n"
			continue
		}
		if k, v, ok := strings.Cut(l, "="); ok && strings.HasPrefix(k, "CONFIG_") {
			m[k] = strings.Trim(v, `"`)
		}
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("no CONFIG_ lines: not a kernel config")
	}
	return m, sc.Err()
}

// Check returns the requirements cfg does not meet, sorted by option.
func Check(cfg map[string]string, reqs []Requirement) []Problem {
	var out []Problem
	for _, r := range reqs {
		have, ok := cfg[r.Option]
		if !ok {
			have = "n"
		}
		okay := false
		switch r.Want {
		case "y":
			okay = have == "y"
		case "m":
			okay = have == "y" || have == "m"
		case "n":
			okay = have == "n"
		}
		if !okay {
			out = append(out, Problem{Requirement: r, Have: have})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Option < out[j].Option })
	return out
}
