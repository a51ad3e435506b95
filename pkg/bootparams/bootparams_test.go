package bootparams

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		cmdline string
		want    func(*Params)
		wantErr string
	}{
		{name: "defaults", cmdline: "console=ttyS0 quiet", want: func(p *Params) {}},
		{name: "full", cmdline: `BOOT_IMAGE=/vmlinuz memmap=512M!1G lu.pmem=/dev/pmem0 lu.pmem_mount=/pmem lu.root=LABEL=hostroot lu.rootflags="errors=remount-ro" lu.dhcp=eth0 lu.handover=1 lu.modules=kvm,kvm_amd lu.devwait=30s`,
			want: func(p *Params) {
				p.PMEM, p.PMEMMount, p.Root, p.RootFlags, p.DHCP, p.Handover = "/dev/pmem0", "/pmem", "LABEL=hostroot", "errors=remount-ro", "eth0", true
				p.Modules, p.DevWait, p.Manifest = []string{"kvm", "kvm_amd"}, 30*time.Second, "/pmem/liveupdate/manifest.json"
			}},
		{name: "control", cmdline: "lu.control=/dev/ttyS1", want: func(p *Params) { p.Control = "/dev/ttyS1" }},
		{name: "control not a device", cmdline: "lu.control=/tmp/x", wantErr: "want a device under /dev"},
		{name: "unknown", cmdline: "lu.pmme=/dev/pmem0", wantErr: `unknown kernel parameter "lu.pmme"`},
		{name: "twice", cmdline: "lu.pmem=/dev/pmem0 lu.pmem=/dev/pmem1", wantErr: "given twice"},
		{name: "no value", cmdline: "lu.handover", wantErr: "needs a value"},
		{name: "relative", cmdline: "lu.manifest=x/y", wantErr: "clean absolute path"},
		{name: "dotdot", cmdline: "lu.manifest=/a/../b", wantErr: "clean absolute path"},
		{name: "bad bool", cmdline: "lu.handover=maybe lu.root=/dev/vda", wantErr: "want 1 or 0"},
		{name: "bad root", cmdline: "lu.root=vda1", wantErr: "UUID="},
		{name: "format without pmem", cmdline: "lu.format_pmem=1", wantErr: "without lu.pmem"},
		{name: "handover without root", cmdline: "lu.handover=1", wantErr: "needs lu.root"},
		{name: "bad devwait", cmdline: "lu.devwait=-1s", wantErr: "between"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse(tt.cmdline)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := Params{PMEMMount: DefaultPMEMMount, RootFSType: "ext4", Init: DefaultInit, DevWait: DefaultDevWait,
				Manifest: "/mnt/pmem/liveupdate/manifest.json"}
			tt.want(&want)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("got  %+v\nwant %+v", got, want)
			}
			// Words reproduces the parameters.
			again, err := Parse(strings.Join(quoteWords(got.Words()), " "))
			if err != nil || !reflect.DeepEqual(again, got) {
				t.Fatalf("Words round trip: %v\n%+v\n%+v", err, again, got)
			}
		})
	}
}

func FuzzParse(f *testing.F) {
	f.Add(`lu.pmem=/dev/pmem0 lu.root=UUID=1234 lu.dhcp=eth0 lu.handover=1 console=ttyS0`)
	f.Add(`lu.rootflags="a b" lu.modules=a,b,c "quoted word"`)
	f.Fuzz(func(t *testing.T, s string) {
		p, err := Parse(s)
		if err != nil {
			return
		}
		if p.Manifest == "" || p.PMEMMount == "" {
			t.Fatalf("defaults missing: %+v", p)
		}
		again, err := Parse(strings.Join(quoteWords(p.Words()), " "))
		if err != nil {
			t.Fatalf("Words do not parse: %v (%q)", err, p.Words())
		}
		if !reflect.DeepEqual(again, p) {
			t.Fatalf("Words round trip:\n%+v\n%+v", again, p)
		}
	})
}

// quoteWords quotes values with spaces the way a command-line writer must.
func quoteWords(ws []string) []string {
	var out []string
	for _, w := range ws {
		k, v, _ := strings.Cut(w, "=")
		if strings.ContainsAny(v, " \t\n") {
			w = k + `="` + v + `"`
		}
		out = append(out, w)
	}
	return out
}
