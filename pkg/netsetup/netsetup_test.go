package netsetup

import (
	"context"
	"net"
	"os"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/internal/dhcptest"
	"github.com/liveupdate/liveupdate/pkg/manifest"
	"github.com/liveupdate/liveupdate/pkg/tapdev"
)

func netns(t *testing.T, name string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	exec.Command("ip", "netns", "del", name).Run()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	return "/run/netns/" + name
}

// TestCaptureApply records a bridge with an address and an uplink port and
// a multi-queue tap on it, deletes them, and builds them again.
func TestCaptureApply(t *testing.T) {
	ns := netns(t, "lu-netsetup")
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_MULTI_QUEUE)
	err := tapdev.InNetNS(ns, func() error {
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
		}
		must(LoopbackUp())
		mustApply := func(n manifest.Network) {
			t.Helper()
			missing, err := Apply(n)
			must(err)
			if len(missing) > 0 {
				t.Fatalf("ports left out: %v", missing)
			}
		}
		// tearDown deletes the bridge and the tap, and keeps the uplink.
		tearDown := func() {
			t.Helper()
			for _, n := range []string{"vnet-lu", "br-lu"} {
				l, err := netlink.LinkByName(n)
				must(err)
				must(netlink.LinkDel(l))
			}
		}
		want := manifest.Network{
			Bridges: []manifest.Bridge{{Name: "br-lu", MAC: "02:00:00:00:00:01", MTU: 1400, Addrs: []string{"10.77.0.1/24"}, Ports: []string{"uplink"},
				PortMACs: map[string]string{"uplink": "02:00:00:00:00:0a"}, Up: true}},
			Taps: []manifest.Tap{{Name: "vnet-lu", MAC: "fe:54:00:00:00:02", MTU: 1400, Flags: flags, Queues: 2, Master: "br-lu", Up: true}},
		}
		mac, _ := net.ParseMAC("02:00:00:00:00:0a")
		must(netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "uplink", MTU: 1400, HardwareAddr: mac}, PeerName: "uplink-peer"}))
		mustApply(want)
		got, err := Capture(map[string]TapInfo{"vnet-lu": {Flags: flags, Queues: 2}})
		must(err)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("captured\n%+v\nwant\n%+v", got, want)
		}
		// Tear down the bridge and tap, keep the uplink, and rebuild.
		tearDown()
		mustApply(got)
		again, err := Capture(map[string]TapInfo{"vnet-lu": {Flags: flags, Queues: 2}})
		must(err)
		if !reflect.DeepEqual(again, want) {
			t.Fatalf("rebuilt\n%+v\nwant\n%+v", again, want)
		}
		// PID 1's two halves: GuestSide builds the bridge and the tap on
		// it and leaves the uplink alone (down, no master); Uplinks then
		// attaches it and brings it up, as Apply does in one go.
		tearDown()
		ul, err := netlink.LinkByName("uplink")
		must(err)
		must(netlink.LinkSetDown(ul))
		must(GuestSide(got))
		ul, err = netlink.LinkByName("uplink")
		must(err)
		if ul.Attrs().MasterIndex != 0 || ul.Attrs().Flags&net.FlagUp != 0 {
			t.Fatalf("GuestSide touched the uplink: master %d, flags %v", ul.Attrs().MasterIndex, ul.Attrs().Flags)
		}
		tl, err := netlink.LinkByName("vnet-lu")
		must(err)
		if br, err := netlink.LinkByName("br-lu"); err != nil || tl.Attrs().MasterIndex != br.Attrs().Index || tl.Attrs().Flags&net.FlagUp == 0 {
			t.Fatalf("after GuestSide the tap is not up on the bridge: %+v, %v", tl.Attrs(), err)
		}
		if missing, err := Uplinks(got); err != nil || len(missing) > 0 {
			t.Fatalf("Uplinks: missing %q, err %v", missing, err)
		}
		halves, err := Capture(map[string]TapInfo{"vnet-lu": {Flags: flags, Queues: 2}})
		must(err)
		if !reflect.DeepEqual(halves, want) {
			t.Fatalf("built in two halves\n%+v\nwant\n%+v", halves, want)
		}
		ul, err = netlink.LinkByName("uplink")
		must(err)
		if ul.Attrs().Flags&net.FlagUp == 0 {
			t.Fatalf("Uplinks left the uplink down")
		}
		// After a kexec PID 1 has no udev: the uplink NIC comes up under
		// another (the kernel's) name. It is found by its address and
		// named as recorded.
		tearDown()
		up, err := netlink.LinkByName("uplink")
		must(err)
		must(netlink.LinkSetName(up, "eth7"))
		mustApply(got)
		renamed, err := Capture(map[string]TapInfo{"vnet-lu": {Flags: flags, Queues: 2}})
		must(err)
		if !reflect.DeepEqual(renamed, want) {
			t.Fatalf("rebuilt with the uplink renamed\n%+v\nwant\n%+v", renamed, want)
		}
		if _, err := netlink.LinkByName("eth7"); err == nil {
			t.Fatalf("eth7 still there: the uplink was not named back")
		}
		// A port whose address no link has (a bond or VLAN the host makes
		// later, a stopped guest's tap): left out and named, not an error —
		// the bridge is built with the ports that are there, and the tap
		// joins it.
		lost := got
		lost.Bridges = []manifest.Bridge{got.Bridges[0]}
		lost.Bridges[0].Ports = []string{"gone0", "uplink"}
		lost.Bridges[0].PortMACs = map[string]string{"gone0": "02:00:00:00:00:99", "uplink": got.Bridges[0].PortMACs["uplink"]}
		tearDown()
		missing, err := Apply(manifest.Network{Bridges: lost.Bridges, Taps: got.Taps})
		if err != nil || len(missing) != 1 || !strings.Contains(missing[0], "port gone0 left out") || !strings.Contains(missing[0], "no link has its address 02:00:00:00:00:99") {
			t.Fatalf("Apply with a missing port: missing %q, err %v", missing, err)
		}
		partial, err := Capture(map[string]TapInfo{"vnet-lu": {Flags: flags, Queues: 2}})
		must(err)
		if !reflect.DeepEqual(partial, want) {
			t.Fatalf("rebuilt without the missing port\n%+v\nwant\n%+v", partial, want)
		}
		// A tap on the bridge that no guest of the run holds (a stopped
		// guest's, left persistent) is no port to make again.
		stale, err := tapdev.Open("vnet-old", flags)
		must(err)
		must(tapdev.SetPersist(stale, true))
		stale.Close()
		sl, err := netlink.LinkByName("vnet-old")
		must(err)
		br, err := netlink.LinkByName("br-lu")
		must(err)
		must(netlink.LinkSetMaster(sl, br))
		withStale, err := Capture(map[string]TapInfo{"vnet-lu": {Flags: flags, Queues: 2}})
		must(err)
		if !reflect.DeepEqual(withStale, want) {
			t.Fatalf("captured with a stale tap on the bridge\n%+v\nwant\n%+v", withStale, want)
		}
		must(netlink.LinkDel(sl))
		// The rebuilt tap takes a second queue, as QEMU's fds would.
		f1, err := tapdev.Open("vnet-lu", flags)
		must(err)
		defer f1.Close()
		f2, err := tapdev.Open("vnet-lu", flags)
		must(err)
		defer f2.Close()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Read back from the kernel, through a sysfs of that namespace: `ip
	// netns exec` mounts one for the helper it runs.
	exe, _ := os.Executable()
	cmd := exec.Command("ip", "netns", "exec", "lu-netsetup", exe, "-test.run=^TestVerifyHelper$", "-test.v")
	cmd.Env = append(os.Environ(), "NETSETUP_VERIFY_HELPER=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestVerifyHelper") {
		t.Fatalf("read-back in the namespace failed: %v\n%s", err, out)
	}
}

