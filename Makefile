# liveupdate — see README.md.
#
#   make demo    set up, then a real live kernel update of a nested host
#                (6.1 → 6.12 → 6.1) with a heartbeat guest kept alive
#   make demo-restart   the QEMU-only live restart of a heartbeat guest
#   make test    set up, then every test (unit, fuzz briefly, real QEMU)
#   make bench   benchmarks; rewrites docs/benchmarks.md
#   make install [DESTDIR=… PREFIX=…]   installs liveupdate (PREFIX/sbin)
#   make deb     out/liveupdate_VERSION_amd64.deb, for a Debian host

SHELL     := /bin/bash
GO        ?= go
# A count, not a duration: Go 1.26's fuzz coordinator can fail a target
# with "context deadline exceeded" when a -fuzztime duration runs out
# (golang/go#75804, fixed in Go 1.27); a count has no deadline to race.
FUZZTIME  ?= 100000x
BIN       := bin

.PHONY: all build install deb debian-host setup test unit fuzz-short qemu-test lint demo demo-restart soak bench fuzz clean initramfs

# One initramfs per kernel, like update-initramfs:
#   make initramfs KVER=6.12.117+deb12-amd64 MODROOT=/   → out/initramfs-KVER.cpio.gz
KVER    ?= $(shell cat .cache/kernels/new/version 2>/dev/null)
MODROOT ?= .cache/kernels/new

all: build

build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./init ./cmds/...
	mv -f $(BIN)/init $(BIN)/liveupdate

setup:
	./scripts/setup.sh

# What an operator installs on a host: the one program (static, no
# dependencies; it is both the CLI and, inside the initramfs, PID 1).
PREFIX  ?= /usr/local
DESTDIR ?=
# With it, the unit that gives libvirt's guests back to systemd-machined
# after a kexec, and the drop-in that starts libvirt's daemon after it
# (systemd/).
UNITDIR ?= $(PREFIX)/lib/systemd/system
install: build
	install -D -m 0755 $(BIN)/liveupdate $(DESTDIR)$(PREFIX)/sbin/liveupdate
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/liveupdate/README.md
	install -d $(DESTDIR)$(UNITDIR)
	sed -e 's|@SBINDIR@|$(PREFIX)/sbin|' -e 's|@DOCDIR@|$(PREFIX)/share/doc/liveupdate|' \
		systemd/liveupdate-machines.service >$(DESTDIR)$(UNITDIR)/liveupdate-machines.service
	for d in libvirtd virtqemud; do \
		install -D -m 0644 systemd/liveupdate-machines.conf $(DESTDIR)$(UNITDIR)/$$d.service.d/liveupdate-machines.conf; done

# The same, packaged for Debian (dpkg -i, or Ansible's apt deb=): make install
# into a staged tree with PREFIX=/usr, then dpkg-deb. Prints the .deb's path.
DEB_DIR     ?= out
DEB_VERSION ?= 0.1~git$(shell git log -1 --format=%cd.%h --date=format:%Y%m%d 2>/dev/null || echo 0)
deb:
	@rm -rf $(DEB_DIR)/deb-root && mkdir -p $(DEB_DIR)/deb-root/DEBIAN
	@$(MAKE) -s install DESTDIR=$(abspath $(DEB_DIR))/deb-root PREFIX=/usr >&2
	@printf '%s\n' 'Package: liveupdate' 'Version: $(DEB_VERSION)' 'Architecture: amd64' \
		'Maintainer: liveupdate developers <liveupdate@localhost>' 'Section: admin' 'Priority: optional' \
		'Recommends: qemu-system-x86 (>= 1:8.2)' \
		'Description: live kernel and QEMU updates for KVM hosts' \
		' Keeps QEMU guests running across a kexec into a new host kernel or a' \
		' restart onto a new QEMU binary (QEMU CPR, guest RAM on PMEM with DAX).' \
		>$(DEB_DIR)/deb-root/DEBIAN/control
	@dpkg-deb --root-owner-group -Zxz --build $(DEB_DIR)/deb-root $(DEB_DIR)/liveupdate_$(DEB_VERSION)_amd64.deb >&2
	@rm -rf $(DEB_DIR)/deb-root
	@echo $(abspath $(DEB_DIR))/liveupdate_$(DEB_VERSION)_amd64.deb

