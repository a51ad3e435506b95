package preflight

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// fixture is a QEMU 10.0 guest as recorded in testdata/drift: its argv and
// the replies of the queries gatherFacts makes.
type fixture struct {
	Argv           []string       `json:"argv"`
	Block          []BlockInfo    `json:"query-block"`
	BlockNodes     []BlockNode    `json:"query-named-block-nodes"`
	Peripheral     []QOMChild     `json:"qom-list /machine/peripheral"`
	PeripheralAnon []QOMChild     `json:"qom-list /machine/peripheral-anon"`
	BlockJobs      []BlockJob     `json:"query-block-jobs"`
	MemoryDevices  []MemoryDevice `json:"query-memory-devices"`
}

func loadFixture(t *testing.T, name string) fixture {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "drift", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var f fixture
	if err := json.Unmarshal(b, &f); err != nil {
		t.Fatal(err)
	}
	return f
}

func TestDrift(t *testing.T) {
	tests := []struct {
		name    string
		fixture string
		argv    func([]string) []string // changes to the recorded argv
		want    []string                // substrings of the problems, in order; none means no problem
		notes   []string                // substrings of the notes
	}{
		{name: "plain -drive", fixture: "drive"},
		{name: "disk hot-plugged", fixture: "drive-hotplug",
			want: []string{"disk scsi-disk1 (node disk1, /vm/disk1.img) was hot-plugged at run time and is not on the command line"}},
		{name: "disk unplugged again", fixture: "drive-unplugged"},
		{name: "external snapshot of a -drive", fixture: "drive-snapshot",
			want: []string{"disk disk0's active image is now /vm/overlay.qcow2 (an external snapshot over /vm/base.img), but the command line opens /vm/base.img"}},
		{name: "mirror job", fixture: "drive-mirror",
			want: []string{"a mirror block job on drive0 is ready"}},
		{name: "memory hot-plugged", fixture: "drive-dimm",
			// (its backend, query-memdev's, is preflight.go's)
			want: []string{"memory device dimm1 (pc-dimm, 128 MiB, backend mem1) was hot-plugged"}},
		{name: "libvirt -blockdev, backing chain, throttle, empty CD-ROM", fixture: "libvirt"},
		{name: "libvirt external snapshot under the throttle node", fixture: "libvirt-snapshot",
			want: []string{"disk virtio-disk0's active image is now /vm/lv-snap.qcow2 (an external snapshot over /vm/lv-top.qcow2), but the command line opens /vm/lv-top.qcow2"}},
		{name: "pc defaults: -hda, empty CD-ROM and floppy, if=virtio with snapshot=on", fixture: "defaults",
			want: []string{"drive virtio0 (-drive /vm/snap.img) has snapshot=on"}},
		{name: "pc defaults without snapshot=on", fixture: "defaults",
			argv: func(a []string) []string { return replaceArg(a, ",snapshot=on", "") },
			// The recorded QEMU did have the temporary overlay: to the
			// comparison, an external snapshot.
			want: []string{"drive virtio0's active image is now /var/tmp/vl.32LJZ3 (an external snapshot over /vm/snap.img), but the command line opens /vm/snap.img"}},
		{name: "q35: if=virtio, if=none without medium, legacy throttling", fixture: "q35"},
		{name: "device of the command line unplugged", fixture: "drive",
			argv: func(a []string) []string { return append(a, "-device", "virtio-rng-pci,id=rng0") },
			want: []string{"device rng0 (virtio-rng-pci) of the command line was unplugged at run time"}},
		{name: "device hot-plugged", fixture: "drive",
			argv: func(a []string) []string { return replaceArg(a, "virtio-scsi-pci,id=scsi0", "virtio-scsi-pci") },
			want: []string{"device scsi0 (virtio-scsi-pci) was hot-plugged at run time"}},
		{name: "device without id hot-plugged", fixture: "q35",
			argv: func(a []string) []string { return replaceArg(a, "if=virtio,", "if=none,id=virtio0,") },
			want: []string{"devices without id were hot-plugged at run time: 1× virtio-blk-pci"}},
		// -device's short names (virtio-serial, virtio-blk) are listed by
		// QOM under their type (…-pci): not a hot-plug.
		{name: "id-less device by its alias", fixture: "q35",
			argv: func(a []string) []string {
				return append(replaceArg(a, "if=virtio,", "if=none,id=virtio0,"), "-device", "virtio-blk,drive=virtio0")
			}},
		{name: "id-less device on the command line", fixture: "q35",
			argv: func(a []string) []string {
				return replaceArg(a, "virtio-net-pci,id=net0", "virtio-blk-pci,drive=empty0")
			},
			want: []string{"device net0 (virtio-net-pci) was hot-plugged"}},
		{name: "relative image path", fixture: "drive",
			argv: func(a []string) []string { return replaceArg(a, "file=/vm/base.img", "file=base.img") }},
		{name: "a different image", fixture: "drive",
			argv: func(a []string) []string { return replaceArg(a, "file=/vm/base.img", "file=/vm/other.img") },
			want: []string{"disk disk0's image is now /vm/base.img, but the command line opens /vm/other.img"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := loadFixture(t, tt.fixture)
			argv := f.Argv
			if tt.argv != nil {
				argv = tt.argv(append([]string{}, argv...))
			}
			c, err := qemuargv.Parse(argv)
			if err != nil {
				t.Fatal(err)
			}
			var probs, notes []string
			drift(c, "/vm", &Runtime{Block: f.Block, BlockNodes: f.BlockNodes, Peripheral: f.Peripheral,
				PeripheralAnon: f.PeripheralAnon, BlockJobs: f.BlockJobs, MemoryDevices: f.MemoryDevices},
				func(format string, a ...any) { probs = append(probs, fmt.Sprintf(format, a...)) },
				func(format string, a ...any) { notes = append(notes, fmt.Sprintf(format, a...)) })
			t.Logf("problems: %q\nnotes: %q", probs, notes)
			if len(probs) != len(tt.want) {
				t.Fatalf("%d problems %q, want %d like %q", len(probs), probs, len(tt.want), tt.want)
			}
			for i, w := range tt.want {
				if !strings.Contains(probs[i], w) {
					t.Errorf("problem %d = %q, want it to say %q", i, probs[i], w)
				}
			}
			for _, w := range tt.notes {
				if !strings.Contains(strings.Join(notes, "\n"), w) {
					t.Errorf("notes %q lack %q", notes, w)
				}
			}
		})
	}
}

