#!/bin/bash
# soak.sh — the reliability run of issue 6: the fault table (every phase
# boundary × fault → outcome), K guests through M restart-qemu cycles, the
# nested update loop for N updates, counting failures and what the host
# holds after each cycle, and C restarts in each of TestChaos' two modes
# (liveupdate SIGKILLed at a random instant; one QEMU whose death a correct
# tool survives SIGKILLed at a random instant), and D live kernel updates
# there and back of the Debian host by the Ansible playbook with libvirt's
# guest running throughout (scripts/demo.sh); rewrites docs/reliability.md.
#
#   scripts/soak.sh K M N C D  (make soak K=3 M=20 N=10 C=50 D=10; C: chaos iterations per mode)
set -euo pipefail
cd "$(dirname "$0")/.."
k=${1:-3} m=${2:-20} n=${3:-10} c=${4:-50} d=${5:-10}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

faults_cmd="go test -count=1 -timeout 30m -v -run 'TestFault' ./qemu-tests"
soak_cmd="LIVEUPDATE_SOAK_CYCLES=$m LIVEUPDATE_SOAK_GUESTS=$k LIVEUPDATE_SOAK_OUT=FILE go test -count=1 -timeout 60m -v -run TestSoakRestart ./qemu-tests"
chaos_cmd="LIVEUPDATE_CHAOS_N=$c LIVEUPDATE_CHAOS_MINUTES=30 LIVEUPDATE_SOAK_OUT=FILE go test -count=1 -timeout 75m -v -run TestChaos ./qemu-tests"
debian_cmd="UPDATES=$d scripts/demo.sh"
debian_paths_cmd="LIVEUPDATE_NESTED_FULL=1 go test -count=1 -timeout 60m -v -run '^TestDebianHostUpdate\$' ./qemu-tests"
nested_cmd="LIVEUPDATE_NESTED_N=$n LIVEUPDATE_NESTED_FULL=1 LIVEUPDATE_SOAK_OUT=FILE go test -count=1 -timeout 120m -v -run TestNestedUpdate ./qemu-tests"

echo "== faults: $faults_cmd"
eval "$faults_cmd" >"$work/faults.log" 2>&1 || true
grep -E '^(---|    ---)' "$work/faults.log" || true
echo "== restart soak: $soak_cmd"
eval "${soak_cmd/FILE/$work/soak.jsonl}" >"$work/soak.log" 2>&1 || true
grep -E '^(---|ok|FAIL)' "$work/soak.log" || true
echo "== chaos: $chaos_cmd"
eval "${chaos_cmd/FILE/$work/soak.jsonl}" >"$work/chaos.log" 2>&1 || true
grep -E '^(---|    ---|ok|FAIL)|chaos( qemu)?:' "$work/chaos.log" || true
if [ "$n" -gt 0 ]; then
	echo "== nested soak: $nested_cmd"
	eval "${nested_cmd/FILE/$work/soak.jsonl}" >"$work/nested.log" 2>&1 || true
	grep -E '^(---|    ---)' "$work/nested.log" || true
else
	nested_cmd="(skipped: N=0)"
	: >"$work/nested.log"
fi

if [ "$d" -gt 0 ]; then
	echo "== Debian host: $debian_cmd"
	eval "$debian_cmd" >"$work/debian.log" 2>&1 || true
	grep -E 'blackout|^verified|NOT verified|failed' "$work/debian.log" || true
	echo "== Debian host, bad paths: $debian_paths_cmd"
	eval "$debian_paths_cmd" >"$work/debianpaths.log" 2>&1 || true
	grep -E '^(---|    ---)' "$work/debianpaths.log" || true
else
	debian_cmd="(skipped: D=0)"
	: >"$work/debian.log"
	: >"$work/debianpaths.log"
fi

