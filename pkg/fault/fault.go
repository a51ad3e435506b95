// Package fault injects failures at named phase boundaries, so that tests
// can prove every guest survives a failure at each of them.
//
// It is compiled in only with the build tag faultinject: in normal builds
// At is a no-op, and no environment variable can make a production binary
// fail. With the tag, LIVEUPDATE_FAULT="point=action[,point=action…]"
// arms it; actions:
//
//	fail       At returns an error (the code's own error path runs)
//	kill       the process SIGKILLs itself (nothing after runs: recover)
//	killqemu   At calls the registered QEMU killer (an old QEMU dies by itself)
//	killnew    At calls the registered killer of the new QEMU of the VM the
//	           point is reached for (AtFor's subject): a new QEMU dies
//	fill       At fills the state directory's filesystem (a full disk)
//	corrupt    At cuts the manifest short, keeping it whole beside (update)
//	losetoken  At moves the LUO tokens of guest $LIVEUPDATE_FAULT_VM in the
//	           manifest to ones no session keeps (update; after kexec-record)
//
// Points are the names passed to At, listed in Points.
package fault

import "fmt"

// Points are the boundaries the engine and the update mark, in order: each
// is the end of the phase of that name (package phase fires them).
var Points = []string{
	"plan",           // restart/update: planned, nothing touched
	"kexec-load",     // update: new kernel loaded
	"prepare",        // VMs recorded, fds taken over, nothing written
	"manifest",       // first manifest written, nothing saved
	"early-start",    // restart: new QEMUs started beside the old ones
	"migrate-setup",  // every old QEMU set up for the save, none stopped
	"handover",       // restart: a guest's cpr-transfer begun (its migrate accepted), not ended
	"save",           // every guest saved, the saves not recorded
	"saved",          // every guest saved and recorded, none quit
	"manifest-write", // inside an atomic manifest write, before its rename
	"quit",           // every old QEMU quit
	"qemu-start",     // a new QEMU started, state not loaded
	"load",           // a state loaded, guest not continued
	"save-guests",    // update: every guest saved and quit
	"remount-ro",     // update: filesystems read-only but the state directory's, not recorded
	"kexec-record",   // update: the manifest records the kexec
	"state-ro",       // update: the state directory's filesystem (PMEM) read-only too, just before the reboot
}

// Error is what an injected "fail" returns.
type Error struct{ Point string }

func (e *Error) Error() string { return fmt.Sprintf("injected fault at %s", e.Point) }
