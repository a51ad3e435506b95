// Package phase runs an operation as a table of named steps: each step is
// one function with one job and, next to it, its undo. The runner times
// every step, marks the fault point of the same name once the step is done
// (fault injection builds only), and on a failure runs the undos of the
// steps already begun in reverse order, so that the table itself says what
// is given back when.
//
// PID 1's boot, the CPR engine's save and the kernel update are such tables.
package phase

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/liveupdate/liveupdate/pkg/fault"
)

// Step is one named phase of an operation.
type Step struct {
	Name string
	// Do is the step's one job.
	Do func(ctx context.Context) error
	// Undo gives back what Do did — also what a Do that failed half-way
	// did, so it must cope with a partial Do; nil when there is nothing
	// to give back. Undos run newest first.
	Undo func(ctx context.Context) error
	// Optional: a failure is recorded and reported, and the steps after it
	// run all the same (PID 1: one guest's failed restore must not keep
	// the others from running). Nothing is undone for it.
	Optional bool
}

// Record is told every step's name, start, end and error, in order.
type Record func(name string, start, end time.Time, err error)

// Error is a failed step, with what its undos said.
type Error struct {
	Step    string
	Err     error // the step's own error
	UndoErr error // what the undos returned (nil: all given back)
}

func (e *Error) Error() string {
	if e.UndoErr != nil {
		return fmt.Sprintf("%s: %v (undoing: %v)", e.Step, e.Err, e.UndoErr)
	}
	return fmt.Sprintf("%s: %v", e.Step, e.Err)
}

func (e *Error) Unwrap() []error { return []error{e.Err, e.UndoErr} }

// Run runs the steps in order. When a step that is not Optional fails (its
// Do, or the fault point after it), the undos of that step and of every
// step before it run in reverse and Run returns an *Error; the failures of
// Optional steps are joined into the error returned at the end.
func Run(ctx context.Context, rec Record, steps ...Step) error {
	var soft []error
	for i, s := range steps {
		err := runOne(ctx, rec, s)
		if err == nil {
			continue
		}
		if s.Optional {
			soft = append(soft, fmt.Errorf("%s: %w", s.Name, err))
			continue
		}
		// The undos are not cut short by a cancellation that may be what
		// made the step fail.
		return &Error{Step: s.Name, Err: err, UndoErr: Undo(context.WithoutCancel(ctx), steps[:i+1])}
	}
	return errors.Join(soft...)
}

// runOne runs one step and its fault point, and records it.
func runOne(ctx context.Context, rec Record, s Step) error {
	start := time.Now()
	err := s.Do(ctx)
	if err == nil {
		err = fault.At(s.Name)
	}
	if rec != nil {
		rec(s.Name, start, time.Now(), err)
	}
	return err
}

// Undo runs the undos of steps, newest first, every one of them even when
// some fail, and joins their errors.
func Undo(ctx context.Context, steps []Step) error {
	var errs []error
	for i := len(steps) - 1; i >= 0; i-- {
		if u := steps[i].Undo; u != nil && !steps[i].Optional {
			if err := u(ctx); err != nil {
				errs = append(errs, fmt.Errorf("undoing %s: %w", steps[i].Name, err))
			}
		}
	}
	return errors.Join(errs...)
}