python3 - "$work" "$faults_cmd" "$soak_cmd" "$nested_cmd" "$chaos_cmd" "$debian_cmd" "$debian_paths_cmd" <<'PY' >docs/reliability.new
import json, os, re, sys, datetime, subprocess
work, faults_cmd, soak_cmd, nested_cmd, chaos_cmd, debian_cmd, debian_paths_cmd = sys.argv[1:]
def sh(c): return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-").strip()
qemu = sh("qemu-system-x86_64 --version | head -1")
print("# Reliability\n")
print(f"Written by `make soak` (scripts/soak.sh) on {datetime.date.today()}, on {os.cpu_count()} cores ({cpu}), {qemu} under TCG.\n")
print("## Injected faults\n")
print(f"`{faults_cmd}` (the binary built with `-tags faultinject`), and the nested subtests of `TestNestedUpdate`.")
print("Each row: where the fault hits, what it is, what the tool did, and whether every guest ran afterwards")
print("(heartbeat continuing, same boot id, memory checksum intact), after `liveupdate recover` where needed;")
print("recover is then run a second time and must change nothing.\n")
print("| boundary | fault | what happened | every guest running after | test |")
print("|---|---|---|---|---|")
log = open(f"{work}/faults.log").read()
status = {b: a for a, b in re.findall(r"--- (PASS|FAIL): (\S+)", log)}
for m in re.finditer(r"fault_test.go:\d+: (\S+?)=(\S+)( --sequential)? \((.*?)\): restart-qemu exit (\d+)", log):
    point, action, seq, why, code = m.groups()
    name = f"TestFaults/{point}_{action}" + ("_sequential" if seq else "")
    ok = status.get(name, "?")
    fault = {"fail": "our process fails there", "kill": "our process SIGKILLed there",
             "killqemu": "one old QEMU SIGKILLed there", "killnew": "that VM's new QEMU SIGKILLed there",
             "fill": "the state filesystem fills up"}.get(action, action)
    mode = " (--sequential)" if seq else ""
    print(f"| restart-qemu{mode}: {point} | {fault} | {why}; exit {code} | {'yes' if ok == 'PASS' else '**NO**'} | {name} |")
for name, row in [("TestFaultFullDisk", "| restart-qemu: after the manifest | ENOSPC: the state filesystem fills up | saves fail, all resumed on their old QEMUs at once | {} | TestFaultFullDisk |"),
                  ("TestFaultQMPHangRecover", "| recover after saved=kill | one QEMU's monitor hangs (SIGSTOP) | recover names it and touches it not, resumes the other; recovered once it answers | {} | TestFaultQMPHangRecover |"),
                  ("TestQMPHang", "| restart-qemu: plan | one QEMU's monitor hangs | refused naming it (or --skip-unsafe restarts the others) | {} | TestQMPHang |"),
                  ("TestRollback", "| restart-qemu: save | one state file cannot be written (EROFS) | all resumed on their old QEMUs | {} | TestRollback |")]:
    ok = status.get(name)
    if ok:
        print(row.format("yes" if ok == "PASS" else "**NO**"))
nlog = open(f"{work}/nested.log").read()
nstatus = {b: a for a, b in re.findall(r"--- (PASS|FAIL): (\S+)", nlog)}
for name, row in [("TestNestedUpdate/RefuseMemmapDrop", "| update: plan | a command line dropping memmap= | refused, nothing touched"),
                  ("TestNestedUpdate/RefuseBadKernel", "| update: kexec load | a kernel kexec refuses | reported before any guest is touched"),
                  ("TestNestedUpdate/RefusePrivateRAM", "| update: plan | a guest with private RAM | refused naming it"),
                  ("TestNestedUpdate/CrashBeforeKexec", "| update: kexec | the updater SIGKILLed just before reboot | recover restores the guest on the old kernel, filesystems writable, kernel unloaded"),
                  ("TestNestedUpdate/Update*/OneRestoreFails", "| after kexec: restore | one of two guests' QEMU binary broken (a bad upgrade) | PID 1 runs the other guest and names the failed one with `recover`'s command; its RAM and state kept; `recover` restores it"),
                  ("TestNestedUpdate/CorruptManifestAfterKexec", "| after kexec: manifest | the manifest truncated | PID 1 stops in the rescue shell touching nothing; `recover --host` restores")]:
    ok = next((v for k, v in nstatus.items() if re.fullmatch(name.replace("*", "[^/]*"), k)), None)
    verdict = ("yes" if ok == "PASS" else "**NO**") if ok else "not run here (N=0)"
    print(f"{row} | {verdict} | {name} |")
