package qmp

import (
	"testing"
)

func TestDecodeReply(t *testing.T) {
	var st struct {
		Running bool
		Status  string
	}
	if err := decodeReply([]byte(`{"return": {"running": true, "status": "running"}}`), &st); err != nil || !st.Running || st.Status != "running" {
		t.Errorf("decodeReply = %+v, %v", st, err)
	}
	for _, bad := range []string{``, `{}`, `{"error": {"class": "GenericError"}}`, `{"return": 5}`, `[`} {
		if err := decodeReply([]byte(bad), &st); err == nil {
			t.Errorf("decodeReply(%q) accepted", bad)
		}
	}
}

// FuzzDecodeReply: replies come from QEMU processes, which a guest may
// have compromised; no reply may panic the decoder.
func FuzzDecodeReply(f *testing.F) {
	f.Add([]byte(`{"return": {"running": true, "status": "running"}}`))
	f.Add([]byte(`{"return": {"status": "completed", "error-desc": "x"}}`))
	f.Add([]byte(`{"return": [{"id": "ram0", "size": 268435456, "share": true}]}`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		var st struct {
			Running bool
			Status  string
		}
		decodeReply(raw, &st)
		var q struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		decodeReply(raw, &q)
		var mem []map[string]any
		decodeReply(raw, &mem)
	})
}
