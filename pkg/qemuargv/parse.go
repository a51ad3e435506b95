// Package qemuargv models a QEMU command line: it parses the argv of a running
// QEMU (QemuOpts "key=val,…" and JSON option values alike), answers the
// questions a live update asks of it (where guest RAM lives, which fds were
// passed, where QMP listens), and rewrites it for the restart.
//
// The parser keeps every option it does not understand verbatim, so a rewritten
// command line differs from the original only where a rewrite changed it.
package qemuargv

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Cmdline is a parsed QEMU command line.
type Cmdline struct {
	Binary string
	Opts   []Option
}

// Option is one command-line option: "-name value", a flag such as
// "-nographic", or a positional argument (Name == "").
type Option struct {
	Name     string // without leading dashes; "" for a positional argument
	Dashes   string // "-" or "--" as written ("" means "-")
	Value    string // raw value as given
	HasValue bool
}

// QEMU's options are a hand-kept table here, checked against QEMU 10's
// own -help (TestOptionTableMatchesQEMUHelp, testdata/*.help): which take
// no argument (flagOpts) and which take exactly one (argOpts), as QEMU's
// qemu-options.hx says with HAS_ARG. Options of older QEMUs (8.2 on, the
// oldest liveupdate restarts) and of other targets are kept: a running QEMU
// accepted them, so they mean what they meant. An option in neither table
// is not guessed at: Parse keeps it as a flag, so it swallows nothing, and
// UnknownOptions names it; preflight refuses the VM and ForRestart fails.
var flagOpts = map[string]bool{
	"S": true, "s": true, "nographic": true, "no-reboot": true, "no-shutdown": true,
	"daemonize": true, "snapshot": true, "enable-kvm": true, "nodefaults": true,
	"no-user-config": true, "no-hpet": true, "no-acpi": true, "only-migratable": true,
	"enable-sync-profile": true, "preconfig": true, "version": true, "h": true,
	"help": true, "full-screen": true, "win2k-hack": true, "no-fd-bootchk": true,
	"old-param": true, "semihosting": true, "no-quit": true, "alt-grab": true,
	"ctrl-grab": true, "usb": true, "singlestep": true, "one-insn-per-tb": true,
	"audio-help": true, "rtc-td-hack": true, "no-kvm": true, "no-kvm-irqchip": true,
	"no-kvm-pit": true, "no-kvm-pit-reinjection": true, "no-frame": true,
	"no-quit-on-close": true, "portrait": true, "show-cursor": true, "curses": true,
	"xen-attach": true, "xen-domid-restrict": true,
	"mem-prealloc": true,
	"nouserconfig": true, "sdl": true,
	// QEMU 8.x/9.x and 10's perf options.
	"async-teardown": true, "perfmap": true, "jitdump": true,
	"enable-fips": true, "localtime": true, "tdf": true, "xen-create": true,
}