dlog = open(f"{work}/debianpaths.log").read()
dstatus = {b: a for a, b in re.findall(r"--- (PASS|FAIL): (\S+)", dlog)}
for name, row in [("TestDebianHostUpdate/GateStopsTheWave", "| Debian host: the playbook's gate | a guest with private RAM, one bound to host node 1 with its file on node 0's PMEM | the wave stops naming both in liveupdate's words; libvirt's daemon started again; nothing touched"),
                  ("TestDebianHostUpdate/CrashBeforeKexec", "| Debian host: kexec | the updater SIGKILLed just before reboot | `recover` restores libvirt's guest and the two-node one on the old kernel; libvirt keeps its guest under the recovered QEMU, machined knows it"),
                  ("TestDebianHostUpdate/OneRestoreFails", "| Debian host, after kexec: restore | a third guest's QEMU binary broken | the playbook fails the host naming it; the other guests run under libvirt and in place; `recover` restores it"),
                  ("TestDebianHostUpdate/CorruptManifestAfterKexec", "| Debian host, after kexec: manifest | the manifest cut short (fault `corrupt`) | PID 1 stops in the rescue shell touching nothing; `recover --host` over its control line, then `/run/liveupdate/boot-host`: systemd boots, every guest runs")]:
    ok = dstatus.get(name)
    verdict = ("yes" if ok == "PASS" else "**NO**") if ok else "not run here (D=0)"
    print(f"{row} | {verdict} | {name} (`{debian_paths_cmd}`) |")
