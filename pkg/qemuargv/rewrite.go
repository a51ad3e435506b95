package qemuargv

import (
	"fmt"
	"strconv"
	"strings"
)

// RestartOptions says how to rewrite a command line for a CPR restart.
type RestartOptions struct {
	// Binary, when set, replaces the QEMU binary (restart onto a new QEMU).
	Binary string
	// MachineType is the versioned machine type the running QEMU really
	// uses (from QOM /machine type, without "-machine"). When the command
	// line names an alias ("pc", "q35") or nothing, it is replaced by this,
	// so a newer QEMU binary restores the same machine.
	MachineType string
	// FdMap renumbers inherited fds: old number → number in the new
	// process. Every fd the command line names must be in it.
	FdMap map[int]int
}

// ForRestart returns a copy of c rewritten for the restore side of CPR:
// "-incoming defer" (replacing any -incoming), -S (QEMU would otherwise run
// the guest the moment its state is loaded, before the restorer has
// checked it: a guest that has run cannot be given back to its state file
// or its old QEMU), no -daemonize (the restorer supervises the process),
// the machine type pinned, fds renumbered, and the -trace an earlier
// cpr-transfer added (WithTransfer) dropped.
func (c *Cmdline) ForRestart(o RestartOptions) (*Cmdline, error) {
	if err := c.CheckOptions(); err != nil {
		return nil, err // it may have swallowed a value: its argv is not understood
	}
	n := &Cmdline{Binary: c.Binary}
	if o.Binary != "" {
		n.Binary = o.Binary
	}
	for _, opt := range c.Opts {
		switch opt.Name {
		case "incoming", "daemonize":
			continue
		}
		if isRunTrace(opt) {
			continue // an earlier cpr-transfer's, to a file of that run
		}
		n.Opts = append(n.Opts, opt)
	}
	if err := n.pinMachine(o.MachineType); err != nil {
		return nil, err
	}
	if err := n.renumberFds(o.FdMap); err != nil {
		return nil, err
	}
	if len(n.Find("S")) == 0 {
		n.Opts = append(n.Opts, Option{Name: "S"})
	}
	n.Opts = append(n.Opts, Option{Name: "incoming", Value: "defer", HasValue: true})
	return n, nil
}

// IsVersionedMachine tells whether a machine type names a fixed version
// ("pc-i440fx-10.0", "pc-q35-8.2") rather than an alias ("pc", "q35").
func IsVersionedMachine(t string) bool {
	i := strings.LastIndexByte(t, '-')
	if i < 0 {
		return false
	}
	_, err := strconv.ParseFloat(t[i+1:], 64)
	return err == nil
}

func (c *Cmdline) pinMachine(resolved string) error {
	resolved = strings.TrimSuffix(resolved, "-machine")
	cur := c.MachineType()
	if resolved == "" || cur == resolved || IsVersionedMachine(cur) {
		return nil
	}
	idx := c.Find("machine", "M")
	// Change the option that set the type; else the first -machine.
	target := -1
	for _, i := range idx {
		p, err := c.Opts[i].Props()
		if err != nil {
			return err
		}
		if _, ok := p.Get("type"); ok {
			target = i
		}
	}
	if target < 0 && len(idx) > 0 {
		target = idx[0]
	}
	if target < 0 {
		c.Opts = append(c.Opts, Option{Name: "machine", Value: resolved, HasValue: true})
		return nil
	}
	p, err := c.Opts[target].Props()
	if err != nil {
		return err
	}
	if _, ok := p.Get("type"); ok {
		p.Set("type", resolved)
	} else if p.IsJSON() {
		p.Set("type", resolved)
	} else {
		// Put the type first, as the implied key, as people write it.
		p.pairs = append([]kv{{key: "type", val: resolved, implied: true}}, p.pairs...)
	}
	c.Opts[target].Value = p.String()
	return nil
}

func (c *Cmdline) renumberFds(m map[int]int) error {
	opts := map[int]bool{}
	for _, r := range c.FdRefs() {
		opts[r.Opt] = true
	}
	for i := range opts {
		p, err := c.Opts[i].Props()
		if err != nil {
			return err
		}
		if mp, _ := p.Get("mem-path"); InheritedFd(mp) >= 0 {
			old := InheritedFd(mp)
			nw, ok := m[old]
			if !ok {
				return fmt.Errorf("-%s mem-path: no new fd for inherited fd %d", c.Opts[i].Name, old)
			}
			p.Set("mem-path", "/proc/self/fd/"+strconv.Itoa(nw))
		}
		for _, key := range fdKeys {
			v, ok := p.Get(key)
			if !ok || v == "" {
				continue
			}
			parts := strings.Split(v, ":")
			for j, f := range parts {
				old, err := strconv.Atoi(f)
				if err != nil {
					return fmt.Errorf("-%s %s: fd %q is not a number and cannot be passed again", c.Opts[i].Name, key, f)
				}
				nw, ok := m[old]
				if !ok {
					return fmt.Errorf("-%s %s: no new fd for inherited fd %d", c.Opts[i].Name, key, old)
				}
				parts[j] = strconv.Itoa(nw)
			}
			p.Set(key, strings.Join(parts, ":"))
		}
		c.Opts[i].Value = p.String()
	}
	return nil
}