// TestVerifyHelper runs inside the namespace of TestCaptureApply.
func TestVerifyHelper(t *testing.T) {
	if os.Getenv("NETSETUP_VERIFY_HELPER") != "1" {
		t.Skip("helper of TestCaptureApply")
	}
	flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_MULTI_QUEUE)
	want := manifest.Network{Taps: []manifest.Tap{{Name: "vnet-lu", MAC: "fe:54:00:00:00:02", MTU: 1400, Flags: flags, Queues: 2, Master: "br-lu", Up: true}}}
	got, err := Verify(want)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].Flags&flags != flags || got[0].Flags&unix.IFF_PERSIST == 0 {
		t.Fatalf("read back %+v", got)
	}
	want.Taps[0].MAC = "fe:54:00:00:00:09"
	if _, err := Verify(want); err == nil {
		t.Fatal("Verify missed a wrong MAC")
	}
}

// TestDHCP gets a lease over a veth pair from the test's own DHCP server in
// another namespace.
func TestDHCP(t *testing.T) {
	srvNS := netns(t, "lu-dhcp-srv")
	cliNS := netns(t, "lu-dhcp-cli")
	if out, err := exec.Command("ip", "-n", "lu-dhcp-srv", "link", "add", "vsrv", "type", "veth", "peer", "name", "vcli", "netns", "lu-dhcp-cli").CombinedOutput(); err != nil {
		t.Fatalf("veth: %v %s", err, out)
	}
	exec.Command("ip", "-n", "lu-dhcp-srv", "addr", "add", "10.78.0.1/24", "dev", "vsrv").Run()
	exec.Command("ip", "-n", "lu-dhcp-srv", "link", "set", "vsrv", "up").Run()
	var srv *dhcptest.Server
	err := tapdev.InNetNS(srvNS, func() error {
		var err error
		srv, err = dhcptest.Start("vsrv", net.IPv4(10, 78, 0, 1), net.IPv4(10, 78, 0, 2), net.CIDRMask(24, 32))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	var lease *Lease
	err = tapdev.InNetNS(cliNS, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		var err error
		lease, err = DHCP(ctx, "vcli")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if lease.Addr != "10.78.0.2/24" || lease.Router != "10.78.0.1" {
		t.Fatalf("lease %+v", lease)
	}
	out, _ := exec.Command("ip", "-n", "lu-dhcp-cli", "-4", "route", "show", "default").Output()
	if len(out) == 0 || !strings.Contains(string(out), "via 10.78.0.1") {
		t.Errorf("default route not set: %q", out)
	}
	if srv.Acks() != 1 {
		t.Errorf("server acked %d leases", srv.Acks())
	}
}
