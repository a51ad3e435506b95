package cpr

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/liveupdate/liveupdate/pkg/fault"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
	"github.com/liveupdate/liveupdate/pkg/qemuproc"
	"github.com/liveupdate/liveupdate/pkg/qmp"
)

// cpr-transfer (restart-qemu only): QEMU's own QEMU-to-QEMU handover. The
// new QEMU, started early with a main and a cpr -incoming channel, waits on
// the cpr socket before it creates any device. The old QEMU's migrate sends
// it the RAM's fds there while the guest still runs, waits until the new
// QEMU has created its devices, then stops the guest and streams the device
// state over the main socket: the blackout is that save and load alone, no
// file written or read. The guest's RAM stays where it is either way.
//
// QEMU allows it only for a guest started with -machine aux-ram-share=on
// (its own RAM blocks shared too) whose RAM backends are all shared; every
// other guest goes the cpr-reboot way, as does one whose QEMU refuses the
// migrate (a blocker): nothing has stopped then.
//
// The new QEMU runs without -S, as in QEMU's own cpr-transfer: it runs the
// guest the moment its load ends, with no round trip of ours in the
// blackout. What -S gave cpr-reboot — knowing whether a new QEMU may have
// run the guest — comes from its run trace (-trace runstate_set to a file
// of the state directory): QEMU writes "… (running)" there before any vCPU
// or device resumes, and the line outlives the process. Hence the rules:
//   - once the old QEMU has handed the guest over (its migrate completed),
//     the guest is the new QEMU's: it is never stopped while it may still
//     run it, and a failure after that point, ours or another guest's, is
//     rolled forward (rollForward): the restart finished there, the old
//     QEMU killed;
//   - an old QEMU is continued only if its migrate failed (QEMU continues
//     the guest by itself then) or its new QEMU ended, or was stopped, with
//     no such line in its trace;
//   - a new QEMU that ran the guest and died loses it: its old QEMU's
//     device state is behind the RAM, and it is never continued.
// recover judges a cut-off transfer by the same rules; with no state file
// to load again, a guest whose old QEMU is gone can be taken only by its
// new one.

// twinStarted tells whether vm's cpr-transfer twin ran the guest: its run
// trace (-trace runstate_set) says it entered running. QEMU writes that line
// before any vCPU or device resumes, and it stays when QEMU dies; so a twin
// stopped or dead without it never touched the guest, and its old QEMU may
// go on.
func (r *run) twinStarted(vm *manifest.VM) bool {
	if vm.Transfer == nil || vm.Transfer.Trace == "" {
		return false
	}
	b, err := os.ReadFile(r.local(vm.Transfer.Trace))
	return err == nil && qemuproc.StartedGuest(string(b))
}

// transferNote is StateFile's content for a guest restarted by cpr-transfer.
const transferNote = "cpr-transfer: this guest's device state went to its new QEMU over a socket; there is nothing here to load.\n"

// whyNoTransfer says why the guest cannot be restarted by cpr-transfer, or
// "" when it can.
func whyNoTransfer(c *qemuargv.Cmdline, vm *manifest.VM, version [3]int) string {
	switch {
	case version[0] < 10:
		return fmt.Sprintf("QEMU %d.%d has no cpr-transfer (10.0 and later)", version[0], version[1])
	case vm.Libvirt != nil:
		return "libvirt manages it"
	case vm.CopyRAM:
		return "its RAM is copied (--copy-ram)"
	case !c.AuxRAMShare():
		return "it was started without -machine aux-ram-share=on"
	}
	for _, b := range vm.RAM {
		if !b.Share || b.Type == "memory-backend-ram" {
			return fmt.Sprintf("memory backend %s is not shared memory", b.ID)
		}
	}
	return ""
}

