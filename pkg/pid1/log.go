package pid1

import (
	"io"
	"log/slog"
	"os"
)

// kmsgWriter writes each log record as one /dev/kmsg entry, so PID 1's log
// survives in the kernel ring buffer (dmesg) next to the kernel's own.
type kmsgWriter struct{ f *os.File }

func (k kmsgWriter) Write(p []byte) (int, error) {
	// <7> (KERN_DEBUG) keeps the kernel from echoing the record to the
	// console, where the handler already wrote it; dmesg shows it.
	if _, err := k.f.Write(append([]byte("<7>liveupdate: "), p...)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// newLogger logs to the console and to /dev/kmsg.
func newLogger() *slog.Logger {
	var w []io.Writer
	if c, err := os.OpenFile("/dev/console", os.O_WRONLY, 0); err == nil {
		w = append(w, c)
	} else {
		w = append(w, os.Stderr)
	}
	if k, err := os.OpenFile("/dev/kmsg", os.O_WRONLY, 0); err == nil {
		w = append(w, kmsgWriter{k})
	}
	return slog.New(slog.NewTextHandler(io.MultiWriter(w...), &slog.HandlerOptions{Level: slog.LevelInfo}))
}
