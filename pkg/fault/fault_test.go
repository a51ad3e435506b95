//go:build faultinject

package fault

import (
	"errors"
	"testing"
)

func TestAt(t *testing.T) {
	t.Setenv("LIVEUPDATE_FAULT", "saved=fail,quit=killqemu,manifest-write@2=fail")
	if err := At("plan"); err != nil {
		t.Errorf("unarmed point failed: %v", err)
	}
	var fe *Error
	if err := At("saved"); !errors.As(err, &fe) || fe.Point != "saved" {
		t.Errorf("armed point: %v", err)
	}
	if err := At("saved"); err != nil {
		t.Errorf("a point fires once: %v", err)
	}
	if At("manifest-write") != nil || At("manifest-write") == nil || At("manifest-write") != nil {
		t.Errorf("@2 must fire on the second time only")
	}
	killed := ""
	On("killqemu", func(p, _ string) { killed = p })
	At("quit")
	if killed != "quit" {
		t.Errorf("killqemu did not call the killer")
	}
	t.Setenv("LIVEUPDATE_FAULT", "load@2=killnew")
	var victim string
	On("killnew", func(_, vm string) { victim = vm })
	AtFor("load", "vm1")
	AtFor("load", "vm2")
	if victim != "vm2" {
		t.Errorf("killnew at the second load: killed %q, want vm2's new QEMU", victim)
	}
	t.Setenv("LIVEUPDATE_FAULT", "save:vm2=fail")
	if AtFor("save", "vm1") != nil || AtFor("save", "vm2") == nil || AtFor("save", "vm2") != nil {
		t.Errorf("save:vm2 must fire for vm2 alone, once")
	}
}
