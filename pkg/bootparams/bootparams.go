// Package bootparams reads the kernel command-line parameters that tell PID 1
// what to do after kexec: where PMEM, the manifest and the host root are,
// whether to bring up DHCP, and whether to hand over to the host's init.
//
// All parameters start with "lu."; any other word is the kernel's business.
// Parsing is strict: an unknown or malformed lu.* parameter is an error, so
// a typo stops the boot at the rescue shell instead of silently doing less.
package bootparams

import (
	"fmt"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Params are the parsed lu.* parameters.
type Params struct {
	PMEM       string        // lu.pmem: PMEM block device holding guest RAM (e.g. /dev/pmem0)
	PMEMMount  string        // lu.pmem_mount: where it is mounted (default /mnt/pmem)
	FormatPMEM bool          // lu.format_pmem=1: first boot: mkfs an EMPTY device (never one with a filesystem)
	Manifest   string        // lu.manifest: the manifest (default PMEM_MOUNT/liveupdate/manifest.json)
	Root       string        // lu.root: host root (UUID=…, LABEL=…, or /dev/…); empty: none
	RootFSType string        // lu.rootfstype (default ext4)
	RootFlags  string        // lu.rootflags: mount data (e.g. "errors=remount-ro")
	RootRO     bool          // lu.root_ro=1: mount the host root read-only
	DHCP       string        // lu.dhcp: interface to run DHCPv4 on; empty: none
	Handover   bool          // lu.handover=1: after restore, switch_root into the host root and exec its init
	Init       string        // lu.init: the host's init for handover (default /sbin/init)
	Modules    []string      // lu.modules=a,b: modules to load besides the built-in list
	DevWait    time.Duration // lu.devwait: how long to wait for devices (default 10s)
	Rescue     bool          // lu.rescue=1: stop at the rescue shell before doing anything
	Control    string        // lu.control: a serial line that takes shell commands (automation)
}

// Defaults.
const (
	DefaultPMEMMount = "/mnt/pmem"
	DefaultInit      = "/sbin/init"
	DefaultDevWait   = 10 * time.Second
)

var known = map[string]string{
	"lu.pmem":        "PMEM block device, e.g. /dev/pmem0",
	"lu.pmem_mount":  "mount point of the PMEM filesystem (default /mnt/pmem)",
	"lu.format_pmem": "1: format the PMEM devices if they are empty (first boot): lu.pmem and the host fstab's /dev/pmemN ext4 entries",
	"lu.manifest":    "path of the manifest (default PMEM_MOUNT/liveupdate/manifest.json)",
	"lu.root":        "host root: UUID=…, LABEL=… or /dev/…",
	"lu.rootfstype":  "host root filesystem type (default ext4)",
	"lu.rootflags":   "host root mount options",
	"lu.root_ro":     "1: mount the host root read-only",
	"lu.dhcp":        "interface to configure with DHCPv4",
	"lu.handover":    "1: switch_root into the host root after restore",
	"lu.init":        "host init for handover (default /sbin/init)",
	"lu.modules":     "comma-separated extra kernel modules",
	"lu.devwait":     "how long to wait for devices, e.g. 10s",
	"lu.rescue":      "1: go to the rescue shell at once",
	"lu.control":     "serial device taking one shell command per line, e.g. /dev/ttyS1",
}

// Known lists the parameters with a line of help each, sorted.
func Known() []string {
	var out []string
	for k, v := range known {
		out = append(out, k+"\t"+v)
	}
	sort.Strings(out)
	return out
}

// Parse parses a kernel command line (the contents of /proc/cmdline).
func Parse(cmdline string) (Params, error) {
	p := Params{PMEMMount: DefaultPMEMMount, RootFSType: "ext4", Init: DefaultInit, DevWait: DefaultDevWait}
	seen := map[string]bool{}
	for _, w := range splitCmdline(cmdline) {
		if !strings.HasPrefix(w, "lu.") {
			continue
		}
		k, v, hasVal := strings.Cut(w, "=")
		if _, ok := known[k]; !ok {
			return p, fmt.Errorf("unknown kernel parameter %q (known: %s)", k, strings.Join(keys(), ", "))
		}
		if seen[k] {
			return p, fmt.Errorf("kernel parameter %s given twice", k)
		}
		seen[k] = true
		if !hasVal || v == "" {
			return p, fmt.Errorf("kernel parameter %s needs a value (%s)", k, known[k])
		}
		var err error
		switch k {
		case "lu.pmem":
			p.PMEM, err = absPath(k, v)
		case "lu.pmem_mount":
			p.PMEMMount, err = absPath(k, v)
		case "lu.format_pmem":
			p.FormatPMEM, err = boolean(k, v)
		case "lu.manifest":
			p.Manifest, err = absPath(k, v)
		case "lu.root":
			p.Root = v
			if !strings.HasPrefix(v, "UUID=") && !strings.HasPrefix(v, "LABEL=") && !strings.HasPrefix(v, "/dev/") {
				err = fmt.Errorf("lu.root=%s: want UUID=…, LABEL=… or /dev/…", v)
			}
		case "lu.rootfstype":
			p.RootFSType = v
		case "lu.rootflags":
			p.RootFlags = v
		case "lu.root_ro":
			p.RootRO, err = boolean(k, v)
		case "lu.dhcp":
			p.DHCP = v
			if strings.ContainsAny(v, "/ ") || len(v) > 15 {
				err = fmt.Errorf("lu.dhcp=%s is not an interface name", v)
			}
		case "lu.handover":
			p.Handover, err = boolean(k, v)
		case "lu.init":
			p.Init, err = absPath(k, v)
		case "lu.modules":
			for _, m := range strings.Split(v, ",") {
				if m == "" || strings.ContainsAny(m, "/ ") {
					return p, fmt.Errorf("lu.modules: bad module name %q", m)
				}
				p.Modules = append(p.Modules, m)
			}
		case "lu.devwait":
			p.DevWait, err = time.ParseDuration(v)
			if err == nil && (p.DevWait <= 0 || p.DevWait > 10*time.Minute) {
				err = fmt.Errorf("lu.devwait=%s: want between 0 and 10m", v)
			}
		case "lu.rescue":
			p.Rescue, err = boolean(k, v)
		case "lu.control":
			p.Control, err = absPath(k, v)
			if err == nil && !strings.HasPrefix(v, "/dev/") {
				err = fmt.Errorf("lu.control=%s: want a device under /dev", v)
			}
		}
		if err != nil {
			return p, err
		}
	}
	if p.Manifest == "" {
		p.Manifest = filepath.Join(p.PMEMMount, "liveupdate", "manifest.json")
	}
	if p.FormatPMEM && p.PMEM == "" {
		return p, fmt.Errorf("lu.format_pmem=1 without lu.pmem")
	}
	if p.Handover && p.Root == "" {
		return p, fmt.Errorf("lu.handover=1 needs lu.root (the root to hand over to)")
	}
	return p, nil
}

// Words returns the lu.* parameters that reproduce p (the pre-kexec side
// writes them into the new kernel's command line). Values with spaces must be
// quoted by the caller.
func (p Params) Words() []string {
	var w []string
	add := func(k, v string) { w = append(w, k+"="+v) }
	flag := func(k string, b bool) {
		if b {
			add(k, "1")
		}
	}
	if p.PMEM != "" {
		add("lu.pmem", p.PMEM)
	}
	if p.PMEMMount != DefaultPMEMMount && p.PMEMMount != "" {
		add("lu.pmem_mount", p.PMEMMount)
	}
	flag("lu.format_pmem", p.FormatPMEM)
	if p.Manifest != "" && p.Manifest != filepath.Join(p.PMEMMount, "liveupdate", "manifest.json") {
		add("lu.manifest", p.Manifest)
	}
	if p.Root != "" {
		add("lu.root", p.Root)
	}
	if p.RootFSType != "ext4" && p.RootFSType != "" {
		add("lu.rootfstype", p.RootFSType)
	}
	if p.RootFlags != "" {
		add("lu.rootflags", p.RootFlags)
	}
	flag("lu.root_ro", p.RootRO)
	if p.DHCP != "" {
		add("lu.dhcp", p.DHCP)
	}
	flag("lu.handover", p.Handover)
	if p.Init != DefaultInit && p.Init != "" {
		add("lu.init", p.Init)
	}
	if len(p.Modules) > 0 {
		add("lu.modules", strings.Join(p.Modules, ","))
	}
	if p.DevWait != DefaultDevWait && p.DevWait != 0 {
		add("lu.devwait", p.DevWait.String())
	}
	flag("lu.rescue", p.Rescue)
	if p.Control != "" {
		add("lu.control", p.Control)
	}
	return w
}

func keys() []string {
	var ks []string
	for k := range known {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func absPath(k, v string) (string, error) {
	if !filepath.IsAbs(v) || filepath.Clean(v) != v {
		return "", fmt.Errorf("%s=%s: want a clean absolute path", k, v)
	}
	return v, nil
}

func boolean(k, v string) (bool, error) {
	switch v {
	case "1", "y", "yes", "on", "true":
		return true, nil
	case "0", "n", "no", "off", "false":
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("%s=%s: want 1 or 0", k, v)
	}
	return b, nil
}

// Split splits a kernel command line into words, honouring double quotes the
// way the kernel does (param="a b"); the quotes are removed.
func Split(s string) []string { return splitCmdline(s) }

// Quote renders a word for a command line, quoting a value with spaces.
func Quote(w string) string {
	if !strings.ContainsAny(w, " \t\n") {
		return w
	}
	if k, v, ok := strings.Cut(w, "="); ok {
		return k + `="` + v + `"`
	}
	return `"` + w + `"`
}

func splitCmdline(s string) []string {
	var out []string
	var cur strings.Builder
	inQ, have := false, false
	for _, r := range s {
		switch {
		case r == '"':
			inQ = !inQ
			have = true
		case !inQ && (r == ' ' || r == '\t' || r == '\n'):
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if have {
		out = append(out, cur.String())
	}
	return out
}
