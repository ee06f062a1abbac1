#!/usr/bin/env bash
# System libraries Qt needs on a bare Debian/Ubuntu, Xvfb for the screenshot tests, and the
# DICOM validators (dicom3tools, dcmtk) the export tests run.
# Installs only as root with apt-get; otherwise says what to install and carries on.
set -uo pipefail
pkgs=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-cursor0 libxkbcommon-x11-0 libegl1 libgl1
      libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-xkb1
      libfontconfig1 libdbus-1-3 libglib2.0-0 fonts-dejavu-core dicom3tools dcmtk orthanc openssl)
# Debian/Ubuntu ship venv (ensurepip) apart from Python: the one setup.sh will use needs it.
for c in ${PYTHON:-} python3.11 python3.12 python3; do
  if command -v "$c" >/dev/null 2>&1; then
    "$c" -c "import ensurepip, venv" >/dev/null 2>&1 ||
      pkgs+=("$("$c" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])')")
    break
  fi
done
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "note: missing system packages (Qt/Xvfb): ${missing[*]}" >&2
  echo "      install them with: sudo apt-get install ${missing[*]}" >&2
fi
exit 0