func replaceArg(argv []string, old, new string) []string {
	for i, a := range argv {
		argv[i] = strings.Replace(a, old, new, 1)
	}
	return argv
}

// TestCheckDrift: Check runs the comparison when gatherFacts got the
// run-time configuration, and refuses when it could not be had.
func TestCheckDrift(t *testing.T) {
	f := loadFixture(t, "drive-hotplug")
	rt := &Runtime{Block: f.Block, BlockNodes: f.BlockNodes, Peripheral: f.Peripheral, PeripheralAnon: f.PeripheralAnon}
	for _, tt := range []struct {
		name  string
		facts func(*Facts)
		want  string
	}{
		{name: "hot-plugged", facts: func(f *Facts) { f.Runtime = rt }, want: "disk scsi-disk1 (node disk1"},
		{name: "not asked", facts: func(f *Facts) {}, want: ""},
		{name: "query failed", facts: func(f *Facts) { f.RuntimeErr = fmt.Errorf("query-block: boom") }, want: "cannot compare the devices and disks"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			fs := facts()
			tt.facts(&fs)
			v := Check(Input{Proc: proc(t, f.Argv[1:]...), Facts: fs})
			got := strings.Join(v.Problems, "\n")
			if tt.want == "" && (strings.Contains(got, "hot-plugged") || strings.Contains(got, "cannot compare")) || !strings.Contains(got, tt.want) {
				t.Errorf("problems %q, want %q", v.Problems, tt.want)
			}
		})
	}
}