// argOpts are QEMU options that take one argument.
var argOpts = map[string]bool{
	// Standard options.
	"machine": true, "M": true, "accel": true, "cpu": true, "smp": true,
	"numa": true, "add-fd": true, "set": true, "global": true, "boot": true,
	"m": true, "mem-path": true, "k": true, "audio": true, "audiodev": true,
	"device": true, "name": true, "uuid": true,
	// Block devices.
	"fda": true, "fdb": true, "hda": true, "hdb": true, "hdc": true, "hdd": true,
	"cdrom": true, "blockdev": true, "drive": true, "mtdblock": true, "sd": true,
	"pflash": true, "iscsi": true, "fsdev": true, "virtfs": true,
	"virtfs_synth": true,
	// USB, display.
	"usbdevice": true, "display": true, "vga": true, "spice": true, "vnc": true,
	"g": true, "rotate": true,
	// i386 and other targets.
	"acpitable": true, "smbios": true, "prom-env": true, "semihosting-config": true,
	// Network, character devices, TPM, boot.
	"nic": true, "netdev": true, "net": true, "chardev": true, "tpmdev": true,
	"kernel": true, "shim": true, "append": true, "initrd": true, "dtb": true,
	"fw_cfg": true, "serial": true, "parallel": true, "monitor": true,
	"qmp": true, "qmp-pretty": true, "mon": true, "debugcon": true,
	"pidfile": true, "gdb": true, "d": true, "D": true, "dfilter": true,
	"seed": true, "L": true, "bios": true, "xen-domid": true,
	// Run time, debugging.
	"icount": true, "watchdog-action": true, "echr": true, "incoming": true,
	"readconfig": true, "option-rom": true, "rtc": true, "loadvm": true,
	"sandbox": true, "msg": true, "dump-vmstate": true, "trace": true,
	"plugin": true, "object": true, "compat": true, "action": true,
	"overcommit": true, "run-with": true, "qtest": true, "qtest-log": true,
	// Of QEMUs before 10 (removed or renamed since).
	"chroot": true, "runas": true, "writeconfig": true, "tb-size": true,
	"watchdog": true, "soundhw": true, "balloon": true, "realtime": true,
	"clock": true, "bt": true, "virtioconsole": true,
}

// Known tells whether liveupdate knows QEMU option name (without dashes),
// and whether it takes an argument.
func Known(name string) (takesArg, known bool) {
	switch {
	case flagOpts[name]:
		return false, true
	case argOpts[name]:
		return true, true
	}
	return false, false
}

// UnknownOptions names, once each and in order, the options of the command
// line liveupdate does not know (see flagOpts).
func (c *Cmdline) UnknownOptions() []string {
	var out []string
	for _, o := range c.Opts {
		if _, ok := Known(o.Name); o.Name != "" && !ok && !slices.Contains(out, o.Name) {
			out = append(out, o.Name)
		}
	}
	return out
}

// UnknownOptionError is an option liveupdate does not know.
type UnknownOptionError struct{ Name string }

func (e *UnknownOptionError) Error() string {
	return fmt.Sprintf("-%s: an option liveupdate does not know, so it cannot tell whether it takes a value nor restart a QEMU with it", e.Name)
}

// CheckOptions fails, with an *UnknownOptionError, on the first option
// liveupdate does not know.
func (c *Cmdline) CheckOptions() error {
	if u := c.UnknownOptions(); len(u) > 0 {
		return &UnknownOptionError{Name: u[0]}
	}
	return nil
}

// Parse parses argv (argv[0] is the QEMU binary). It fails only on an option
// that needs a value and has none, or a JSON value that does not decode. An
// option it does not know is kept as a flag: see UnknownOptions.
func Parse(argv []string) (*Cmdline, error) {
	if len(argv) == 0 {
		return nil, fmt.Errorf("empty QEMU command line")
	}
	c := &Cmdline{Binary: argv[0]}
	for i := 1; i < len(argv); i++ {
		a := argv[i]
		if len(a) < 2 || a[0] != '-' {
			c.Opts = append(c.Opts, Option{Value: a, HasValue: true})
			continue
		}
		name := strings.TrimLeft(a, "-")
		dashes := a[:len(a)-len(name)]
		if name == "" || len(dashes) > 2 {
			c.Opts = append(c.Opts, Option{Value: a, HasValue: true})
			continue
		}
		if dashes == "-" {
			dashes = ""
		}
		if takesArg, _ := Known(name); !takesArg {
			// A flag, or an option we do not know: that one is kept
			// as a flag so it swallows nothing (it may have taken
			// the next word; UnknownOptions names it).
			c.Opts = append(c.Opts, Option{Name: name, Dashes: dashes})
			continue
		}
		if i+1 >= len(argv) {
			return nil, fmt.Errorf("option -%s needs a value", name)
		}
		i++
		o := Option{Name: name, Dashes: dashes, Value: argv[i], HasValue: true}
		if isJSON(o.Value) {
			if _, err := o.Props(); err != nil {
				return nil, fmt.Errorf("option -%s: %w", name, err)
			}
		}
		c.Opts = append(c.Opts, o)
	}
	return c, nil
}

