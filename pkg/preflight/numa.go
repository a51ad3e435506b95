package preflight

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/liveupdate/liveupdate/pkg/qemuargv"
)

// MemNode finds the host NUMA node of the memory behind a RAM file: the
// node of the PMEM (or other block) device its filesystem is on, or of a
// device-DAX character device itself, from sysfs. ok is false when the
// node is not known (tmpfs, hugetlbfs, a device sysfs gives no node).
func MemNode(local string) (node int, dev string, ok bool) {
	var st unix.Stat_t
	if err := unix.Stat(local, &st); err != nil {
		return 0, "", false
	}
	kind, num := "block", st.Dev
	if st.Mode&unix.S_IFMT == unix.S_IFCHR {
		kind, num = "char", st.Rdev
	}
	sys := fmt.Sprintf("/sys/dev/%s/%d:%d", kind, unix.Major(num), unix.Minor(num))
	b, err := os.ReadFile(filepath.Join(sys, "device", "numa_node"))
	if err != nil {
		return 0, "", false
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || n < 0 {
		return 0, "", false
	}
	target, _ := os.Readlink(sys)
	return n, "/dev/" + filepath.Base(target), true
}

// numaProblem says why a backend bound to host nodes keeps its RAM on
// another node's memory, "" if it does not (or nothing tells).
func numaProblem(b qemuargv.MemoryBackend, local string, memNode func(string) (int, string, bool)) string {
	if len(b.HostNodes) == 0 || (b.Policy != "bind" && b.Policy != "preferred") {
		return ""
	}
	node, dev, ok := memNode(local)
	if !ok || slices.Contains(b.HostNodes, node) {
		return ""
	}
	return fmt.Sprintf("its RAM is bound to host node(s) %v (host-nodes, policy=%s), but its file %s is on %s, memory of node %d: the guest's RAM is not where it asks to be, and a restore would keep it so. Put the file on the PMEM filesystem of node %v, or make host-nodes say %d",
		b.HostNodes, b.Policy, b.MemPath, dev, node, b.HostNodes, node)
}
