package runlock

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSecondHolderIsTold(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lock")
	l, err := Acquire(p, "update --kernel k")
	if err != nil {
		t.Fatal(err)
	}
	// flock locks are per open file description: a second open in this
	// process conflicts just like another process would.
	_, err = Acquire(p, "restart-qemu")
	if err == nil || !strings.Contains(err.Error(), `"update --kernel k"`) || !strings.Contains(err.Error(), "another liveupdate is running") {
		t.Fatalf("second Acquire: %v", err)
	}
	l.Release()
	l2, err := Acquire(p, "restart-qemu")
	if err != nil {
		t.Fatalf("after Release: %v", err)
	}
	l2.Release()
}

// A holder that dies (here: flock(1), killed; -o keeps the lock out of its sleep) leaves no stale
// lock behind.
func TestDeadHolderReleases(t *testing.T) {
	if _, err := exec.LookPath("flock"); err != nil {
		t.Skip("no flock(1)")
	}
	p := filepath.Join(t.TempDir(), "lock")
	os.WriteFile(p, nil, 0o600)
	cmd := exec.Command("flock", "-x", "-o", p, "sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err := Acquire(p, "x")
		if err != nil {
			break // the child holds it
		}
		l.Release()
		if time.Now().After(deadline) {
			t.Fatal("child never took the lock")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Kill()
	cmd.Wait()
	l, err := Acquire(p, "x")
	if err != nil {
		t.Fatalf("lock stale after its holder died: %v", err)
	}
	l.Release()
}
