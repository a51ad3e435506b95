package pid1

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"syscall"

	"golang.org/x/sys/unix"
)

// controlLoop serves lu.control: a serial line (a second console a test
// harness or an out-of-band manager is wired to) that takes one shell command
// per line, runs it with the rescue shell, and answers with its output and a
// "@@LU-EXIT <code>@@" line. It is how a headless host is driven without a
// network; it runs as long as PID 1 does.
func (b *Boot) controlLoop(dev string) {
	f, err := os.OpenFile(dev, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		b.Log.Error("control line", "dev", dev, "err", err)
		return
	}
	rawTTY(f)
	fmt.Fprintf(f, "@@LU-CONTROL ready@@\n")
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		b.Log.Info("control command", "cmd", line)
		cmd := exec.Command(RescueSh, "-c", line)
		cmd.Stdout, cmd.Stderr = f, f
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		code := 0
		if child, err := b.reaper.Start(cmd); err != nil {
			fmt.Fprintf(f, "%v\n", err)
			code = 127
		} else if ws, _ := child.Wait(context.Background()); ws.Exited() {
			code = ws.ExitStatus()
		} else {
			code = -1 // killed by a signal (exec.ExitError.ExitCode's answer)
		}
		fmt.Fprintf(f, "\n@@LU-EXIT %d@@\n", code)
	}
	b.Log.Error("control line closed", "dev", dev, "err", sc.Err())
}

// rawTTY turns off echo and line editing so commands and output pass as
// they are.
func rawTTY(f *os.File) {
	t, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	if err != nil {
		return
	}
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Iflag &^= unix.ICRNL | unix.INLCR | unix.IGNCR | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Cc[unix.VMIN], t.Cc[unix.VTIME] = 1, 0
	unix.IoctlSetTermios(int(f.Fd()), unix.TCSETS, t)
}
