#!/usr/bin/env bash
# A throwaway Debian system for tests that need the real thing: dpkg installing pm's packages,
# systemd starting its hardened units, Ansible driving both. It boots systemd as PID 1 of new
# PID, mount, UTS, IPC and cgroup namespaces; /usr, /etc and /var are overlays whose writes land
# in a tmpfs, so nothing installed, no user created and no unit enabled inside reaches this
# machine. The network, /tmp, /dev, /work and /root are this machine's (loopback tests, the
# build tree, pip's tools): /proc/sys and /sys are read-only, and the boot units that would
# write the shared ones (tmpfiles empties /tmp, /dev/log, sysctl, modules, udev, fstrim and
# this machine's own enabled timers and sockets) are masked or left out.
# Needs root (namespaces, mounts) and a Debian machine with systemd installed (not running).
#
#   scripts/systemd-box.sh start DIR      boot a box; DIR keeps its pid (and the boot log)
#   scripts/systemd-box.sh run DIR CMD..  run CMD inside it (its systemctl, dpkg, /usr, ...)
#   scripts/systemd-box.sh stop DIR       kill everything in it; its overlays vanish with it
set -euo pipefail

die() { echo "error: $1" >&2; [[ $# -gt 1 ]] && echo "hint: $2" >&2; exit 2; }
usage() { sed -n '9,11p' "$0" | sed 's/^#  *//' >&2; }

(( $# >= 2 )) || { usage; die "a command and a directory are needed"; }
command="$1"
dir="$2"
shift 2

box_pid() {
  [[ -s "${dir}/pid" ]] || die "no box in \`${dir}\`" "start one with \`$0 start ${dir}\`"
  cat "${dir}/pid"
}

case "${command}" in
  start)
    [[ "$(id -u)" -eq 0 ]] || die "a box needs root (namespaces and mounts)"
    [[ -x /usr/lib/systemd/systemd || -x /lib/systemd/systemd ]] \
      || die "systemd is not installed" "apt-get install systemd"
    mkdir -p "${dir}"
    dir="$(cd "${dir}" && pwd)"
    [[ ! -s "${dir}/pid" ]] || ! kill -0 "$(cat "${dir}/pid")" 2>/dev/null \
      || die "a box already runs in \`${dir}\`" "stop it with \`$0 stop ${dir}\`"
    mkdir -p "${dir}/overlays"
    # systemd must be PID 1 of the namespace; `exec` keeps the PID unshare forked.
    setsid unshare --pid --mount --uts --ipc --cgroup --fork --mount-proc --propagation private bash -c '
      set -e
      overlays="$1"
      mount -t tmpfs -o mode=0755 pm-box "${overlays}"
      for top in usr etc var; do
        mkdir -p "${overlays}/${top}/upper" "${overlays}/${top}/work"
        mount -t overlay "pm-box-${top}" \
          -o "lowerdir=/${top},upperdir=${overlays}/${top}/upper,workdir=${overlays}/${top}/work" "/${top}"
      done
      mount -t tmpfs -o mode=0755 pm-box-run /run
      # What would reach past the box: tmpfiles empties /tmp (shared with this machine) at boot,
      # sysctl, modules and udev change the kernel and devices. /sys read-only keeps udev out;
      # its cgroup mounts stay writable for systemd.
      for unit in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service \
          systemd-tmpfiles-setup-dev-early.service systemd-tmpfiles-clean.timer \
          systemd-sysctl.service systemd-modules-load.service systemd-binfmt.service \
          systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service \
          systemd-random-seed.service systemd-journal-flush.service systemd-remount-fs.service \
          systemd-journald-dev-log.socket systemd-hwdb-update.service systemd-update-utmp.service \
          fstrim.timer e2scrub_all.timer e2scrub_reap.service; do
        ln -sfn /dev/null "/etc/systemd/system/${unit}"
      done
      # This machine enabled its own timers, sockets and services (apt-daily, ssh, ...): the box
      # runs only what its tests enable (the removal lands in the overlay, not on this machine).
      rm -rf /etc/systemd/system/*.target.wants
      mount -o remount,bind,ro /sys
      mount --bind /proc/sys /proc/sys
      mount -o remount,bind,ro /proc/sys
      # basic.target: sockets, timers and the journal, not this machine'"'"'s enabled services.
      exec env container=pm-box /lib/systemd/systemd --system --unit=basic.target \
        --log-target=console --log-level=warning
    ' pm-box "${dir}/overlays" >"${dir}/boot.log" 2>&1 </dev/null &
    unshare_pid=$!
    systemd_pid=""
    for _ in $(seq 1 100); do
      systemd_pid="$(pgrep -P "${unshare_pid}" -x systemd || true)"
      [[ -n "${systemd_pid}" ]] && break
      sleep 0.1
    done
    [[ -n "${systemd_pid}" ]] || { cat "${dir}/boot.log" >&2; die "systemd did not start in the box"; }
    echo "${systemd_pid}" > "${dir}/pid"
    state=""
    for _ in $(seq 1 300); do
      state="$(nsenter -t "${systemd_pid}" -m -p systemctl is-system-running 2>/dev/null || true)"
      [[ "${state}" == running || "${state}" == degraded ]] && break
      sleep 0.1
    done
    if [[ "${state}" != running && "${state}" != degraded ]]; then
      cat "${dir}/boot.log" >&2
      die "the box's systemd did not finish booting (state: ${state:-none})"
    fi
    echo "box ${dir}: systemd ${systemd_pid} ${state}"
    ;;
  run)
    (( $# > 0 )) || die "run needs a command"
    pid="$(box_pid)"
    exec nsenter -t "${pid}" -m -p --wd="$(pwd)" -- "$@"
    ;;
  stop)
    if [[ -s "${dir}/pid" ]]; then
      pid="$(cat "${dir}/pid")"
      # Only the box's systemd (the PID may have been reused since): a systemd in another PID
      # namespace than ours. Killing PID 1 of a namespace kills every process in it; the mounts
      # go with the last one.
      if [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == systemd \
          && "$(readlink "/proc/${pid}/ns/pid")" != "$(readlink /proc/self/ns/pid)" ]]; then
        kill -KILL "${pid}" 2>/dev/null || true
      fi
      for _ in $(seq 1 100); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.1; done
      rm -f "${dir}/pid"
    fi
    ;;
  *) usage; die "unknown command \`${command}\`" ;;
esac