// Argv renders the command line back into an argv.
func (c *Cmdline) Argv() []string {
	out := []string{c.Binary}
	for _, o := range c.Opts {
		if o.Name != "" {
			d := o.Dashes
			if d == "" {
				d = "-"
			}
			out = append(out, d+o.Name)
		}
		if o.HasValue {
			out = append(out, o.Value)
		}
	}
	return out
}

// Find returns the indexes of all options with the given name (aliases are
// the caller's business: QEMU's -M is -machine, for example).
func (c *Cmdline) Find(names ...string) []int {
	var idx []int
	for i, o := range c.Opts {
		for _, n := range names {
			if o.Name == n {
				idx = append(idx, i)
			}
		}
	}
	return idx
}

func isJSON(v string) bool { return strings.HasPrefix(strings.TrimSpace(v), "{") }

// impliedKey is the key QEMU gives the first, key-less element of an option
// value ("-netdev tap,id=n0" means type=tap).
var impliedKey = map[string]string{
	"object": "qom-type", "netdev": "type", "nic": "type", "machine": "type", "M": "type",
	"numa": "type", "chardev": "backend", "device": "driver", "name": "guest",
	"accel": "accel", "drive": "file", "smp": "cpus", "m": "size", "cpu": "model",
	"boot": "order", "display": "type", "audiodev": "driver", "incoming": "uri",
	"serial": "dev", "qmp": "dev", "monitor": "dev", "mon": "chardev",
	"blockdev": "driver", "fsdev": "fsdriver", "virtfs": "fsdriver", "rtc": "base",
	"add-fd": "", "sandbox": "enable", "overcommit": "", "msg": "", "global": "",
}

// Props parses the option's value. Options whose value is not a property
// list (-kernel PATH) still parse: the whole value is the implied key's.
func (o Option) Props() (*Props, error) {
	if isJSON(o.Value) {
		dec := json.NewDecoder(strings.NewReader(o.Value))
		dec.UseNumber()
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			return nil, fmt.Errorf("JSON value %q: %w", truncate(o.Value, 60), err)
		}
		if dec.More() {
			return nil, fmt.Errorf("JSON value %q: trailing data", truncate(o.Value, 60))
		}
		p := &Props{json: true}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			p.pairs = append(p.pairs, kv{key: k, val: m[k]})
		}
		return p, nil
	}
	return parseKeyVal(o.Value, impliedKey[o.Name]), nil
}

// Props is an option value as an ordered list of properties.
type Props struct {
	pairs []kv
	json  bool
}

type kv struct {
	key      string
	val      any // string, or a JSON value (json.Number, bool, []any, map)
	implied  bool
	bareFlag bool // "server" without "=on" in the old syntax
}

