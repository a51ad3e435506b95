package pid1

import (
	"bytes"
	"log/slog"
	"os"
)

// RCUExpedited is the kernel's switch for expedited RCU grace periods.
const RCUExpedited = "/sys/kernel/rcu_expedited"

// expediteRCU makes the kernel's RCU grace periods expedited for PID 1's
// boot and returns what puts the switch back as it was. Why: most of what
// PID 1 asks of the kernel before the guests run — bridges, taps, links
// up, cgroups, mounts — waits, somewhere inside, for a grace period
// (synchronize_rcu, synchronize_net), and a normal one waits for every CPU
// to pass a quiescent state: milliseconds on a host, tens of milliseconds
// each in the nested test host, where one network phase took 194–775 ms
// for a bridge and a tap. The kernel itself boots with them expedited and
// stops at init's exec; this carries that on until the guests are
// restored. The cost, interrupts to every CPU at each grace period, falls
// on a host with no guest running yet. A kernel without the switch (or
// with rcu_normal set, which overrides it) changes nothing.
func expediteRCU(path string, log *slog.Logger) (restore func()) {
	was, err := os.ReadFile(path)
	if err != nil || bytes.Equal(bytes.TrimSpace(was), []byte("1")) {
		return func() {}
	}
	if err := os.WriteFile(path, []byte("1"), 0o644); err != nil {
		log.Warn("RCU grace periods not expedited for the boot", "err", err)
		return func() {}
	}
	return func() {
		if err := os.WriteFile(path, bytes.TrimSpace(was), 0o644); err != nil {
			log.Warn("RCU grace periods left expedited after the restore", "err", err)
		}
	}
}
