"""soak_debian.py — the Debian host's part of docs/reliability.md, from the
output of scripts/demo.sh (UPDATES=D): each update by the Ansible playbook,
its guest's blackout, and whether libvirt's guest ran throughout.

    python3 scripts/soak_debian.py DEMO.LOG "COMMAND"   prints the section
(scripts/soak.sh imports section()).
"""
import re
import sys


def section(log, cmd):
    out = ["## Debian host: live kernel updates by the Ansible playbook\n",
           f"`{cmd}`: the Debian host (systemd, libvirt 11.3, QEMU 10) updated there and back by",
           "`ansible/playbook.yml`, libvirt's guest (RAM on PMEM, qcow2 disk written to, NIC on br0) running",
           "throughout; after each update libvirt runs it under the QEMU liveupdate restored.\n"]
    ups = re.findall(r"^== update (\d+): (\S+) → (\S+) — liveupdate's plan", log, re.M)
    blackouts = re.findall(r'"msg": "heartbeat: (\w+), blackout ([\d.]+) ms"', log)
    plays = re.findall(r"playbook done in (\d+) s", log)
    pids = re.findall(r"libvirt: .* running, QEMU pid (\d+)", log)
    if not ups:
        out.append("(not run)\n")
        return "\n".join(out)
    out.append("| update | from → to | playbook (s) | guest | blackout (ms) | QEMU pid after |")
    out.append("|---|---|---|---|---|---|")
    for i, (n, a, b) in enumerate(ups):
        st, bo = blackouts[i] if i < len(blackouts) else ("**not reported**", "-")
        pl = plays[i] if i < len(plays) else "**failed**"
        pid = pids[i] if i < len(pids) else "-"
        out.append(f"| {n} | {a} → {b} | {pl} | {st} | {bo} | {pid} |")
    ok = re.search(r"^verified: .*$", log, re.M)
    bad = re.search(r"^(NOT verified.*|the playbook failed.*|no .* within .*)$", log, re.M)
    done = len(plays)
    out.append("")
    if ok:
        out.append(f"{done} of {len(ups)} updates done, **0 guests lost**: {ok.group(0)[len('verified: '):]}\n")
    else:
        out.append(f"{done} of {len(ups)} updates done; **stopped**: {bad.group(0) if bad else 'see the log'}\n")
    return "\n".join(out)


if __name__ == "__main__":
    print(section(open(sys.argv[1]).read(), sys.argv[2]))