// planTransfer records the channels of a guest that can go by cpr-transfer
// (o.Transfer asks for it, o.EarlyStart gives it a new QEMU beside the old).
// A guest whose RAM is a memfd can go no other way (unless its RAM is
// copied): if this run cannot take it so, it is refused, nothing touched.
func (r *run) planTransfer(t *Target, rec *manifest.VM, o SaveOptions) error {
	why := ""
	switch {
	case !o.Transfer:
		why = "cpr-transfer is turned off (--no-transfer, or an update across kexec)"
	case !o.EarlyStart:
		why = "this run starts no new QEMU beside the old one (--sequential)"
	default:
		why = whyNoTransfer(t.Proc.Cmdline, rec, t.Facts.Version)
	}
	base := strings.TrimSuffix(string(rec.StateFile), ".state")
	tr := &manifest.Transfer{Main: hostpath.QEMU(base + ".main.sock"), CPR: hostpath.QEMU(base + ".cpr.sock"),
		Trace: hostpath.QEMU(base + ".run.trace")}
	const sunPath = 107 // sockaddr_un's sun_path, less its NUL
	tooLong := why == "" && (len(r.local(tr.Main)) > sunPath || len(tr.Main) > sunPath)
	if tooLong {
		why = fmt.Sprintf("the state directory's path is too long for cpr-transfer's unix sockets (%s)", tr.Main)
	}
	if why == "" {
		rec.Transfer = tr
		return nil
	}
	if id := memfdBackend(rec); id != "" && !rec.CopyRAM {
		return fmt.Errorf("memory backend %q is a memfd, which only QEMU's cpr-transfer hands to a new QEMU, and %s: nothing was touched", id, why)
	}
	switch {
	case tooLong: // asked for and possible but for our path: say so
		r.Log.Warn("restarting the cpr-reboot way", "vm", rec.Name, "why", why)
	case o.Transfer && o.EarlyStart:
		r.Log.Debug("restarting the cpr-reboot way", "vm", rec.Name, "why", why)
	}
	return nil
}

// memfdBackend is the id of a memory-backend-memfd of the guest, or "":
// its RAM lives only as long as some process holds the memfd.
func memfdBackend(vm *manifest.VM) string {
	for _, b := range vm.RAM {
		if b.Type == "memory-backend-memfd" {
			return b.ID
		}
	}
	return ""
}

// startTransfer starts a guest's new QEMU for cpr-transfer and waits until
// it listens on its cpr channel. Its monitor comes up only once the old
// QEMU's migrate began (dialTransfer).
func (r *run) startTransfer(ctx context.Context, vm *manifest.VM, files map[int]*os.File, argv []string) (*newQEMU, error) {
	tr := vm.Transfer
	for _, p := range []hostpath.QEMU{tr.Main, tr.CPR, tr.Trace} {
		os.Remove(r.local(p)) // ours, left by an earlier run (settled: this one planned the guest running)
	}
	c, err := qemuargv.Parse(argv)
	if err != nil {
		return nil, err
	}
	q, err := r.spawnQEMU(vm, files, c.WithTransfer(string(tr.Main), string(tr.CPR), string(tr.Trace)).Argv())
	if err != nil {
		return nil, err
	}
	err = r.timed("qemu-init", vm.Name, func() error {
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		// Listening, not just bound: QEMU binds, then listens, and a
		// migrate in between is refused ("Connection refused", seen under
		// load), which would send the guest the cpr-reboot way.
		for !r.listens(q.p.Pid, tr.CPR) {
			select {
			case <-q.p.Exited():
				return fmt.Errorf("new QEMU exited before it listened on its cpr channel: %w", q.p.ExitErr())
			case <-ctx.Done():
				return fmt.Errorf("waiting for the new QEMU's cpr channel %s: %w", tr.CPR, ctx.Err())
			case <-tick.C:
			}
		}
		return nil
	})
	if err != nil {
		q.stop()
		vm.NewPID = 0
		return nil, r.withQEMUsWords(vm, err)
	}
	q.setUp = true // its mode comes over the cpr channel
	return q, nil
}

// listens tells whether QEMU pid listens on the unix socket at path (its
// view); where its /proc/PID/net/unix cannot be read, that the file is
// there.
func (r *run) listens(pid int, path hostpath.QEMU) bool {
	ok, err := qemuproc.UnixListening(r.ProcRoot, pid, string(path))
	if err != nil {
		return fileExists(r.local(path))
	}
	return ok
}

// dialed is the new QEMU's monitor, reached while the old QEMU hands over.
type dialed struct {
	c   *qmp.Client
	err error
}

// dialTransfer reaches the new QEMU's monitor in the background, once the
// old QEMU's migrate has sent the cpr state: QEMU creates its devices and
// monitors then, while the guest still runs on the old one, and that time
// stays out of the blackout.
func (r *run) dialTransfer(ctx context.Context, vm *manifest.VM, q *newQEMU) {
	q.dialing = make(chan dialed, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.RestoreTimeout)
		defer cancel()
		var d dialed
		d.err = r.timed("qemu-init", vm.Name, func() (err error) {
			d.c, err = qemuproc.DialQMP(ctx, r.local(vm.QMP), q.p)
			return err
		})
		if d.err == nil {
			r.place(ctx, d.c, vm, q.p.Pid, true, nil)
		}
		q.dialing <- d
	}()
}

