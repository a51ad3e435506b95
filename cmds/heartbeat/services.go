package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// moduleList names the kernel modules the NIC needs, dependencies first
// (written by scripts/guest-initrd.sh).
const moduleList = "/etc/hb-modules"

// setupNetwork loads the NIC's modules and gives eth0 its address.
func setupNetwork(cidr string) error {
	if b, err := os.ReadFile(moduleList); err == nil {
		for _, m := range strings.Fields(string(b)) {
			if err := loadModule(m); err != nil {
				return fmt.Errorf("module %s: %w", m, err)
			}
		}
	}
	var l netlink.Link
	var err error
	for i := 0; i < 200; i++ { // the NIC appears once its driver probed
		if l, err = netlink.LinkByName("eth0"); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("eth0: %w", err)
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	if err := netlink.AddrReplace(l, addr); err != nil {
		return err
	}
	if lo, err := netlink.LinkByName("lo"); err == nil {
		netlink.LinkSetUp(lo)
	}
	return netlink.LinkSetUp(l)
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	flags := 0
	if strings.HasSuffix(path, ".xz") || strings.HasSuffix(path, ".zst") || strings.HasSuffix(path, ".gz") {
		flags = unix.MODULE_INIT_COMPRESSED_FILE
	}
	if err := unix.FinitModule(int(f.Fd()), "", flags); err != nil && err != unix.EEXIST {
		return err
	}
	return nil
}

// serveEcho echoes every line back, for as long as the client stays.
func serveEcho(out io.Writer, addr string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(out, "HEARTBEAT echo: %v\n", err)
		return
	}
	for {
		c, err := l.Accept()
		if err != nil {
			continue
		}
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				b, err := r.ReadBytes('\n')
				if len(b) > 0 {
					if _, werr := c.Write(b); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// served counts the state server's answers (the heartbeat line shows it: a
// test that gets none can tell a guest that does not answer from answers
// that do not arrive).
var served atomic.Uint64

// serveState answers each connection with one line and closes it.
func serveState(out io.Writer, addr string, line func() string) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(out, "HEARTBEAT state: %v\n", err)
		return
	}
	for {
		c, err := l.Accept()
		if err != nil {
			continue
		}
		served.Add(1)
		fmt.Fprintln(c, line())
		c.Close()
	}
}

// runGuestAgent starts qemu-ga on the agent's virtio-serial port, and again
// whenever it exits. Without a port or the binary it does nothing.
func runGuestAgent(out io.Writer) {
	bin := "/usr/sbin/qemu-ga"
	if _, err := os.Stat(bin); err != nil {
		return
	}
	// The port appears once virtio-serial probed: under nested emulation
	// that can take minutes.
	port := ""
	for i := 0; i < 6000 && port == ""; i++ {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			if b, _ := os.ReadFile(n); strings.TrimSpace(string(b)) == "org.qemu.guest_agent.0" {
				port = "/dev/" + filepath.Base(filepath.Dir(n))
			}
		}
		if port == "" {
			time.Sleep(50 * time.Millisecond)
		}
	}
	if port == "" {
		return
	}
	os.MkdirAll("/var/run", 0o755)
	for {
		fmt.Fprintf(out, "HEARTBEAT guest agent on %s\n", port)
		cmd := exec.Command(bin, "-m", "virtio-serial", "-p", port, "-t", "/var/run")
		cmd.Env = []string{"PATH=/sbin:/bin:/usr/sbin:/usr/bin"}
		cmd.Stdout, cmd.Stderr = out, out
		err := cmd.Run()
		fmt.Fprintf(out, "HEARTBEAT guest agent exited: %v\n", err)
		time.Sleep(time.Second)
	}
}
