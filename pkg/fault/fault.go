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
//	killqemu   At calls the registered QEMU killer (a QEMU dies by itself)
//	fill       At fills the state directory's filesystem (a full disk)
//
// Points are the names passed to At, listed in Points.
package fault

import "fmt"

// Points are the boundaries the engine and the update mark, in order.
var Points = []string{
	"plan",           // restart/update: planned, nothing touched
	"kexec-load",     // update: new kernel loaded
	"manifest",       // first manifest written, nothing saved
	"early-start",    // restart: new QEMUs started beside the old ones
	"saved",          // every guest saved, none quit
	"manifest-write", // inside an atomic manifest write, before its rename
	"quit",           // every old QEMU quit
	"qemu-start",     // a new QEMU started, state not loaded
	"load",           // a state loaded, guest not continued
	"remount-ro",     // update: filesystems read-only but PMEM
	"kexec",          // update: just before the reboot
}

// Error is what an injected "fail" returns.
type Error struct{ Point string }

func (e *Error) Error() string { return fmt.Sprintf("injected fault at %s", e.Point) }
