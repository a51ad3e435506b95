// Command liveupdate keeps KVM guests alive across a host kernel update and
// across a QEMU restart.
//
// On a running host it is the operator's tool (the command table in
// cli.go; `liveupdate help` lists it):
//
//	liveupdate plan                 which VMs can be saved, and why not
//	liveupdate restart-qemu [VM…]   QEMU-only live restart: plan → save → restore → retire the old QEMUs
//	liveupdate save / restore       the two halves, with the manifest in between
//	liveupdate recover              an interrupted run's guests back to running (safe to repeat)
//	liveupdate status               where the last run's time went
//	liveupdate update --kernel K --initrd I   the live kernel update: kexec-load → save-guests →
//	                                remount-ro → kexec-record → state-ro → reboot (package update)
//	liveupdate check-kernel CONFIG  does a kernel have what a host needs
//	liveupdate sync-clock           guests' clocks to the host's
//
// Save's steps, each with its undo, are the CPR engine's (package cpr):
// prepare → manifest → early-start → migrate-setup → save → saved → quit.
//
// As /init of the initramfs (process 1) it is PID 1 of the new kernel
// (package pid1): modules → devices → mounts → host filesystems →
// manifest → read ahead → clock → network modules → network → cgroups →
// restore modules → restore → uplinks → services, then optionally hand
// over to the host's init.
package main

import (
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
