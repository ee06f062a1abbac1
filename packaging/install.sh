#!/bin/sh
# Put the ich-viewer bundle this script sits in on the menu and on the PATH.
#
#   ./install.sh                  for you: ~/.local/bin and ~/.local/share
#   sudo ./install.sh --system    for everyone: /usr/local/bin and /usr/local/share
#   ./install.sh --uninstall      take it off again (add --system for a system install)
#
# The bundle itself is not copied: leave this folder where it is (for example
# ~/.local/opt/ich-viewer-VERSION or /opt/ich-viewer-VERSION). Installing another version
# from its own folder points the command and the menu entry at that one.
set -eu

usage() { sed -n '2,11s/^# \{0,1\}//p' "$0"; }

HERE=$(cd "$(dirname "$0")" && pwd -P)
EXE="$HERE/ich-viewer"
mode=user
action=install
for arg in "$@"; do
  case $arg in
    --system) mode=system ;;
    --uninstall) action=uninstall ;;
    -h | --help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

if [ "$mode" = system ]; then
  BIN=/usr/local/bin
  SHARE=/usr/local/share
else
  BIN="$HOME/.local/bin"
  SHARE="${XDG_DATA_HOME:-$HOME/.local/share}"
fi
APPS="$SHARE/applications"
ICONS="$SHARE/icons/hicolor"

refresh() {
  command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$APPS" || true
  command -v gtk-update-icon-cache >/dev/null 2>&1 && gtk-update-icon-cache -q -t "$ICONS" || true
}

if [ "$action" = uninstall ]; then
  rm -f "$BIN/ich-viewer" "$APPS/ich-viewer.desktop" \
    "$ICONS/scalable/apps/ich-viewer.svg" "$ICONS/256x256/apps/ich-viewer.png"
  refresh
  echo "ich-viewer removed from $BIN and $SHARE (the bundle in $HERE is left alone)"
  exit 0
fi

[ -x "$EXE" ] || { echo "install.sh: $EXE is missing: run me from the unpacked bundle" >&2; exit 1; }
case $EXE in
  *[\"\`\$\\]*)
    echo "install.sh: move the bundle to a folder whose path has no \" \` \$ or \\ in it" >&2
    exit 1 ;;
esac

mkdir -p "$BIN" "$APPS" "$ICONS/scalable/apps" "$ICONS/256x256/apps"
ln -sfn "$EXE" "$BIN/ich-viewer"
cp "$HERE/ich-viewer.svg" "$ICONS/scalable/apps/ich-viewer.svg"
cp "$HERE/ich-viewer.png" "$ICONS/256x256/apps/ich-viewer.png"
tmp="$APPS/.ich-viewer.desktop.$$"
while IFS= read -r line; do
  case $line in
    Exec=*) printf 'Exec="%s" %%F\n' "$EXE" ;;
    TryExec=*) printf 'TryExec=%s\n' "$EXE" ;;
    *) printf '%s\n' "$line" ;;
  esac
done <"$HERE/ich-viewer.desktop" >"$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$APPS/ich-viewer.desktop"
refresh

echo "installed: $BIN/ich-viewer -> $EXE"
echo "           $APPS/ich-viewer.desktop (menu entry \"ICH Second Opinion\")"
case ":$PATH:" in
  *":$BIN:"*) ;;
  *) echo "note: $BIN is not on your PATH; start the viewer from the menu or as $EXE" ;;
esac
