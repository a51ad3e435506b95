// Package machined talks to systemd-machined over the system bus: which
// machine a process belongs to, and creating a machine (with its scope unit)
// for a running process — the two calls libvirt itself makes of machined
// when it starts a guest and when it reconnects to one.
package machined

import (
	"context"
	"errors"
	"fmt"

	"github.com/godbus/dbus/v5"
)

const (
	dest = "org.freedesktop.machine1"
	path = dbus.ObjectPath("/org/freedesktop/machine1")
	// ErrNoMachineForPID is machined's answer for a process in no machine.
	errNoMachineForPID = "org.freedesktop.machine1.NoMachineForPID"
)

// Conn is a connection to the system bus.
type Conn struct{ bus *dbus.Conn }

// Dial connects to the system bus.
func Dial(ctx context.Context) (*Conn, error) {
	bus, err := dbus.ConnectSystemBus(dbus.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("connecting to the system bus: %w", err)
	}
	return &Conn{bus: bus}, nil
}

// Close closes the connection.
func (c *Conn) Close() error { return c.bus.Close() }

// Machine is what machined records of a machine, as libvirt creates it.
type Machine struct {
	Name    string   // e.g. "qemu-1-vm1"
	UUID    [16]byte // the domain's UUID
	Service string   // the creator, e.g. "libvirt-qemu"
	Class   string   // "vm" or "container"
	Leader  int      // the QEMU's pid
	Slice   string   // the scope's slice, e.g. "machine.slice"
	Before  []string // the scope is ordered before these units
}

// Unit is the scope unit machined gives to (or found for) the machine of
// pid, "" if pid is in no machine.
func (c *Conn) Unit(ctx context.Context, pid int) (string, error) {
	var p dbus.ObjectPath
	err := c.bus.Object(dest, path).CallWithContext(ctx, dest+".Manager.GetMachineByPID", 0, uint32(pid)).Store(&p)
	var de dbus.Error
	if errors.As(err, &de) && de.Name == errNoMachineForPID {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("asking systemd-machined for the machine of pid %d: %w", pid, err)
	}
	v, err := c.bus.Object(dest, p).GetProperty(dest + ".Machine.Unit")
	if err != nil {
		return "", fmt.Errorf("reading the unit of machine %s: %w", p, err)
	}
	u, ok := v.Value().(string)
	if !ok {
		return "", fmt.Errorf("machine %s: Unit is %v, not a string", p, v)
	}
	return u, nil
}

// property is one of a scope's properties (D-Bus a(sv)).
type property struct {
	Name  string
	Value dbus.Variant
}

// Create registers m with machined, which has systemd start its scope unit
// (machine-NAME.scope in m.Slice) with m.Leader moved into the scope's
// cgroup. It returns once the scope runs.
func (c *Conn) Create(ctx context.Context, m Machine) error {
	props := []property{{"Slice", dbus.MakeVariant(m.Slice)}}
	if len(m.Before) > 0 {
		props = append(props, property{"Before", dbus.MakeVariant(m.Before)})
	}
	var p dbus.ObjectPath
	err := c.bus.Object(dest, path).CallWithContext(ctx, dest+".Manager.CreateMachine", 0,
		m.Name, m.UUID[:], m.Service, m.Class, uint32(m.Leader), "", props).Store(&p)
	if err != nil {
		return fmt.Errorf("systemd-machined CreateMachine %s (leader pid %d): %w", m.Name, m.Leader, err)
	}
	return nil
}