// parseKeyVal splits "a,b=c,d=e,,f" the way QemuOpts does: ",," is a literal
// comma; a first element without "=" is the implied key's value.
func parseKeyVal(s, implied string) *Props {
	p := &Props{}
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ',' {
			if i+1 < len(s) && s[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(s[i])
	}
	parts = append(parts, cur.String())
	for i, part := range parts {
		k, v, ok := strings.Cut(part, "=")
		switch {
		case ok:
			p.pairs = append(p.pairs, kv{key: k, val: v})
		case i == 0 && implied != "":
			p.pairs = append(p.pairs, kv{key: implied, val: part, implied: true})
		case part == "":
			// empty element (trailing comma): keep nothing
		default:
			// QemuOpts' old boolean syntax: "server" means server=on,
			// "nowait" means wait=off.
			if strings.HasPrefix(part, "no") && len(part) > 2 {
				p.pairs = append(p.pairs, kv{key: part[2:], val: "off", bareFlag: true})
			} else {
				p.pairs = append(p.pairs, kv{key: part, val: "on", bareFlag: true})
			}
		}
	}
	return p
}

// Get returns a property's value as a string (JSON booleans as "on"/"off").
func (p *Props) Get(key string) (string, bool) {
	for _, e := range p.pairs {
		if e.key == key {
			return valString(e.val), true
		}
	}
	return "", false
}

// All returns every value of a repeated property, in order.
func (p *Props) All(key string) []string {
	var out []string
	for _, e := range p.pairs {
		if e.key == key {
			out = append(out, valString(e.val))
		}
	}
	return out
}

// Bool reports a boolean property the way QEMU reads it; def if absent.
func (p *Props) Bool(key string, def bool) bool {
	v, ok := p.Get(key)
	if !ok {
		return def
	}
	switch strings.ToLower(v) {
	case "on", "yes", "true", "y":
		return true
	}
	return false
}

// Set sets a property, keeping its position if it exists.
func (p *Props) Set(key, val string) {
	for i, e := range p.pairs {
		if e.key == key {
			p.pairs[i].val = val
			p.pairs[i].bareFlag = false
			return
		}
	}
	p.pairs = append(p.pairs, kv{key: key, val: val})
}

// Delete removes a property.
func (p *Props) Delete(key string) {
	out := p.pairs[:0]
	for _, e := range p.pairs {
		if e.key != key {
			out = append(out, e)
		}
	}
	p.pairs = out
}

// Keys lists the property names in order.
func (p *Props) Keys() []string {
	var ks []string
	for _, e := range p.pairs {
		ks = append(ks, e.key)
	}
	return ks
}

// IsJSON tells whether the value was written in the JSON syntax.
func (p *Props) IsJSON() bool { return p.json }

// String encodes the properties back in the syntax they came in.
func (p *Props) String() string {
	if p.json {
		var b bytes.Buffer
		b.WriteByte('{')
		for i, e := range p.pairs {
			if i > 0 {
				b.WriteByte(',')
			}
			k, _ := json.Marshal(e.key)
			v, _ := json.Marshal(e.val)
			b.Write(k)
			b.WriteByte(':')
			b.Write(v)
		}
		b.WriteByte('}')
		return b.String()
	}
	var parts []string
	for i, e := range p.pairs {
		v := escapeComma(valString(e.val))
		switch {
		case e.implied && i == 0:
			parts = append(parts, v)
		default:
			parts = append(parts, escapeComma(e.key)+"="+v)
		}
	}
	return strings.Join(parts, ",")
}

// escapeComma doubles each comma of a key or value, QemuOpts' escape
// (parseKeyVal reads ",," back as one).
func escapeComma(s string) string { return strings.ReplaceAll(s, ",", ",,") }

func valString(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case bool:
		if x {
			return "on"
		}
		return "off"
	case json.Number:
		return x.String()
	case nil:
		return ""
	default:
		b, _ := json.Marshal(x)
		return string(b)
	}
}

// ParseSize reads a QEMU size ("256M", "4G", "1073741824"); a bare number in
// -m means MiB, which the caller handles.
func ParseSize(s string) (uint64, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("empty size")
	}
	mult := uint64(1)
	switch s[len(s)-1] {
	case 'k', 'K':
		mult = 1 << 10
	case 'm', 'M':
		mult = 1 << 20
	case 'g', 'G':
		mult = 1 << 30
	case 't', 'T':
		mult = 1 << 40
	case 'b', 'B':
		mult = 1
	}
	if mult != 1 || s[len(s)-1] == 'b' || s[len(s)-1] == 'B' {
		s = s[:len(s)-1]
	}
	if f, err := strconv.ParseFloat(s, 64); err == nil && strings.Contains(s, ".") {
		return uint64(f * float64(mult)), nil
	}
	n, err := strconv.ParseUint(s, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	if n > ^uint64(0)/mult {
		return 0, fmt.Errorf("size %q overflows", s)
	}
	return n * mult, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
