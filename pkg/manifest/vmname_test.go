package manifest

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestCheckVMName(t *testing.T) {
	for _, tc := range []struct {
		name string
		want string // substring of the error; "" means accepted
	}{
		{"vm1", ""},
		{"pid-1234", ""},
		{"my vm (prod)", ""},
		{"vm.é", ""},
		{"...", ""},
		{strings.Repeat("v", MaxVMNameLen), ""},
		{"", "is empty"},
		{".", "path element"},
		{"..", "path element"},
		{"a/b", "holds '/'"},
		{"/", "holds '/'"},
		{"a\x00b", "NUL"},
		{"a\tb", "control character U+0009"},
		{"a\x7f", "control character U+007F"},
		{"a\u0085", "control character U+0085"},
		{"a\xff", "not valid UTF-8"},
		{strings.Repeat("v", MaxVMNameLen+1), "more than 64"},
		{strings.Repeat("é", 33), "more than 64"}, // 66 bytes
	} {
		err := CheckVMName(tc.name)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("CheckVMName(%q) = %v, want accepted", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("CheckVMName(%q) = %v, want %q", tc.name, err, tc.want)
		case err != nil && !strings.Contains(err.Error(), "-name"):
			t.Errorf("CheckVMName(%q) = %v: does not say how to fix it", tc.name, err)
		}
	}
}

// FuzzCheckVMName: a name it accepts is safe as a file name in the state
// directory and survives the manifest's JSON unchanged.
func FuzzCheckVMName(f *testing.F) {
	for _, s := range []string{"vm1", "..", "a/b", "a\x00", "\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		if CheckVMName(name) != nil {
			return
		}
		if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") ||
			len(name) > MaxVMNameLen || !utf8.ValidString(name) {
			t.Fatalf("accepted %q", name)
		}
	})
}
