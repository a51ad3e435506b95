// Command liveupdate keeps KVM guests alive across a host kernel update and
// across a QEMU restart.
//
// On a running host it is the operator's tool:
//
//	liveupdate plan                 which VMs can be saved, and why not
//	liveupdate restart-qemu [VM…]   QEMU-only live restart (save → quit → start → restore)
//	liveupdate save / restore       the two halves, with the manifest in between
//
//	liveupdate check-kernel CONFIG  does a kernel have what a host needs
//	liveupdate update --kernel K --initrd I   the live kernel update (kexec)
//
// Each subcommand's phases are the CPR engine's (package cpr): Plan, Save
// (inverse: Resume), Quit (inverse: Restore).
//
// As /init of the initramfs (process 1) it is PID 1 of the new kernel
// (package pid1): modules → devices → mounts → manifest → network →
// cgroups → restore, then optionally hand over to the host's init.
package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/liveupdate/liveupdate/pkg/pid1"
)

func main() {
	// In the initramfs, /bin/liveupdate is a u-root "shellbang" file,
	// "#!/bbin/bb #!/bbin/init": the busybox hands us the marker first and
	// the script's path second. Drop the marker.
	if len(os.Args) > 1 && strings.HasPrefix(os.Args[0], "#!") {
		os.Args = os.Args[1:]
	}
	if os.Getpid() == 1 {
		pid1.Main() // never returns
	}
	os.Exit(runCLI(os.Args[1:]))
}

func usage() {
	fmt.Fprint(os.Stderr, `usage: liveupdate COMMAND [flags] [args]

commands:
  plan          list running QEMUs and whether each can be live-restarted
  save          save every (or the named) VM's device state and quit its QEMU
  restore       start the VMs recorded in a manifest and load their state
  restart-qemu  save and restore in place, optionally onto a new QEMU binary
  check-kernel  check a kernel config for what a liveupdate host needs
  update        live kernel update: save every guest, kexec into a new kernel
  sync-clock    set running guests' clocks to the host's through their agents

Run 'liveupdate COMMAND -h' for a command's flags.
`)
}