// monitor is the new QEMU's monitor: dialled by startQEMU, or waited for
// from dialTransfer.
func (q *newQEMU) monitor(ctx context.Context) (*qmp.Client, error) {
	if q.c != nil || q.dialing == nil {
		return q.c, nil
	}
	select {
	case d := <-q.dialing:
		q.dialing = nil
		q.c = d.c
		return d.c, d.err
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for the new QEMU's monitor: %w", ctx.Err())
	}
}

// saveTransfer is saveOne for a guest going by cpr-transfer: the old QEMU
// migrates to its new twin over both channels. A migrate QEMU refuses (the
// guest has not stopped) falls back to cpr-reboot: the twin is stopped, and
// the guest is saved to its state file and restarted the sequential way.
func (r *run) saveTransfer(ctx context.Context, t *Target) (fellBack bool, err error) {
	vm, c := t.rec, t.QMP
	q := r.earlyOf(vm.Name)
	if q == nil {
		return false, fmt.Errorf("%s: no new QEMU waits for its cpr-transfer", t.Name())
	}
	// The note first: written after the handover it would be in the
	// blackout. (recover never loads a transfer's state file.)
	if err := os.WriteFile(r.local(vm.StateFile), []byte(transferNote), 0o600); err != nil {
		return false, fmt.Errorf("%s: writing the note that stands for its state file: %w", t.Name(), err)
	}
	mark := len(c.Events())
	args := map[string]any{"channels": []any{
		qemuargv.TransferChannel("main", string(vm.Transfer.Main)),
		qemuargv.TransferChannel("cpr", string(vm.Transfer.CPR)),
	}}
	if err := c.Execute(ctx, "migrate", args, nil); err != nil {
		var qe *qmp.Error
		if !errors.As(err, &qe) {
			return false, fmt.Errorf("%s: migrate (cpr-transfer): %w", t.Name(), err)
		}
		if id := memfdBackend(vm); id != "" && !vm.CopyRAM {
			// cpr-reboot would leave the memfd's RAM with the old QEMU.
			return false, fmt.Errorf("%s: QEMU refuses cpr-transfer (%w), the only way its memfd RAM (backend %q) reaches a new QEMU: it stays on its QEMU", t.Name(), err, id)
		}
		r.Log.Warn("QEMU refuses cpr-transfer for this guest; saving it the cpr-reboot way", "vm", t.Name(), "qemu_said", err.Error())
		r.dropEarly(vm)
		os.Remove(r.local(vm.StateFile)) // the note: the state file proper comes next
		t.early, vm.Transfer = false, nil
		if err := migrateSetup(ctx, c, vm); err != nil {
			return true, fmt.Errorf("%s: setting cpr-reboot up after QEMU refused cpr-transfer: %w", t.Name(), err)
		}
		return true, nil
	}
	r.dialTransfer(ctx, vm, q)
	if err := fault.AtFor("handover", t.Name()); err != nil {
		return false, err // the handover goes on: the undo waits for its end (rollForward)
	}
	if err := waitMigration(ctx, c, "handing "+t.Name()+" over (cpr-transfer)"); err != nil {
		// The new QEMU's end is the likelier reason: it says why in its log.
		select {
		case <-q.p.Exited():
			return false, r.withQEMUsWords(vm, fmt.Errorf("%w; the new QEMU pid %d ended (%v)", err, q.p.Pid, q.p.ExitErr()))
		case <-time.After(time.Second):
			return false, err
		}
	}
	for _, ev := range c.Events()[mark:] {
		if ev.Name == "STOP" {
			vm.Stopped = ev.Time
			break
		}
	}
	r.Log.Info("handed over (cpr-transfer)", "vm", t.Name())
	return false, nil
}

// earlyOf is the VM's early-started QEMU, left in place.
func (r *run) earlyOf(name string) *newQEMU {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.early[name]
}

// waitLoaded waits until a new QEMU that takes its guest by cpr-transfer has
// loaded the device state. Its MIGRATION events (on from its command line,
// the monitor reached before the stream began) usually say so already; if
// none has, the load may have ended before the monitor was reached, and it
// is asked.
func waitLoaded(ctx context.Context, c *qmp.Client, vm *manifest.VM) error {
	for _, ev := range c.Events() {
		if ev.Name != "MIGRATION" {
			continue
		}
		switch ev.Data["status"] {
		case "completed":
			return nil
		case "failed", "cancelled":
			return waitMigration(ctx, c, "loading "+vm.Name+" (cpr-transfer)") // says why
		}
	}
	var st struct {
		Status    string `json:"status"`
		ErrorDesc string `json:"error-desc"`
	}
	if err := c.Execute(ctx, "query-migrate", nil, &st); err != nil {
		return err
	}
	switch st.Status {
	case "completed":
		return nil
	case "failed", "cancelled":
		return fmt.Errorf("loading %s (cpr-transfer) %s: %s", vm.Name, st.Status, st.ErrorDesc)
	}
	return waitMigration(ctx, c, "loading "+vm.Name+" (cpr-transfer)")
}

