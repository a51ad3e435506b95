package cpr

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/discover"
	"github.com/liveupdate/liveupdate/pkg/hostpath"
	"github.com/liveupdate/liveupdate/pkg/preflight"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// fakeProcRoot writes a /proc tree of QEMUs: pid → argv (space-separated).
func fakeProcRoot(t *testing.T, procs map[int]string) string {
	t.Helper()
	root := t.TempDir()
	for pid, argv := range procs {
		dir := filepath.Join(root, strconv.Itoa(pid))
		for _, err := range []error{
			os.MkdirAll(filepath.Join(dir, "fd"), 0o755),
			os.WriteFile(filepath.Join(dir, "cmdline"), []byte(strings.ReplaceAll(argv, " ", "\x00")+"\x00"), 0o644),
			os.WriteFile(filepath.Join(dir, "status"), []byte("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"), 0o644),
			os.Symlink("/usr/bin/qemu-system-x86_64", filepath.Join(dir, "exe")),
			os.Symlink("/", filepath.Join(dir, "cwd")),
		} {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	return root
}

// Two QEMUs of one -name are each refused, naming both pids; the other VMs
// are planned; recover (twins) still sees both as one guest's.
func TestPlanDuplicateNames(t *testing.T) {
	root := fakeProcRoot(t, map[int]string{
		100: "qemu-system-x86_64 -name dup",
		101: "qemu-system-x86_64 -name solo",
		102: "qemu-system-x86_64 -name dup",
	})
	for _, tc := range []struct {
		name     string
		twins    bool
		args     []string
		wantDups int // verdicts with the duplicate problem
	}{
		{"plan: all", false, nil, 2},
		{"plan: the duplicate by name", false, []string{"dup"}, 2},
		{"plan: one of them by pid", false, []string{"100"}, 0},
		{"recover: twins allowed", true, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := New(hostpath.QEMU(t.TempDir()), nil)
			e.ProcRoot = root
			ts, err := e.newRun().plan(context.Background(), tc.args, tc.twins)
			if err != nil {
				t.Fatalf("plan = %v, want verdicts", err)
			}
			dups := 0
			for _, tg := range ts {
				joined := strings.Join(tg.Verdict.Problems, "\n")
				if strings.Contains(joined, "are all called") {
					dups++
					if tg.Verdict.OK || !strings.Contains(joined, `QEMU processes 100, 102 are all called "dup"`) || !strings.Contains(joined, "unique -name") {
						t.Errorf("verdict of pid %d: %+v", tg.Proc.PID, tg.Verdict)
					}
				}
				if tg.Name() == "solo" && (strings.Contains(joined, "called") || len(tg.Verdict.Problems) == 0) {
					t.Errorf("solo was not planned as usual: %+v", tg.Verdict)
				}
			}
			if dups != tc.wantDups {
				t.Errorf("%d verdicts name the duplicate, want %d", dups, tc.wantDups)
			}
		})
	}
}

// TestMatchAnswers: two QEMUs of one guest on one listening socket passed
// by fd, each dial accepted by the other: each target gets back what its
// own QEMU said.
func TestMatchAnswers(t *testing.T) {
	proc := func(pid int) *discover.Process {
		c, err := qemuargv.Parse([]string{"qemu", "-name", "g"})
		if err != nil {
			t.Fatal(err)
		}
		return &discover.Process{PID: pid, Cmdline: c}
	}
	old := &Target{Proc: proc(10), Facts: preflight.Facts{AnsweredBy: 20, Status: "running"}}
	twin := &Target{Proc: proc(20), Facts: preflight.Facts{AnsweredBy: 10, Status: "paused"}}
	other := &Target{Proc: proc(30), Facts: preflight.Facts{AnsweredBy: 30, Status: "running"}}
	matchAnswers([]*Target{old, twin, other})
	if old.Facts.AnsweredBy != 10 || old.Facts.Status != "paused" || twin.Facts.AnsweredBy != 20 || twin.Facts.Status != "running" || other.Facts.AnsweredBy != 30 {
		t.Errorf("after matchAnswers: old %+v, twin %+v", old.Facts, twin.Facts)
	}
}
