#!/bin/bash
# soak.sh — the reliability run of issue 6: the fault table (every phase
# boundary × fault → outcome), K guests through M restart-qemu cycles and
# the nested update loop for N updates, counting failures and what the host
# holds after each cycle; rewrites docs/reliability.md.
#
#   scripts/soak.sh K M N C    (make soak K=3 M=20 N=10 C=50; C: chaos iterations)
set -euo pipefail
cd "$(dirname "$0")/.."
k=${1:-3} m=${2:-20} n=${3:-10} c=${4:-50}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

faults_cmd="go test -count=1 -timeout 30m -v -run 'TestFault' ./qemu-tests"
soak_cmd="LIVEUPDATE_SOAK_CYCLES=$m LIVEUPDATE_SOAK_GUESTS=$k LIVEUPDATE_SOAK_OUT=FILE go test -count=1 -timeout 60m -v -run TestSoakRestart ./qemu-tests"
chaos_cmd="LIVEUPDATE_CHAOS_N=$c LIVEUPDATE_CHAOS_MINUTES=30 LIVEUPDATE_SOAK_OUT=FILE go test -count=1 -timeout 40m -v -run TestChaos ./qemu-tests"
nested_cmd="LIVEUPDATE_NESTED_N=$n LIVEUPDATE_NESTED_FULL=1 LIVEUPDATE_SOAK_OUT=FILE go test -count=1 -timeout 120m -v -run TestNestedUpdate ./qemu-tests"

echo "== faults: $faults_cmd"
eval "$faults_cmd" >"$work/faults.log" 2>&1 || true
grep -E '^(---|    ---)' "$work/faults.log" || true
echo "== restart soak: $soak_cmd"
eval "${soak_cmd/FILE/$work/soak.jsonl}" >"$work/soak.log" 2>&1 || true
grep -E '^(---|ok|FAIL)' "$work/soak.log" || true
echo "== chaos: $chaos_cmd"
eval "${chaos_cmd/FILE/$work/soak.jsonl}" >"$work/chaos.log" 2>&1 || true
grep -E '^(---|ok|FAIL)|chaos:' "$work/chaos.log" || true
if [ "$n" -gt 0 ]; then
	echo "== nested soak: $nested_cmd"
	eval "${nested_cmd/FILE/$work/soak.jsonl}" >"$work/nested.log" 2>&1 || true
	grep -E '^(---|    ---)' "$work/nested.log" || true
else
	nested_cmd="(skipped: N=0)"
	: >"$work/nested.log"
fi

python3 - "$work" "$faults_cmd" "$soak_cmd" "$nested_cmd" "$chaos_cmd" <<'PY' >docs/reliability.new
import json, os, re, sys, datetime, subprocess
work, faults_cmd, soak_cmd, nested_cmd, chaos_cmd = sys.argv[1:]
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
             "killqemu": "one old QEMU SIGKILLed there", "fill": "the state filesystem fills up"}.get(action, action)
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
print()
print("## Soak\n")
print(f"- restarts: `{soak_cmd}`")
print(f"- updates: `{nested_cmd}`\n")
recs = [json.loads(l) for l in open(f"{work}/soak.jsonl")] if os.path.exists(f"{work}/soak.jsonl") else []
for kind, title in [("restart", "restart-qemu cycles (host after each; any growth is a leak and fails the test)"), ("update", "nested updates (the outer host after each)")]:
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
print("## Faults at random moments\n")
print(f"`{chaos_cmd}`: three guests restarted in each iteration (early start or --sequential at random),")
print("liveupdate SIGKILLed at a random instant within 2 s of its start, then `recover` twice; every guest checked")
print("(heartbeat, boot id, RAM checksum).\n")
if cs:
    killed = sum(1 for r in cs if r["exit"] == 137)
    lost = sum(r["guests_lost"] for r in cs)
    unrec = sum(1 for r in cs if not r["recovered"])
    print(f"{len(cs)} iterations ({killed} killed mid-run, {len(cs) - killed} finished before the kill): **{lost} guests lost**, {unrec} recovers that failed or were not idempotent.\n")
    print("| kill after (ms) | mode | exit | recovered | guests lost |")
    print("|---|---|---|---|---|")
    for r in cs:
        print(f"| {r['kill_after_ms']} | {'sequential' if r['sequential'] else 'early start'} | {r['exit']} | {'yes' if r['recovered'] else '**no**'} | {r['guests_lost']} |")
    print()
else:
    print("(not run)\n")
PY
# The notes at the end are written by hand; keep them.
if [ -f docs/reliability.md ] && grep -q '^## Notes (by hand)' docs/reliability.md; then
	{ echo; sed -n '/^## Notes (by hand)/,$p' docs/reliability.md; } >>docs/reliability.new
fi
mv docs/reliability.new docs/reliability.md
echo "wrote docs/reliability.md"