// takeTransferred sees a cpr-transfer through on the new QEMU, which has had
// the guest since the old one's handover: with no -S it runs the guest the
// moment its load ends, as QEMU's own cpr-transfer does — no cont of ours
// in the blackout. c and err are its monitor and the error of reaching it.
//
// So it is never stopped while it may still run the guest. On a failure —
// ours (a timeout, its monitor, a fault) or QEMU's (a load refused, the
// process gone) — its run trace decides: a new QEMU that ran the guest keeps
// it, even unconfirmed (recover looks again), and its old QEMU is never
// continued; one that ended, or is stopped after waiting for it, without
// having run it leaves the guest to its old QEMU (retireOld continues it).
func (r *run) takeTransferred(ctx context.Context, vm *manifest.VM, q *newQEMU, c *qmp.Client, err error) error {
	if err == nil {
		err = r.timedPoint("load", vm.Name, func() error { return waitLoaded(ctx, c, vm) })
	}
	if err == nil && vm.WasRunning {
		err = r.confirmTransferred(ctx, c, vm)
	}
	if err == nil {
		vm.Status = manifest.StatusRestored
		return nil
	}
	if ran, stopped := r.awaitStart(ctx, vm, q); !ran {
		if stopped {
			err = fmt.Errorf("%w; the new QEMU pid %d was stopped", err, q.p.Pid)
		} else {
			err = q.diedFirst(err) // "… ended (how) before it ran the guest"
		}
		q.stop() // gone already: reaped, its monitor closed
		vm.NewPID = 0
		return r.withQEMUsWords(vm, fmt.Errorf("%w; it never ran the guest (its run trace %s says so)", err, vm.Transfer.Trace))
	}
	vm.Status = manifest.StatusRestored // its old QEMU is behind it now, whatever comes
	select {
	case <-q.p.Exited():
		return r.withQEMUsWords(vm, fmt.Errorf("%w; the new QEMU pid %d ran the guest and then ended (%v): the guest is lost with it. Its old QEMU's device state is behind the guest's RAM, so it is not continued; the RAM file is left as it is", err, q.p.Pid, q.p.ExitErr()))
	default:
	}
	if c != nil {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.QMPTimeout)
		cerr := r.confirmTransferred(cctx, c, vm)
		cancel()
		if cerr == nil {
			r.Log.Warn("cpr-transfer: the new QEMU runs the guest despite an error on the way", "vm", vm.Name, "err", err)
			return nil
		}
	}
	return r.loadedNotRunning(vm, err)
}

// confirmTransferred checks that the new QEMU, its load done, runs the guest
// — it started it by itself — and conts it if QEMU left it paused (its disks
// not taken back at once, say). The blackout's end is when its run trace
// says it entered running (stamped by QEMU, microseconds after its RESUME
// event): that event came before the monitor was reached when the load was
// quicker (seen once in seven restarts under --no-realtime); the event is
// taken only if the trace has no time.
func (r *run) confirmTransferred(ctx context.Context, c *qmp.Client, vm *manifest.VM) error {
	b, _ := os.ReadFile(r.local(vm.Transfer.Trace))
	if at, ok := qemuproc.StartedAt(string(b)); ok {
		vm.Resumed = at
	} else {
		for _, ev := range c.Events() {
			if ev.Name == "RESUME" {
				vm.Resumed = ev.Time
			}
		}
	}
	var st struct {
		Running bool
		Status  string
	}
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
		return fmt.Errorf("query-status after the load: %w", err)
	}
	if st.Running {
		return nil
	}
	if st.Status != "paused" {
		return fmt.Errorf("guest is %q after its load, not running", st.Status)
	}
	r.Log.Warn("the new QEMU loaded the guest but left it paused; cont", "vm", vm.Name)
	if err := c.Execute(ctx, "cont", nil, nil); err != nil {
		return fmt.Errorf("cont after the load: %w", err)
	}
	return r.confirmRunning(ctx, c, vm)
}

// awaitStart waits until the twin q has run the guest (its trace says so:
// ran) or has ended; one that never does in time (ctx), or whose guest
// was paused before the run (it never starts it), is stopped first
// (stopped) — a stopped QEMU cannot start the guest, so the trace read
// after is final.
func (r *run) awaitStart(ctx context.Context, vm *manifest.VM, q *newQEMU) (ran, stopped bool) {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for vm.WasRunning && !r.twinStarted(vm) {
		select {
		case <-q.p.Exited():
			return r.twinStarted(vm), false
		case <-ctx.Done():
			q.stop()
			return r.twinStarted(vm), true
		case <-tick.C:
			continue
		}
	}
	if !vm.WasRunning {
		q.stop()
		return r.twinStarted(vm), true
	}
	return true, false
}

