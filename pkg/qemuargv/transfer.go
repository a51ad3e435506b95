package qemuargv

import (
	"encoding/json"
	"strings"
)

// AuxRAMShare tells whether the guest was started with -machine
// aux-ram-share=on: QEMU allocates its own RAM blocks (ROMs, VGA, ACPI
// tables) as shared memory then, which cpr-transfer needs to pass them to
// the new QEMU by fd. Without it QEMU refuses cpr-transfer ("Memory region
// /rom@etc/acpi/rsdp is not compatible with CPR").
func (c *Cmdline) AuxRAMShare() bool {
	v, ok := c.machineProp("aux-ram-share")
	if !ok {
		return false
	}
	switch strings.ToLower(v) {
	case "on", "yes", "true", "y":
		return true
	}
	return false
}

// WithTransfer returns a copy of a ForRestart command line that takes its
// guest by cpr-transfer: the -incoming defer replaced by the two channels on
// unix sockets — main (the device state) and cpr (the RAM's fds, read before
// QEMU creates any device or monitor) — and, as its monitor is reached only
// once the handover began, migration events on from the command line: the
// restorer waits for the load by them. (x-ignore-shared stays off on both
// sides: cpr-transfer leaves all RAM in place by itself, and QEMU 10 has no
// command-line property for it — a stream saying it is on is refused.)
//
// Without -S, as in QEMU's own cpr-transfer: the new QEMU runs the guest the
// moment its load ends, if the old one ran it. Its run-state changes are
// traced to the file trace: the line saying it entered running is written
// before its vCPUs start, and stays when QEMU dies — the record that
// the guest may have run there, which decides whether the old QEMU may ever
// continue it. With -msg timestamp=on (added unless on already; it stays,
// and QEMU's messages in its log carry the time too) the line says when:
// the blackout's end even when the restorer reached the monitor only after
// the RESUME event. Options an earlier restart added are not repeated.
func (c *Cmdline) WithTransfer(main, cpr, trace string) *Cmdline {
	n := &Cmdline{Binary: c.Binary}
	for _, opt := range c.Opts {
		if opt.Name == "incoming" || opt.Name == "S" || (opt.Name == transferEvents.Name && opt.Value == transferEvents.Value) || isRunTrace(opt) {
			continue
		}
		n.Opts = append(n.Opts, opt)
	}
	n.Opts = append(n.Opts, transferEvents)
	if !n.msgTimestamps() {
		n.Opts = append(n.Opts, Option{Name: "msg", Value: "timestamp=on", HasValue: true})
	}
	n.Opts = append(n.Opts,
		Option{Name: "trace", Value: runTracePrefix + escapeComma(trace), HasValue: true},
		Option{Name: "incoming", Value: channelJSON("main", main), HasValue: true},
		Option{Name: "incoming", Value: channelJSON("cpr", cpr), HasValue: true})
	return n
}

// transferEvents turns the migration events on from the command line.
var transferEvents = Option{Name: "global", Value: "migration.x-events=on", HasValue: true}

// runTracePrefix is the -trace value of a transfer, less the file's path:
// QEMU's runstate_set trace point, written and flushed by its log backend on
// every run-state change — "… new_state 9 (running)" before any vCPU or
// device resumes (qemuproc.StartedGuest reads it). QEMU sends its own -d
// logging to that file too: a guest's -D file gets none while it runs.
const runTracePrefix = "enable=runstate_set,file="

// msgTimestamps tells whether QEMU stamps its messages with the time
// (-msg timestamp=on; the last -msg saying so wins).
func (c *Cmdline) msgTimestamps() bool {
	on := false
	for _, i := range c.Find("msg") {
		p, err := c.Opts[i].Props()
		if err != nil {
			continue
		}
		on = p.Bool("timestamp", on)
	}
	return on
}

// isRunTrace tells whether opt is the -trace a transfer added.
func isRunTrace(opt Option) bool {
	return opt.Name == "trace" && strings.HasPrefix(opt.Value, runTracePrefix)
}

// TransferChannel is one channel of a cpr-transfer as QMP's migrate and
// QEMU's -incoming take it.
func TransferChannel(kind, path string) map[string]any {
	return map[string]any{"channel-type": kind,
		"addr": map[string]any{"transport": "socket", "type": "unix", "path": path}}
}

func channelJSON(kind, path string) string {
	b, _ := json.Marshal(TransferChannel(kind, path)) // maps of strings always marshal
	return string(b)
}
