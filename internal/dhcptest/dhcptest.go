// Package dhcptest is a one-lease DHCPv4 server for tests, on
// insomniacslk/dhcp's server4: it offers one fixed address to whoever asks
// on one interface of a network namespace the test made.
package dhcptest

import (
	"net"
	"sync/atomic"

	"github.com/insomniacslk/dhcp/dhcpv4"
	"github.com/insomniacslk/dhcp/dhcpv4/server4"
)

// Server hands out one lease.
type Server struct {
	srv  *server4.Server
	acks atomic.Int32
}

// Start listens on iface (call it inside the interface's namespace; the
// socket stays there) and offers client/mask with router and server id.
func Start(iface string, server, client net.IP, mask net.IPMask) (*Server, error) {
	s := &Server{}
	handler := func(conn net.PacketConn, peer net.Addr, m *dhcpv4.DHCPv4) {
		var typ dhcpv4.MessageType
		switch m.MessageType() {
		case dhcpv4.MessageTypeDiscover:
			typ = dhcpv4.MessageTypeOffer
		case dhcpv4.MessageTypeRequest:
			typ = dhcpv4.MessageTypeAck
		default:
			return
		}
		reply, err := dhcpv4.NewReplyFromRequest(m,
			dhcpv4.WithMessageType(typ),
			dhcpv4.WithYourIP(client),
			dhcpv4.WithServerIP(server),
			dhcpv4.WithNetmask(mask),
			dhcpv4.WithRouter(server),
			dhcpv4.WithLeaseTime(3600),
			dhcpv4.WithOption(dhcpv4.OptServerIdentifier(server)),
		)
		if err != nil {
			return
		}
		dst := &net.UDPAddr{IP: net.IPv4bcast, Port: dhcpv4.ClientPort}
		if _, err := conn.WriteTo(reply.ToBytes(), dst); err == nil && typ == dhcpv4.MessageTypeAck {
			s.acks.Add(1)
		}
	}
	srv, err := server4.NewServer(iface, &net.UDPAddr{IP: net.IPv4zero, Port: dhcpv4.ServerPort}, handler)
	if err != nil {
		return nil, err
	}
	s.srv = srv
	go srv.Serve()
	return s, nil
}

// Acks is how many leases were acknowledged.
func (s *Server) Acks() int { return int(s.acks.Load()) }

// Close stops the server.
func (s *Server) Close() error { return s.srv.Close() }