// handedOver tells whether t's old QEMU has handed its guest over to its
// new QEMU by cpr-transfer: its migrate completed — the new QEMU has the
// whole state and runs the guest the moment it has loaded it. A migrate
// still under way is waited for, as long as a save may take, never
// cancelled: its end decides. An old QEMU that no longer answers (gone)
// may have handed over before: while its twin lives, the twin decides.
func (r *run) handedOver(ctx context.Context, t *Target) bool {
	q := r.earlyOf(t.Name())
	if t.rec == nil || t.rec.Transfer == nil || q == nil || t.QMP == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, r.SaveTimeout)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		var st struct{ Status string }
		if err := t.QMP.Execute(ctx, "query-migrate", nil, &st); err != nil {
			select {
			case <-q.p.Exited():
				return false
			default:
				return ctx.Err() == nil
			}
		}
		switch st.Status {
		case "completed":
			return true
		case "", "none", "failed", "cancelled":
			return false // never began, or failed: QEMU continues the guest there
		}
		select {
		case <-ctx.Done():
			return false // the twin is stopped next, before its old QEMU goes on
		case <-tick.C:
		}
	}
}

// rollForward finishes, instead of undoing, the restart of each guest of
// ts that cpr-transfer has handed over to its new QEMU (handedOver): that
// QEMU runs the guest the moment its load ends, so stopping it could lose
// the guest and continuing the old QEMU beside it would run the guest
// twice. Such a guest is restored on its new QEMU (takeTransferred), its
// old QEMU killed, and it is marked forward: the undos after leave it
// alone. One whose new QEMU ended without running it goes back to its old
// QEMU with the others.
func (r *run) rollForward(ctx context.Context, ts []*Target) error {
	var errs []error
	for _, t := range ts {
		if t.forward || !r.handedOver(ctx, t) {
			continue
		}
		r.Log.Warn("the guest was handed over to its new QEMU (cpr-transfer) before the failure: its restart is finished there", "vm", t.Name())
		t.rec.Status = manifest.StatusSaved
		if t.rec.Stopped.IsZero() { // the blackout's start: the handover's STOP, the last
			for _, ev := range t.QMP.Events() {
				if ev.Name == "STOP" {
					t.rec.Stopped = ev.Time
				}
			}
		}
		err := r.restoreVM(ctx, t.rec, nil, nil)
		if t.rec.NewPID == 0 && !r.consumed(t.rec) {
			// Its twin is gone (restoreOne took it from the early ones):
			// the old QEMU's sockets come back here, not in dropEarly.
			r.dropTransferSockets(t.rec)
			putBack(r.ownPaths(t.rec))
			r.Log.Warn("its new QEMU never ran the guest: it goes back to its old QEMU", "vm", t.Name(), "why", err)
			continue
		}
		t.forward = true
		if err != nil {
			errs = append(errs, err)
		}
		if kerr := errors.Join(r.killOld(t), r.reapOld([]*Target{t})); kerr != nil {
			errs = append(errs, kerr)
		}
		if verr := r.handVNC(ctx, []*Target{t}); verr != nil {
			errs = append(errs, verr)
		}
	}
	return errors.Join(errs...)
}

// dropTransferSockets removes a finished transfer's listening sockets (the
// new QEMU's, listening no more).
func (r *run) dropTransferSockets(vm *manifest.VM) {
	if vm.Transfer == nil {
		return
	}
	for _, p := range []hostpath.QEMU{vm.Transfer.Main, vm.Transfer.CPR} {
		os.Remove(r.local(p))
	}
}

// guestStillOnOld tells whether vm's old QEMU, asked at its monitor moved
// aside, still holds the guest: it answers, and has not stopped it for a
// handover (postmigrate, finish-migrate).
func (r *run) guestStillOnOld(vm *manifest.VM) bool {
	ctx, cancel := context.WithTimeout(context.Background(), r.QMPTimeout)
	defer cancel()
	c, err := qmp.DialPeerCheck(ctx, r.local(vm.QMP)+asideSuffix, vm.PID, nil)
	if err != nil {
		return false
	}
	defer c.Close()
	var st struct{ Status string }
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
		return false
	}
	return st.Status != "postmigrate" && st.Status != "finish-migrate"
}