print()
print("## Soak\n")
print(f"- restarts: `{soak_cmd}`")
print(f"- updates: `{nested_cmd}`\n")
recs = [json.loads(l) for l in open(f"{work}/soak.jsonl")] if os.path.exists(f"{work}/soak.jsonl") else []
for kind, title in [("restart", "restart-qemu cycles (after each: its guests' QEMUs and their fds, its taps, the host's mounts, cgroups, state files; any growth is a leak and fails the test)"), ("update", "nested updates (the outer host after each)")]:
    rs = [r for r in recs if r["kind"] == kind]
    if not rs:
        continue
    fails = sum(1 for r in rs if not r["ok"])
    keys = list(rs[0]["counts"].keys())
    print(f"### {title}: {len(rs)} cycles, {fails} failed\n")
    print("| cycle | ok | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rs:
        print(f"| {r['cycle']} | {'yes' if r['ok'] else '**no**'} | " + " | ".join(str(r['counts'][k]) for k in keys) + " |")
    first, last = rs[0]["counts"], rs[-1]["counts"]
    grew = [k for k in keys if last[k] > first[k]]
    print(f"\nGrowth from the first cycle to the last: {', '.join(grew) if grew else 'none'}.\n")
cs = [r for r in recs if r["kind"] == "chaos"]
qs = [r for r in recs if r["kind"] == "chaos-qemu"]
clog = open(f"{work}/chaos.log").read()
took = dict(re.findall(r"--- \w+: TestChaos/(\w+) \(([\d.]+)s\)", clog))
def mins(mode):
    return f", {float(took[mode]) / 60:.1f} min" if mode in took else ""
print("## Faults at random moments\n")
print(f"`{chaos_cmd}`: TestChaos, two modes over the same three guests (c1 raw `-drive` cache=none aio=native,")
print("c2 qcow2 JSON `-blockdev` + iothread cache=writeback, c3 raw `-drive`+`-device` cache=none aio=io_uring), each")
print("writing to its disk; each iteration restarts all three (early start or --sequential at random), kills one")
print("process at a random instant, then runs `recover` twice (the second must change nothing) and checks every")
print("guest: heartbeat going on, same boot id, RAM checksum, every acknowledged disk record on its image, one QEMU each.\n")
print("### liveupdate SIGKILLed\n")
print("At a random instant within 2 s of its start (before, during or after the saves, quits, loads, conts).\n")
if cs:
    killed = sum(1 for r in cs if r["exit"] == 137)
    lost = sum(r["guests_lost"] for r in cs)
    unrec = sum(1 for r in cs if not r["recovered"])
    stalled = sum(r.get("disks_stalled", 0) for r in cs)
    print(f"{len(cs)} iterations{mins('tool')} ({killed} killed mid-run, {len(cs) - killed} finished before the kill): **{lost} guests lost**, {unrec} recovers that failed or were not idempotent, {stalled} disk writers that stopped acknowledging (the loop ends there).\n")
    print("| kill after (ms) | mode | exit | recovered | guests lost |")
    print("|---|---|---|---|---|")
    for r in cs:
        print(f"| {r['kill_after_ms']} | {'sequential' if r['sequential'] else 'early start'} | {r['exit']} | {'yes' if r['recovered'] else '**no**'} | {r['guests_lost']} |")
    print()
else:
    print("(not run)\n")
print("### One QEMU SIGKILLed\n")
print("Only a QEMU whose death a correct tool must survive: a new QEMU (early twin or sequential) before it ran the")
print("guest — starting (monitor not up), waiting for its state, loading it, loaded and paused before `cont` — or an")
print("old QEMU after its save completed (postmigrate, the state file whole). A new QEMU after its `cont` is not a")
print("target: it holds the only copy of the guest's device state, and killing it is the guest's host crashing. At")
print("the random instant (half drawn over the run's length, half over the last untouched run's first save → last")
print("`cont`, where the states change in milliseconds) liveupdate is frozen (SIGSTOP), so it sends nothing more;")
print("after 150 ms everything it sent has been run, and each QEMU of the guests (the old one: the pid it had before")
print("the run) is asked its runstate and migration status on a monitor of the test's own; one eligible QEMU is")
print("killed at random, its death awaited, liveupdate continued. An instant with none eligible is \"no target\".")
print("The run itself must bring every guest back (checked before `recover`), and a run that fails must say why.\n")
if qs:
    hits = [r for r in qs if r["target"] != "none"]
    kinds = {}
    for r in hits:
        kinds[r["target"]] = kinds.get(r["target"], 0) + 1
    lost = sum(r["guests_lost"] for r in qs)
    down = sum(1 for r in qs if not r["ran_after_run"])
    mute = sum(1 for r in qs if not r["says_why"])
    unrec = sum(1 for r in qs if not r["recovered"])
    stalled = sum(r.get("disks_stalled", 0) for r in qs)
    failed = sum(1 for r in hits if r["exit"] != 0)
    by = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"
    print(f"{len(qs)} iterations{mins('qemu')}: {len(hits)} QEMUs killed ({by}), {len(qs) - len(hits)} instants with no target.")
    print(f"**{lost} guests lost**; {down} runs that left a guest down until `recover`; {failed} killed runs exited non-zero"
          f" (a guest back on its old QEMU), {mute} of any without saying why; {unrec} recovers that failed or were not idempotent;"
          f" {stalled} disk writers that stopped acknowledging (the loop ends there).\n")
    print("| kill at (ms) | drawn over | mode | target | guest | exit | every guest ran after the run | said why | recovered | guests lost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    yn = lambda b: "yes" if b else "**no**"
    for r in qs:
        print(f"| {r['kill_at_ms']} | {r['drawn']} | {'sequential' if r['sequential'] else 'early start'} | {r['target']} | {r['vm'] or '-'} | {r['exit']} | {yn(r['ran_after_run'])} | {yn(r['says_why'])} | {yn(r['recovered'])} | {r['guests_lost']} |")
    print()
else:
    print("(not run)\n")
sys.path.insert(0, "scripts")
from soak_debian import section
print(section(open(f"{work}/debian.log").read(), debian_cmd))
PY
# The notes at the end are written by hand; keep them.
if [ -f docs/reliability.md ] && grep -q '^## Notes (by hand)' docs/reliability.md; then
	{ echo; sed -n '/^## Notes (by hand)/,$p' docs/reliability.md; } >>docs/reliability.new
fi
mv docs/reliability.new docs/reliability.md
echo "wrote docs/reliability.md"
