//go:build !faultinject

package fault

// At marks a phase boundary. Without the faultinject build tag it does
// nothing.
func At(point string) error { return nil }

// AtFor is At for one VM's boundary; it does nothing either.
func AtFor(point, subject string) error { return nil }

// Enabled tells whether this binary was built with fault injection.
const Enabled = false

// On registers what an action such as "killqemu" does; a no-op here.
func On(action string, f func(point, subject string)) {}
