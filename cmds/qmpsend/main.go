// Command qmpsend runs one QMP command on a QEMU's monitor socket and prints
// its reply's return value as JSON. The nested tests use it inside their
// host, which has no QMP client of its own:
//
//	qmpsend SOCKET COMMAND [JSON-ARGUMENTS]
//	qmpsend /run/vm.qmp query-status        → {"running":false,"status":"paused"}
//
// Exit status 1 if QEMU answers with an error (printed) or does not answer
// within -timeout; 2 on a usage error.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/liveupdate/liveupdate/pkg/qmp"
)

func main() {
	timeout := flag.Duration("timeout", 30*time.Second, "deadline for the connection and the reply")
	flag.Usage = func() {
		fmt.Fprintln(flag.CommandLine.Output(), "usage: qmpsend [-timeout D] SOCKET COMMAND [JSON-ARGUMENTS]")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() < 2 || flag.NArg() > 3 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if err := send(ctx, os.Stdout, flag.Arg(0), flag.Arg(1), flag.Arg(2)); err != nil {
		fmt.Fprintln(os.Stderr, "qmpsend:", err)
		os.Exit(1)
	}
}

// send runs cmd with args (JSON; "" for none) on the monitor at sock and
// writes the reply's return value to out.
func send(ctx context.Context, out io.Writer, sock, cmd, args string) error {
	var a any
	if args != "" {
		var m map[string]any
		if err := json.Unmarshal([]byte(args), &m); err != nil {
			return fmt.Errorf("arguments %q are not a JSON object: %w", args, err)
		}
		a = m
	}
	c, err := qmp.Dial(ctx, sock)
	if err != nil {
		return err
	}
	defer c.Close()
	var ret json.RawMessage
	if err := c.Execute(ctx, cmd, a, &ret); err != nil {
		return err
	}
	_, err = fmt.Fprintf(out, "%s\n", ret)
	return err
}