# The nested test host's images (cached; prints their directory).
debian-host:
	./scripts/debian-host.sh

lint:
	@out=$$(gofmt -l init cmds pkg qemu-tests internal kernelconfig); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# The race detector over the unit tests, and over the program under test in
# the real-QEMU tier (LU_RACE=1 builds it with -race; make bench does not).
unit:
	CGO_ENABLED=1 $(GO) test -race -count=1 ./init/... ./cmds/... ./pkg/... ./internal/... ./kernelconfig/...

# Every parser of outside input, fuzzed briefly (longer: make fuzz FUZZTIME=20000000x).
FUZZ_TARGETS := FuzzParse:./pkg/qemuargv FuzzDecode:./pkg/manifest FuzzDecodeBoot:./pkg/manifest FuzzParse:./pkg/bootparams \
	FuzzProcFiles:./pkg/discover FuzzDecodeReply:./pkg/qmp FuzzReply:./pkg/guestagent FuzzParseFstab:./pkg/mounts \
	FuzzRewrite:./pkg/libvirt FuzzCgroupMounts:./pkg/qemuproc FuzzCheckVMName:./pkg/manifest FuzzScopeOf:./pkg/machines FuzzMaps:./pkg/preflight \
	FuzzListensIn:./pkg/qemuproc FuzzParseList:./pkg/kmod FuzzCodeFiles:./pkg/qemuproc FuzzStartedGuest:./pkg/qemuproc \
	FuzzInitramfsModules:./pkg/hostmods
fuzz-short fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		name=$${t%%:*}; pkg=$${t#*:}; \
		echo "fuzz $$name ($$pkg) for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg; \
	done

# The log is filtered to one line per message; on a failure the first failing
# test's last 80 lines follow unfiltered (a message's continuation lines, such
# as a stalled disk's diagnosis, are indented and would be filtered out).
QEMU_TEST_LOG ?= /tmp/liveupdate-qemu-tests.log
qemu-test:
	@LU_RACE=1 $(GO) test -count=1 -timeout 45m -v ./qemu-tests/ 2>&1 | tee $(QEMU_TEST_LOG) | grep -E '^(=== RUN|--- |PASS|FAIL|ok|panic)|_test.go:[0-9]+: [^l]'; rc=$${PIPESTATUS[0]}; \
	if [ $$rc -ne 0 ]; then echo "=== the first failure in full ($(QEMU_TEST_LOG)):"; \
		n=$$(grep -n -m1 -E '^\s*--- FAIL|^panic:' $(QEMU_TEST_LOG) | cut -d: -f1); \
		[ -n "$$n" ] && head -n "$$n" $(QEMU_TEST_LOG) | tail -n 80; fi; exit $$rc

test: setup lint unit fuzz-short qemu-test

demo: setup
	./scripts/demo.sh

demo-restart: setup build
	./scripts/demo-restart.sh

# Reliability: the fault table, K guests × M restart cycles and N nested
# updates, leaks counted, and C restarts in each of TestChaos' two modes:
# liveupdate SIGKILLed at a random instant, or one QEMU whose death a correct
# tool survives, and D updates of the Debian host by the playbook
# (scripts/demo.sh) and the bad paths on that host (TestDebianHostUpdate with LIVEUPDATE_NESTED_FULL=1); rewrites docs/reliability.md (make soak K=3 M=20 N=10 C=50 D=10).
# make test skips TestChaos (it needs LIVEUPDATE_CHAOS_N).
K ?= 3
M ?= 20
N ?= 10
C ?= 50
D ?= 10
soak: setup
	./scripts/soak.sh $(K) $(M) $(N) $(C) $(D)

bench: setup
	./scripts/bench.sh

initramfs:
	@test -n "$(KVER)" || { echo "KVER not set and no set-up kernel: run make setup or give KVER=… MODROOT=…"; exit 2; }
	mkdir -p out
	./initramfs/build.sh $(KVER) $(MODROOT) out/initramfs-$(KVER).cpio.gz

clean:
	rm -rf $(BIN) out
