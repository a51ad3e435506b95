package main

import (
	"context"
	"io"
	"path/filepath"
	"strings"
	"testing"
)

// Arguments must be a JSON object (QMP's "arguments"); a bad one is
// refused before any monitor is touched, and a missing monitor is named.
func TestSendErrors(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "none.qmp")
	for _, c := range []struct{ name, args, want string }{
		{"array", `[1]`, "not a JSON object"},
		{"not JSON", `{status: 1}`, "not a JSON object"},
		{"no monitor", `{"a": 1}`, missing},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := send(context.Background(), io.Discard, missing, "cont", c.args)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("send: %v, want an error saying %q", err, c.want)
			}
		})
	}
}
