package hoststate

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/netsetup"
	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

func TestTapInfos(t *testing.T) {
	const (
		tap   = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR
		multi = tap | unix.IFF_MULTI_QUEUE
	)
	tapFd := func(name string, flags uint16) manifest.Fd {
		return manifest.Fd{Num: 3, Kind: qemuargv.FdTap, TapName: name, TapFlags: flags}
	}
	for _, tc := range []struct {
		name   string
		guests []Guest
		want   map[string]netsetup.TapInfo
	}{
		{"none", nil, map[string]netsetup.TapInfo{}},
		{"one fd", []Guest{{Name: "vm1", Fds: []manifest.Fd{tapFd("vnet0", tap)}}},
			map[string]netsetup.TapInfo{"vnet0": {Flags: tap, Queues: 1}}},
		{"persistence left out", []Guest{{Name: "vm1", Fds: []manifest.Fd{tapFd("vnet0", tap|unix.IFF_PERSIST)}}},
			map[string]netsetup.TapInfo{"vnet0": {Flags: tap, Queues: 1}}},
		{"one fd per queue", []Guest{{Name: "vm1", Fds: []manifest.Fd{tapFd("vnet0", multi), tapFd("vnet0", multi), tapFd("vnet1", tap)}}},
			map[string]netsetup.TapInfo{"vnet0": {Flags: multi, Queues: 2}, "vnet1": {Flags: tap, Queues: 1}}},
		{"other fds ignored", []Guest{{Name: "vm1", Fds: []manifest.Fd{{Num: 4, Kind: qemuargv.FdChardev, SocketPath: "/run/x"}}}},
			map[string]netsetup.TapInfo{}},
		{"netdev by name", []Guest{{Name: "vm1", Netdevs: []qemuargv.Netdev{{ID: "n0", Type: "tap", Ifname: "vnet0"}}}},
			map[string]netsetup.TapInfo{"vnet0": {Flags: tap, Queues: 1}}},
		{"netdev by name, one queue", []Guest{{Name: "vm1", Netdevs: []qemuargv.Netdev{{ID: "n0", Type: "tap", Ifname: "vnet0", Queues: 1}}}},
			map[string]netsetup.TapInfo{"vnet0": {Flags: tap, Queues: 1}}},
		{"netdev by name, multi-queue", []Guest{{Name: "vm1", Netdevs: []qemuargv.Netdev{{ID: "n0", Type: "tap", Ifname: "vnet0", Queues: 4}}}},
			map[string]netsetup.TapInfo{"vnet0": {Flags: multi, Queues: 4}}},
		{"netdev on fds is the fds'", []Guest{{Name: "vm1", Fds: []manifest.Fd{tapFd("vnet0", tap)},
			Netdevs: []qemuargv.Netdev{{ID: "n0", Type: "tap", Ifname: "vnet0", FDs: []int{3}}}}},
			map[string]netsetup.TapInfo{"vnet0": {Flags: tap, Queues: 1}}},
		{"fd wins over a netdev of the same name", []Guest{{Name: "vm1", Fds: []manifest.Fd{tapFd("vnet0", multi), tapFd("vnet0", multi)},
			Netdevs: []qemuargv.Netdev{{ID: "n0", Type: "tap", Ifname: "vnet0"}}}},
			map[string]netsetup.TapInfo{"vnet0": {Flags: multi, Queues: 2}}},
		{"netdev without ifname", []Guest{{Name: "vm1", Netdevs: []qemuargv.Netdev{{ID: "n0", Type: "tap"}}}},
			map[string]netsetup.TapInfo{}},
		{"user netdev", []Guest{{Name: "vm1", Netdevs: []qemuargv.Netdev{{ID: "n0", Type: "user", Ifname: "x"}}}},
			map[string]netsetup.TapInfo{}},
		{"own namespace is not the host's", []Guest{
			{Name: "vm1", NetNS: "guests", Fds: []manifest.Fd{tapFd("vnet0", tap)}, Netdevs: []qemuargv.Netdev{{Type: "tap", Ifname: "vnet9"}}},
			{Name: "vm2", Fds: []manifest.Fd{tapFd("vnet1", tap)}}},
			map[string]netsetup.TapInfo{"vnet1": {Flags: tap, Queues: 1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tapInfos(tc.guests); !reflect.DeepEqual(got, tc.want) {
				t.Errorf("tapInfos = %+v, want %+v", got, tc.want)
			}
		})
	}
}

// cgroupTree makes a directory that reads like a cgroup2 mount to
// cgroupv2.Capture: /machine.slice/{vm1,vm2} with some limits.
func cgroupTree(t *testing.T) string {
	root := t.TempDir()
	files := map[string]string{
		"cgroup.subtree_control":                         "cpu memory",
		"machine.slice/cgroup.subtree_control":           "cpu",
		"machine.slice/memory.max":                       "max",
		"machine.slice/cpu.max":                          "50000 100000",
		"machine.slice/vm1/cgroup.subtree_control":       "",
		"machine.slice/vm1/memory.max":                   "1073741824",
		"machine.slice/vm2/cgroup.subtree_control":       "",
		"machine.slice/vm2/pids.max":                     "100",
		"machine.slice/vm2/cpu.weight":                   "100",
		"machine.slice/elsewhere/cgroup.subtree_control": "",
		"machine.slice/elsewhere/memory.max":             "1",
	}
	for f, v := range files {
		p := filepath.Join(root, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestCaptureCgroups(t *testing.T) {
	root := cgroupTree(t)
	var logged bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logged, nil))
	got := captureCgroups(root, []Guest{
		{Name: "vm2", Cgroup: "/machine.slice/vm2"},
		{Name: "vm0"}, // no cgroup recorded
		{Name: "vm1", Cgroup: "/machine.slice/vm1"},
		{Name: "gone", Cgroup: "/machine.slice/gone"},
	}, log)
	want := []manifest.Cgroup{
		{Path: "/", Controllers: []string{"cpu", "memory"}, Limits: map[string]string{}},
		{Path: "/machine.slice", Controllers: []string{"cpu"}, Limits: map[string]string{"cpu.max": "50000 100000"}},
		{Path: "/machine.slice/vm1", Controllers: []string{}, Limits: map[string]string{"memory.max": "1073741824"}},
		{Path: "/machine.slice/vm2", Controllers: []string{}, Limits: map[string]string{"pids.max": "100"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("captureCgroups =\n%+v\nwant\n%+v", got, want)
	}
	if !strings.Contains(logged.String(), "level=WARN") || !strings.Contains(logged.String(), "vm=gone") {
		t.Errorf("a missing cgroup is not a warning naming its guest:\n%s", logged.String())
	}
	if got := captureCgroups(root, []Guest{{Name: "vm0"}}, log); got != nil {
		t.Errorf("no cgroups recorded: %+v", got)
	}
}

// Without a cgroup2 mount and without host taps there is nothing to record,
// and nothing is touched.
func TestCaptureNothing(t *testing.T) {
	log := slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil))
	cgs, n := Capture(cgroupTree(t), []Guest{
		{Name: "vm1", Cgroup: "/machine.slice/vm1"},
		{Name: "vm2", NetNS: "guests", Fds: []manifest.Fd{{Kind: qemuargv.FdTap, TapName: "vnet0"}}},
	}, log)
	if cgs != nil || len(n.Bridges) != 0 || len(n.Taps) != 0 {
		t.Errorf("Capture = %+v, %+v; want nothing", cgs, n)
	}
}

// A manifest without host state rebuilds nothing, and needs no root.
func TestRebuildNothing(t *testing.T) {
	m := &manifest.Manifest{}
	if taps, missing, err := RebuildNetwork(m); taps != nil || missing != nil || err != nil {
		t.Errorf("RebuildNetwork = %v, %v, %v", taps, missing, err)
	}
	if cgs, err := RebuildCgroups(m); cgs != nil || err != nil {
		t.Errorf("RebuildCgroups = %v, %v", cgs, err)
	}
	if _, err := Build(manifest.Network{}, nil); err != nil {
		t.Errorf("Build of nothing: %v", err)
	}
}
